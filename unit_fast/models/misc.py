"""Re-export of ``NestedTensor`` at its DETR / MMF path (``util/misc.py``, ``models/unit/misc.py``).

The class lives in ``unit_fast.structures``: the data layer builds it, and data must not import
models.  ``from unit_fast.models.misc import NestedTensor`` keeps working for existing code.
"""

from unit_fast.structures import NestedTensor

__all__ = ["NestedTensor"]
