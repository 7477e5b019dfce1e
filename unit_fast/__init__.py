"""unit_fast: fast, drop-in kernels and training for UniT-style multimodal multitask
transformers (UniT, DETR family) in PyTorch."""

from unit_fast import _ext  # noqa: F401  (loads unit_fast._C once)
from unit_fast.ops import (
    BoxLoss,
    HungarianMatcher,
    batched_linear_sum_assignment,
    box_loss,
    linear_sum_assignment,
    matching_cost,
    pairwise_giou,
)
from unit_fast.ops.hungarian_match import INFEASIBLE, INVALID, UNASSIGNED
from unit_fast.nn import MultiheadAttention, patch_attention
from unit_fast.ops.attention import attention

__version__ = "0.1.0"

__all__ = [
    "INFEASIBLE",
    "INVALID",
    "UNASSIGNED",
    "BoxLoss",
    "HungarianMatcher",
    "MultiheadAttention",
    "attention",
    "batched_linear_sum_assignment",
    "box_loss",
    "linear_sum_assignment",
    "matching_cost",
    "pairwise_giou",
    "patch_attention",
]
