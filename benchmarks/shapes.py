"""Benchmark shapes shared by every ``bench_<op>.py``, named after where they occur.

``hungarian_match`` (linear-sum assignment) solves B problems of Q queries (rows) by T targets
(columns), Q >= T as in DETR: every target gets a query, most queries stay unmatched.

Inputs are drawn from a fixed-seed ``torch.Generator`` on the CPU and then moved, so CPU and
CUDA cases of one run (and of different runs) solve the same problems.  Costs are uniform in
[0, 1): never zeros, whose ties make every solver look fast.
"""

from dataclasses import dataclass

import torch

SEED = 0
LSA_DTYPE = torch.float32
# Cost sets the timed callable cycles through, so CUDA never re-reads one input from L2
# (all of these shapes fit in an H100's 50 MB L2).
NUM_INPUT_SETS = 3


@dataclass(frozen=True)
class LSAShape:
    """One batched linear-sum-assignment setting: ``B`` problems of ``Q`` rows by ``T`` columns.

    ``T_min`` set: a ragged batch, as DETR's images are: problem ``b`` has ``num_cols[b]``
    columns drawn uniformly in ``[T_min, T]`` (``lsa_num_cols``), stored padded to ``T``.
    """

    name: str
    B: int
    Q: int
    T: int
    where: str
    T_min: int | None = None

    def as_dict(self):
        d = {"B": self.B, "Q": self.Q, "T": self.T}
        if self.T_min is not None:
            d["T_min"] = self.T_min
        return d


LSA_SHAPES = {
    s.name: s
    for s in (
        LSAShape("detr_coco_b64", 64, 100, 20, "DETR on COCO: 100 queries, a busy image's ~20 objects"),
        LSAShape("detr_coco_dense_b64", 64, 100, 50, "DETR on COCO, crowded images (50 objects)"),
        LSAShape("dino_900q_b16", 16, 900, 100, "DINO / Deformable-DETR two-stage: 900 queries"),
        LSAShape("square_300_b16", 16, 300, 300, "square problems: the worst case for row-rich solvers"),
        LSAShape("rtdetr_300q_b64", 64, 300, 100, "RT-DETR: 300 queries, up to 100 objects"),
        LSAShape("dino_900q_b64", 64, 900, 100, "DINO two-stage at batch 64: 23 MB of costs, memory-bound"),
        LSAShape("square_1000_b8", 8, 1000, 1000, "large square problems (tracking-style association)"),
        LSAShape("detr_ragged_b64", 64, 100, 50, "DETR on COCO as batched: 100 queries, 0-50 objects per image",
                 T_min=0),
    )
}


# DETR's matcher weights (main.py: set_cost_class 1, set_cost_bbox 5, set_cost_giou 2).
MATCHER_COSTS = {"cost_class": 1.0, "cost_bbox": 5.0, "cost_giou": 2.0}


def lsa_num_cols(shape):
    """``(B,)`` int64 active columns of each problem of a ragged shape (the same for every input
    set), None for a uniform one."""
    if shape.T_min is None:
        return None
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(shape.T_min, shape.T + 1, (shape.B,), generator=gen)


def lsa_costs(shape, device="cpu", num_sets=NUM_INPUT_SETS, dtype=LSA_DTYPE):
    """``num_sets`` cost tensors ``(B, Q, T)`` of ``dtype`` on ``device``, uniform in [0, 1).

    In a ragged shape the padding columns (``>= lsa_num_cols(shape)[b]``) are 0: a constant
    column changes no problem's optimal assignment of its real columns when Q >= T, so solvers
    that take only uniform batches (lapx's) solve the padded tensor as it is.
    """
    gen = torch.Generator().manual_seed(SEED)
    num_cols = lsa_num_cols(shape)
    sets = []
    for _ in range(num_sets):
        cost = torch.rand(shape.B, shape.Q, shape.T, generator=gen, dtype=dtype)  # [B, Q, T]
        if num_cols is not None:
            pad = torch.arange(shape.T)[None, None, :] >= num_cols[:, None, None]  # [B, 1, T]
            cost[pad.expand(-1, shape.Q, -1)] = 0
        sets.append(cost.to(device))
    return sets


