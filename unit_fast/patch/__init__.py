"""Patchers: put unit_fast's kernels into models written elsewhere, in place, and report what changed.

Each ``patch_*`` returns a ``PatchReport`` (``print`` it) and never changes a parameter object or
a state-dict key (house style section 11).
"""

from unit_fast.patch.detr import patch_detr
from unit_fast.patch.report import PatchReport
from unit_fast.patch.transformers import TransformersPatch, patch_transformers

__all__ = ["PatchReport", "TransformersPatch", "patch_detr", "patch_transformers"]
