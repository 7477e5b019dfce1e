"""unit_fast ops: each has a reference, kernels, a dispatcher, tests and a benchmark."""

from unit_fast.ops.hungarian_match import (
    HungarianMatcher,
    batched_linear_sum_assignment,
    hungarian_match,
    linear_sum_assignment,
)

__all__ = ["HungarianMatcher", "batched_linear_sum_assignment", "hungarian_match", "linear_sum_assignment"]