def matcher_inputs(setting, device="cpu"):
    """DETR-style ``(outputs, targets)`` for ``setting``.

    Returns:
        outputs: ``{"pred_logits": (B, Q, C+1), "pred_boxes": (B, Q, 4), "aux_outputs": [...]}``
            with ``layers - 1`` aux dicts; boxes are cxcywh in (0.1, 0.6), so every box is valid.
        targets: list of B dicts, ``"labels"`` int64 ``(T,)`` in ``[0, C)`` and ``"boxes"``
            ``(T, 4)`` cxcywh.
    """
    gen = torch.Generator().manual_seed(SEED)
    B, Q, T, C1 = setting.B, setting.Q, setting.T, setting.num_classes

    def layer():
        return {
            "pred_logits": torch.randn(B, Q, C1, generator=gen).to(device),
            "pred_boxes": (torch.rand(B, Q, 4, generator=gen) * 0.5 + 0.1).to(device),
        }

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(setting.layers - 1)]
    targets = [
        {
            "labels": torch.randint(0, C1 - 1, (T,), generator=gen).to(device),  # C1 - 1: no "no-object"
            "boxes": (torch.rand(T, 4, generator=gen) * 0.5 + 0.1).to(device),
        }
        for _ in range(B)
    ]
    return outputs, targets


# ---------------------------------------------------------------------------------------------
# matching_cost: the matcher's cost blocks, L decoder layers x B images x Q queries x T targets.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchingCostShape:
    """The matcher's cost for ``layers`` decoder layers of ``B`` images: ``Q`` queries by ``T``
    targets (every image has ``T``), ``num_classes`` logits (COCO's 91 classes + no-object)."""

    name: str
    layers: int
    B: int
    Q: int
    T: int
    num_classes: int
    where: str

    def as_dict(self):
        return {"L": self.layers, "B": self.B, "Q": self.Q, "T": self.T, "C": self.num_classes}


# DETR's matcher over every decoder layer (bench_hungarian_match's matcher group).
MATCHER_SETTINGS = {
    s.name: s
    for s in (MatchingCostShape("detr_6layers_b64", 6, 64, 100, 20, 92, "DETR on COCO, main + 5 aux layers"),)
}

MATCHING_COST_SHAPES = {
    s.name: s
    for base, B, Q, T, where in (
        ("detr_coco_b64", 64, 100, 20, "DETR on COCO: 100 queries, a busy image's ~20 objects"),
        ("detr_coco_dense_b64", 64, 100, 50, "DETR on COCO, crowded images (50 objects)"),
        ("dino_900q_b16", 16, 900, 100, "DINO / Deformable-DETR two-stage: 900 queries"),
        ("rtdetr_300q_b64", 64, 300, 100, "RT-DETR: 300 queries, up to 100 objects"),
    )
    for layers in (1, 6)
    for s in (MatchingCostShape(f"{base}_L{layers}", layers, B, Q, T, 92, where),)
}


def matching_cost_inputs(shape, device="cpu", num_sets=NUM_INPUT_SETS):
    """``num_sets`` input tuples of ``unit_fast.ops.matching_cost``'s arguments for ``shape``.

    Each is ``(pred_logits (L, B, Q, C+1) f32, pred_boxes (L, B, Q, 4) f32 cxcywh in (0.1, 0.6),
    tgt_labels (B, T) int64 in [0, C), tgt_boxes (B, T, 4) f32, num_targets (B,) int64 = T)``.
    """
    gen = torch.Generator().manual_seed(SEED)
    L, B, Q, T, C1 = shape.layers, shape.B, shape.Q, shape.T, shape.num_classes

    def one():
        return (
            torch.randn(L, B, Q, C1, generator=gen).to(device),
            (torch.rand(L, B, Q, 4, generator=gen) * 0.5 + 0.1).to(device),
            torch.randint(0, C1 - 1, (B, T), generator=gen).to(device),  # C1 - 1: no "no-object"
            (torch.rand(B, T, 4, generator=gen) * 0.5 + 0.1).to(device),
            torch.full((B,), T, dtype=torch.long).to(device),
        )

    return [one() for _ in range(num_sets)]


