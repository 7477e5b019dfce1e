"""unit_fast: fast, drop-in kernels and training for UniT-style multimodal multitask
transformers (UniT, DETR family) in PyTorch."""

from unit_fast import _ext  # noqa: F401  (loads unit_fast._C once)
from unit_fast.ops import HungarianMatcher, batched_linear_sum_assignment, linear_sum_assignment
from unit_fast.ops.hungarian_match import INFEASIBLE, INVALID, UNASSIGNED

__version__ = "0.1.0"

__all__ = [
    "INFEASIBLE",
    "INVALID",
    "UNASSIGNED",
    "HungarianMatcher",
    "batched_linear_sum_assignment",
    "linear_sum_assignment",
]
