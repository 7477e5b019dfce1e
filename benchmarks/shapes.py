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


@dataclass(frozen=True)
class MatcherSetting:
    """DETR's matcher over every decoder layer: ``layers`` x ``B`` images, ``Q`` queries,
    ``T`` targets per image, ``num_classes`` logits (COCO's 91 classes + no-object)."""

    name: str
    layers: int
    B: int
    Q: int
    T: int
    num_classes: int

    def as_dict(self):
        return {"L": self.layers, "B": self.B, "Q": self.Q, "T": self.T, "C": self.num_classes}


MATCHER_SETTINGS = {
    s.name: s for s in (MatcherSetting("detr_6layers_b64", layers=6, B=64, Q=100, T=20, num_classes=92),)
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