# ---------------------------------------------------------------------------------------------
# box_loss: DETR's L1 + GIoU loss over matched (prediction, target) pairs, (N, 4) cxcywh each.


@dataclass(frozen=True)
class BoxLossShape:
    """``N`` matched pairs, as ``SetCriterion.loss_boxes`` sees them after indexing."""

    name: str
    N: int
    where: str

    def as_dict(self):
        return {"N": self.N}


BOX_LOSS_SHAPES = {
    s.name: s
    for s in (
        BoxLossShape("detr_coco_b64", 64 * 20, "DETR on COCO, batch 64, ~20 objects per image"),
        BoxLossShape("detr_b16_t100", 16 * 100, "batch 16, 100 objects per image (crowded / VG)"),
        BoxLossShape("pairs_1m", 1_000_000, "1M pairs: bandwidth-bound, for the HBM target"),
    )
}
BOX_LOSS_DTYPE = torch.float32


def box_loss_pairs(shape, device="cpu", num_sets=NUM_INPUT_SETS, dtype=BOX_LOSS_DTYPE):
    """``num_sets`` ``(src, tgt)`` pairs of ``(N, 4)`` cxcywh boxes on ``device``: targets with
    centres in [0.2, 0.8) and sides in [0.05, 0.5), predictions jittered around them by up to
    +-0.15 (most pairs overlap, some do not; no zero-area boxes)."""
    gen = torch.Generator().manual_seed(SEED)
    sets = []
    for _ in range(num_sets):
        tgt = torch.cat([torch.rand(shape.N, 2, generator=gen) * 0.6 + 0.2,
                         torch.rand(shape.N, 2, generator=gen) * 0.45 + 0.05], 1)  # [N, 4]
        src = tgt + (torch.rand(shape.N, 4, generator=gen) - 0.5) * 0.3  # [N, 4]
        src[:, 2:] = src[:, 2:].clamp(min=0.01)
        sets.append((src.to(device, dtype), tgt.to(device, dtype)))
    return sets

# ---------------------------------------------------------------------------------------------
# pairwise_giou: GIoU of every (N, M) pair of xyxy boxes (DETR's generalized_box_iou).


@dataclass(frozen=True)
class PairwiseGiouShape:
    """``N`` boxes against ``M`` boxes."""

    name: str
    N: int
    M: int
    where: str

    def as_dict(self):
        return {"N": self.N, "M": self.M}


PAIRWISE_GIOU_SHAPES = {
    s.name: s
    for s in (
        PairwiseGiouShape("detr_image_q100_t20", 100, 20, "one image's block: 100 queries x 20 targets"),
        PairwiseGiouShape("dino_image_q900_t100", 900, 100, "one image's block, 900 queries x 100 targets"),
        PairwiseGiouShape("detr_crossimage_b64", 6400, 1280, "DETR's cross-image layout at B=64, T=20"),
    )
}


def pairwise_boxes(shape, device="cpu", num_sets=NUM_INPUT_SETS, dtype=torch.float32):
    """``num_sets`` ``(boxes1 (N, 4), boxes2 (M, 4))`` xyxy pairs: centres in [0.1, 0.9), sides
    in [0.02, 0.5) (no zero-area boxes)."""
    gen = torch.Generator().manual_seed(SEED)

    def boxes(n):
        c = torch.rand(n, 2, generator=gen) * 0.8 + 0.1
        wh = torch.rand(n, 2, generator=gen) * 0.48 + 0.02
        return torch.cat([c - wh / 2, c + wh / 2], 1).to(device, dtype)

    return [(boxes(shape.N), boxes(shape.M)) for _ in range(num_sets)]


