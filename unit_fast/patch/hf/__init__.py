"""Replacements for the Hungarian matchers and box losses of ``transformers/loss/*``.

``matching.py`` holds what every family shares (padded targets, one batched solve, scipy's index
order); one file per loss family holds its matcher ``forward`` and declares its patches in a
module-level ``PATCHES`` list, which ``unit_fast.patch.transformers`` installs.
"""

# The family files, each with a PATCHES list (installed in this order).
FAMILIES = (
    "unit_fast.patch.hf.detr",
    "unit_fast.patch.hf.rt_detr",
    "unit_fast.patch.hf.lw_detr",
)
