"""Sparsely gated mixture of expert FFNs (UniT / MMF MultiModel's MoE layer, issue 16), fused.

Public:
  ``moe_dispatch(x, expert_idx, gates, w1, b1, w2, b2, activation="relu", backend=None)``
  ``moe_dispatch_ref(...)``: the spec (a per-token loop)

Backends: ``triton`` (grouped GEMMs over expert-sorted slots, ``triton.py``), ``torch`` (sorted
slots and one ``addmm`` per expert, ``grouped.py``), ``reference`` (traced by ``torch.export`` /
``torch.compile``, it records ``dense.py``'s fixed-shape form of the same formula).
"""

from unit_fast.ops.moe_dispatch.op import moe_dispatch
from unit_fast.ops.moe_dispatch.reference import moe_dispatch_ref

__all__ = ["moe_dispatch", "moe_dispatch_ref"]