# ---------------------------------------------------------------------------------------------
# attention: multi-head attention with key padding, sequence-first as DETR / UniT call it.


@dataclass(frozen=True)
class AttentionShape:
    """``B`` sequences of ``L`` queries over ``S`` keys, embedding ``E`` split into ``H`` heads.

    ``pad_frac = (lo, hi)``: each sequence pads a fraction of its keys drawn uniformly in
    ``[lo, hi]``, among its first ``pad_span`` keys (all ``S`` when None): later keys (UniT's
    text tokens after the image's) are never padded.  With ``grid = (Hf, Wf)`` those keys are a
    row-major ``Hf x Wf`` feature map padded as DETR pads images (bottom rows and right
    columns, so the padding is scattered through the sequence); without, the padding is
    trailing (a sentence's).  ``self_attn``: the keys are the
    queries (``key is query``).  ``value_is_key``: the values are that same tensor too (BERT);
    otherwise they are their own tensor, as in DETR, which adds positional embeddings to the
    queries and keys but not to the values.
    """

    name: str
    B: int
    L: int
    S: int
    E: int
    H: int
    pad_frac: tuple[float, float]
    self_attn: bool
    where: str
    pad_span: int | None = None
    value_is_key: bool = False
    grid: tuple[int, int] | None = None

    def as_dict(self):
        d = {"B": self.B, "L": self.L, "S": self.S, "E": self.E, "H": self.H, "pad_frac": list(self.pad_frac),
             "self_attn": self.self_attn}
        if self.pad_span is not None:
            d["pad_span"] = self.pad_span
        if self.grid is not None:
            d["grid"] = list(self.grid)
        return d


# UniT's image encoder sees an 800 x 1088-ish COCO batch: 25 x 34 = 850 positions at stride 32,
# 50 x 68 = 3400 with DC5 (stride 16).  DETR pads each image to the batch's largest height and
# width, so 10-30% of an image's positions are padding: bottom rows (trailing in the flattened
# sequence: whole key blocks a kernel can skip) and right columns (a few keys at the end of every
# row: scattered, skippable by no one).  The split between the two is drawn per image.
ATTENTION_SHAPES = {
    s.name: s
    for s in (
        AttentionShape("unit_encoder_s32", 8, 850, 850, 256, 8, (0.1, 0.3), True,
                       "UniT / DETR image encoder self-attention, stride-32 map (25 x 34)", grid=(25, 34)),
        AttentionShape("unit_encoder_dc5", 8, 3400, 3400, 256, 8, (0.1, 0.3), True,
                       "UniT / DETR-DC5 image encoder self-attention, stride-16 map (50 x 68)", grid=(50, 68)),
        AttentionShape("unit_decoder_cross", 8, 100, 3400 + 25, 768, 8, (0.1, 0.3), False,
                       "UniT decoder cross-attention: 100 queries over the DC5 image (3400, padded) "
                       "and text (25) encoder outputs", pad_span=3400, grid=(50, 68)),
        AttentionShape("bert_base_l128", 32, 128, 128, 768, 12, (0.0, 0.5), True,
                       "UniT's BERT-base text encoder: sentences padded to 128 tokens",
                       value_is_key=True),
        AttentionShape("tiny_cpu", 2, 40, 40, 32, 2, (0.1, 0.3), True,
                       "smoke shape: runs the harness on CPU CI (its timings mean little)"),
    )
}

# One bf16 input set is up to ~85 MB (the decoder's memory keys and values) and each set's
# activations are the memory that matters: sets over 16 MiB (DC5, decoder) rotate two; the small
# ones fit in L2 and rotate NUM_INPUT_SETS.
ATTENTION_BIG_INPUT_BYTES = 16 * 2**20


