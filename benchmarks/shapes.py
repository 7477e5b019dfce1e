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
    """One batched linear-sum-assignment setting: ``B`` problems of ``Q`` rows by ``T`` columns."""

    name: str
    B: int
    Q: int
    T: int
    where: str

    def as_dict(self):
        return {"B": self.B, "Q": self.Q, "T": self.T}


LSA_SHAPES = {
    s.name: s
    for s in (
        LSAShape("detr_coco_b64", 64, 100, 20, "DETR on COCO: 100 queries, a busy image's ~20 objects"),
        LSAShape("detr_coco_dense_b64", 64, 100, 50, "DETR on COCO, crowded images (50 objects)"),
        LSAShape("dino_900q_b16", 16, 900, 100, "DINO / Deformable-DETR two-stage: 900 queries"),
        LSAShape("square_300_b16", 16, 300, 300, "square problems: the worst case for row-rich solvers"),
        LSAShape("rtdetr_300q_b64", 64, 300, 100, "RT-DETR: 300 queries, up to 100 objects"),
    )
}


# DETR's matcher weights (main.py: set_cost_class 1, set_cost_bbox 5, set_cost_giou 2).
MATCHER_COSTS = {"cost_class": 1.0, "cost_bbox": 5.0, "cost_giou": 2.0}


def lsa_costs(shape, device="cpu", num_sets=NUM_INPUT_SETS, dtype=LSA_DTYPE):
    """``num_sets`` cost tensors ``(B, Q, T)`` of ``dtype`` on ``device``, uniform in [0, 1)."""
    gen = torch.Generator().manual_seed(SEED)
    return [
        torch.rand(shape.B, shape.Q, shape.T, generator=gen, dtype=dtype).to(device) for _ in range(num_sets)
    ]


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
