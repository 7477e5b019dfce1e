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

# The model side imports transformers (seconds): loaded on first use, not with the kernels.
_LAZY = {
    "UniT": "unit_fast.models.unit",
    "add_task": "unit_fast.models.add_task",
    "build_model": "unit_fast.models.unit",
    "load_mmf_checkpoint": "unit_fast.models.checkpoint",
    "save_mmf_checkpoint": "unit_fast.models.checkpoint",
    "load_config": "unit_fast.config",
    "TaskKind": "unit_fast.tasks",
    "Predictor": "unit_fast.predictor",
    # The drop-in patches import no model code; lazy only to keep `import unit_fast` minimal.
    "PatchReport": "unit_fast.patch",
    "patch_detr": "unit_fast.patch",
    "patch_transformers": "unit_fast.patch",
    "register_task_kind": "unit_fast.tasks",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unit_fast' has no attribute {name!r}")

__all__ = [
    "INFEASIBLE",
    "INVALID",
    "UNASSIGNED",
    "BoxLoss",
    "HungarianMatcher",
    "MultiheadAttention",
    "PatchReport",
    "Predictor",
    "TaskKind",
    "UniT",
    "add_task",
    "attention",
    "batched_linear_sum_assignment",
    "box_loss",
    "build_model",
    "linear_sum_assignment",
    "load_config",
    "load_mmf_checkpoint",
    "matching_cost",
    "pairwise_giou",
    "patch_attention",
    "patch_detr",
    "patch_transformers",
    "register_task_kind",
    "save_mmf_checkpoint",
]