def attention_inputs(shape, device="cpu", dtype=torch.bfloat16, num_sets=None):
    """``num_sets`` sequence-first input sets ``(query, key, value, key_padding_mask)`` for ``shape``.

    ``query (L, B, E)``, ``key`` and ``value`` ``(S, B, E)`` of ``dtype``, standard normal;
    ``key is query`` for ``self_attn`` shapes and ``value is key`` for ``value_is_key`` ones.
    ``key_padding_mask (B, S)`` bool, True = padding: sequence b pads the last
    ``round(f_b * pad_span)`` of its first ``pad_span`` keys, ``f_b`` uniform in ``pad_frac``.
    ``num_sets`` defaults to 2 when one set is over ``ATTENTION_BIG_INPUT_BYTES``, else
    ``NUM_INPUT_SETS``.
    """
    if num_sets is None:
        kv_tensors = (0 if shape.self_attn else 1) + (0 if shape.value_is_key else 1)
        elems = (shape.L + kv_tensors * shape.S) * shape.B * shape.E
        big = elems * torch.finfo(dtype).bits // 8 > ATTENTION_BIG_INPUT_BYTES
        num_sets = 2 if big else NUM_INPUT_SETS
    gen = torch.Generator().manual_seed(SEED)
    span = shape.S if shape.pad_span is None else shape.pad_span
    lo, hi = shape.pad_frac

    def normal(length):  # [length, B, E]
        return torch.randn(length, shape.B, shape.E, generator=gen).to(device, dtype)

    sets = []
    for _ in range(num_sets):
        query = normal(shape.L)
        key = query if shape.self_attn else normal(shape.S)
        value = key if shape.value_is_key else normal(shape.S)
        pad = lo + (hi - lo) * torch.rand(shape.B, generator=gen, dtype=torch.float64)  # [B]
        pos = torch.arange(shape.S)  # [S]
        if shape.grid is None:  # trailing
            n_pad = torch.round(pad * span).long()
            key_padding_mask = (pos >= span - n_pad[:, None]) & (pos < span)  # [B, S]
        else:  # bottom rows and right columns of the Hf x Wf map, keeping ~(1 - pad) of it
            hf, wf = shape.grid
            split = torch.rand(shape.B, generator=gen, dtype=torch.float64)  # [B]
            rows = torch.round(hf * (1 - pad) ** split).long().clamp(1, hf)  # [B]
            cols = torch.round(wf * (1 - pad) ** (1 - split)).long().clamp(1, wf)  # [B]
            y, x = pos // wf, pos % wf
            key_padding_mask = ((y[None] >= rows[:, None]) | (x[None] >= cols[:, None])) & (pos < span)  # [B, S]
        sets.append((query, key, value, key_padding_mask.to(device)))
    return sets


# ---------------------------------------------------------------------------------------------
# unit_step: one UniT training step (forward, backward, AdamW), MMF's reference path at one image
# per GPU (as MMF runs it) against the fast path at the largest batch that fits.


@dataclass(frozen=True)
class UniTStepSetting:
    """A training step of ``config`` on ``dataset`` with ``image`` (H, W)-sized inputs (COCO's
    typical 800 x 1088 after DETR's test resize); ``overrides`` applied to the config."""

    name: str
    config: str
    dataset: str
    image: tuple[int, int]
    overrides: tuple[str, ...]
    where: str

    def as_dict(self):
        return {"config": self.config, "dataset": self.dataset, "image": list(self.image),
                "overrides": list(self.overrides)}


_FULL = ("model.bert.pretrained=null",)  # random BERT-base: nothing to download, same cost
UNIT_STEP_SETTINGS = {
    s.name: s
    for s in (
        UniTStepSetting("coco_det_dc5", "coco_single_task", "detection_coco", (800, 1088), _FULL,
                        "UniT COCO detection, DC5 (stride 16: 50 x 68 tokens)"),
        UniTStepSetting("coco_det_s32", "coco_single_task", "detection_coco", (800, 1088),
                        _FULL + ("model.base_args.dilation=false",), "UniT COCO detection, stride 32"),
        UniTStepSetting("vqa2_dc5", "vqa2_single_task", "vqa2", (800, 1088), _FULL,
                        "UniT VQAv2, DC5, 25-token questions"),
        UniTStepSetting("vqa2_s32", "vqa2_single_task", "vqa2", (800, 1088),
                        _FULL + ("model.base_args.dilation=false",), "UniT VQAv2, stride 32"),
        UniTStepSetting("tiny_cpu_det", "tiny", "detection_coco", (64, 96), (),
                        "smoke setting: runs the harness on CPU (timings mean little)"),
    )
}


