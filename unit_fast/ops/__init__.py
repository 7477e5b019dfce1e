"""unit_fast ops: each has a reference, kernels, a dispatcher, tests and a benchmark."""

from unit_fast.ops.attention import attention
from unit_fast.ops.box_loss import BoxLoss, box_loss
from unit_fast.ops.hungarian_match import (
    HungarianMatcher,
    batched_linear_sum_assignment,
    hungarian_match,
    linear_sum_assignment,
)
from unit_fast.ops.matching_cost import matching_cost
from unit_fast.ops.moe_dispatch import moe_dispatch
from unit_fast.ops.pairwise_giou import pairwise_giou

__all__ = [
    "attention",
    "BoxLoss",
    "HungarianMatcher",
    "batched_linear_sum_assignment",
    "box_loss",
    "hungarian_match",
    "linear_sum_assignment",
    "matching_cost",
    "moe_dispatch",
    "pairwise_giou",
]
