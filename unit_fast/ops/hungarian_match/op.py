"""Registration of ``unit_fast::hungarian_match`` and per-call backend dispatch.

The schema is declared in C++ (``csrc/unit_fast.cpp``) when the extension is loaded, with
its CPU and (CUDA build) CUDA kernels.  Whatever the extension does not provide -- the whole
op in a pure-Python install, the CUDA kernel in a CPU-only build -- is filled here with the
scipy reference, so the op exists on every device and ``torch.compile`` always sees one real
op.  The op returns integers, so it has no autograd formula.
"""

import torch

from unit_fast import _backend, _ext
from unit_fast.ops.hungarian_match.reference import hungarian_match_ref

SCHEMA = "(Tensor cost, Tensor? num_cols=None, bool maximize=False, bool scipy_ties=False) -> Tensor"

_lib = None
if not _ext.HAS_EXT:
    _lib = torch.library.Library("unit_fast", "DEF")
    _lib.define("hungarian_match" + SCHEMA)
    torch.library.impl("unit_fast::hungarian_match", "CPU", hungarian_match_ref, lib=_lib)
if not _ext.HAS_CUDA_EXT:
    if _lib is None:
        _lib = torch.library.Library("unit_fast", "FRAGMENT")
    torch.library.impl("unit_fast::hungarian_match", "CUDA", hungarian_match_ref, lib=_lib)


@torch.library.register_fake("unit_fast::hungarian_match", lib=_lib)
def _hungarian_match_fake(cost, num_cols=None, maximize=False, scipy_ties=False):
    torch._check(cost.dim() == 3, lambda: f"hungarian_match: cost must be [B, N, M], got {cost.dim()}-D")
    return cost.new_empty(cost.shape[:2], dtype=torch.long)


if _ext.HAS_EXT:

    @torch.library.register_fake("unit_fast::_hungarian_match_block_sim")
    def _hungarian_match_block_sim_fake(cost, num_cols, maximize, scipy_ties, threads, cluster=1):
        return cost.new_empty(cost.shape[:2], dtype=torch.long)


def hungarian_match(cost, num_cols=None, maximize=False, scipy_ties=False, backend=None):
    """Runs ``unit_fast::hungarian_match`` on the selected backend (see ``_backend``).

    Arguments and result as ``reference.hungarian_match_ref``.
    """
    chosen = _backend.select_backend("hungarian_match", cost.device, backend)
    if chosen == "reference":
        return hungarian_match_ref(cost, num_cols, maximize, scipy_ties)
    return torch.ops.unit_fast.hungarian_match(cost, num_cols, maximize, scipy_ties)