def unit_step_batch(setting, batch_size, device="cpu", seed=SEED):
    """One training sample dict for ``setting``: ``batch_size`` images of 85-100% of the
    setting's size each (so the batch is padded, as DETR's are), targets of 5-20 boxes
    (detection) or 3129-way soft scores and 25-token questions (VQA)."""
    gen = torch.Generator().manual_seed(seed)
    H, W = setting.image
    images = []
    for _ in range(batch_size):
        h = int(H * (0.85 + 0.15 * torch.rand((), generator=gen).item()))
        w = int(W * (0.85 + 0.15 * torch.rand((), generator=gen).item()))
        images.append(torch.randn(3, h, w, generator=gen).to(device))
    sample = {"dataset_name": setting.dataset, "image": images, "dataset_type": "train"}
    if setting.dataset.startswith("detection"):
        targets = []
        for _ in range(batch_size):
            n = int(torch.randint(5, 21, (), generator=gen))
            boxes = torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2,
                               torch.rand(n, 2, generator=gen) * 0.3 + 0.05], 1)
            labels = torch.randint(1, 8 if setting.config == "tiny" else 91, (n,), generator=gen)
            targets.append({"labels": labels.to(device), "boxes": boxes.to(device)})
        sample["targets"] = targets
    else:
        L = 25
        sample["input_ids"] = torch.randint(1000, 30000, (batch_size, L), generator=gen).to(device)
        mask = torch.ones(batch_size, L, dtype=torch.long)
        sample["input_mask"] = mask.to(device)
        sample["segment_ids"] = torch.zeros(batch_size, L, dtype=torch.long).to(device)
        sample["targets"] = torch.rand(batch_size, 3129, generator=gen).to(device)
    return sample


# ---------------------------------------------------------------------------------------------
# decode: JPEG decode + DETR's test resize (shorter side 800, longer at most 1333) + ImageNet
# normalisation, COCO-sized images generated here (bench_decode.py).


@dataclass(frozen=True)
class DecodeShape:
    """JPEGs of ``H x W`` pixels, ``images_per_step`` per timed call on CPU (small, so a CPU
    run stays short) and ``images_per_step_cuda`` on CUDA (a training step's worth and more)."""

    name: str
    H: int
    W: int
    images_per_step: int
    images_per_step_cuda: int
    where: str

    def as_dict(self):
        return {"H": self.H, "W": self.W}


DECODE_SHAPES = {
    s.name: s
    for s in (
        DecodeShape("coco_640x480", 480, 640, 4, 128,
                    "a typical COCO image (640 x 480), resized up to 800 x 1066"),
        DecodeShape("coco_1333x800", 800, 1333, 4, 64,
                    "a large image already at DETR's test size (1333 x 800)"),
    )
}
DECODE_JPEG_QUALITY = 90  # about what COCO's Flickr JPEGs use


def decode_jpegs(shape, num_images, seed=SEED):
    """``num_images`` distinct baseline JPEGs (4:2:0, ``DECODE_JPEG_QUALITY``) of ``shape``:
    smooth colour gradients, a few flat rectangles and pixel noise, so the entropy decoder does
    about the work a photo costs (flat images decode unrealistically fast)."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape.H, 0 : shape.W].astype(np.float32)  # [H, W] each
    out = []
    for _ in range(num_images):
        freq = rng.uniform(0.005, 0.03, size=(3, 2))
        phase = rng.uniform(0, 6.3, size=3)
        base = np.stack([127 + 90 * np.sin(x * fx + y * fy + p) for (fx, fy), p in zip(freq, phase, strict=True)], -1)
        noisy = base + rng.normal(0, 12, size=base.shape)  # [H, W, 3]
        image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, shape.W - 40)), int(rng.integers(0, shape.H - 40))
            x1, y1 = x0 + int(rng.integers(20, shape.W // 3)), y0 + int(rng.integers(20, shape.H // 3))
            draw.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=DECODE_JPEG_QUALITY)
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------------------------------------
# moe_dispatch: a top-k mixture of expert FFNs over N tokens (UniT / MMF MultiModel's MoE layer).


@dataclass(frozen=True)
class MoEDispatchShape:
    """``N`` tokens of width ``d``, ``E`` expert FFNs of hidden width ``f``, ``k`` slots per token;
    each expert takes at most ``capacity_factor * N * k / E`` slots (the rest are dropped, -1)."""

    name: str
    N: int
    d: int
    f: int
    E: int
    k: int
    where: str
    capacity_factor: float = 1.25

    def as_dict(self):
        return {"N": self.N, "d": self.d, "f": self.f, "E": self.E, "k": self.k,
                "capacity_factor": self.capacity_factor}


MOE_DISPATCH_SHAPES = {
    s.name: s
    for s in (
        MoEDispatchShape("unit_n4096_e8_k2", 4096, 256, 1024, 8, 2,
                         "UniT-sized: 4096 tokens (a batch's queries and text), d 256, f 1024, top-2 of 8"),
        MoEDispatchShape("cpu_n2048_e16_k2", 2048, 128, 512, 16, 2, "CPU-sized, finer experts: top-2 of 16"),
        MoEDispatchShape("tiny_n128_e4_k2", 128, 32, 64, 4, 2, "tiny: the per-token reference is timed too"),
    )
}
MOE_DISPATCH_DTYPE = torch.float32
# Shapes small enough for the per-token reference loop (it runs ~N * k Python iterations).
MOE_DISPATCH_REFERENCE_MAX_SLOTS = 256


def moe_dispatch_inputs(shape, device="cpu", num_sets=NUM_INPUT_SETS, dtype=MOE_DISPATCH_DTYPE):
    """``num_sets`` tuples ``(x, expert_idx, gates, w1, b1, w2, b2, grad_y)`` of ``moe_dispatch``
    arguments (and an output gradient) for ``shape``.

    A top-k router with a skew: logits ``randn(N, E)`` plus a per-expert offset in [0, 1), so the
    experts' loads differ; gates are the softmax of the k chosen logits; slots past an expert's
    capacity ``ceil(capacity_factor * N * k / E)`` (in token order, as GShard drops) become -1.
    Weights are scaled by ``1 / sqrt(fan_in)`` so activations stay O(1).
    """
    gen = torch.Generator().manual_seed(SEED)
    N, d, f, E, k = shape.N, shape.d, shape.f, shape.E, shape.k
    capacity = -(-int(shape.capacity_factor * N * k) // E)
    sets = []
    for _ in range(num_sets):
        logits = torch.randn(N, E, generator=gen) + torch.rand(E, generator=gen)  # [N, E]
        top, expert_idx = logits.topk(k, dim=1)  # [N, k] each
        gates = top.softmax(dim=1)  # [N, k]
        flat = expert_idx.reshape(-1)  # [N * k], slot order = token order
        rank = (torch.nn.functional.one_hot(flat, E).cumsum(0) - 1).gather(1, flat[:, None])[:, 0]  # [N * k]
        expert_idx = torch.where(rank < capacity, flat, -1).view(N, k)
        tensors = (
            torch.randn(N, d, generator=gen),
            expert_idx,
            gates,
            torch.randn(E, d, f, generator=gen) / d**0.5,
            torch.randn(E, f, generator=gen) * 0.1,
            torch.randn(E, f, d, generator=gen) / f**0.5,
            torch.randn(E, d, generator=gen) * 0.1,
            torch.randn(N, d, generator=gen),
        )
        sets.append(tuple(t.to(device) if i == 1 else t.to(device, dtype) for i, t in enumerate(tensors)))
    return sets
