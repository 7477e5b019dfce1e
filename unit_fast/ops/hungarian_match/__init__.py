"""Exact linear-sum assignment: batched, scipy-compatible, and DETR's Hungarian matcher.

Public:
  ``batched_linear_sum_assignment(cost, num_cols=None, maximize=False)`` -> ``(B, N)`` int64
  ``linear_sum_assignment(cost_matrix, maximize=False)`` -> scipy's ``(row_ind, col_ind)``
  ``HungarianMatcher(cost_class=1, cost_bbox=1, cost_giou=1, logsoftmax=False)``: the module,
  defined in ``unit_fast.nn.hungarian_matcher`` (drop-in modules live in ``nn/``) and importable
  from here (and from ``unit_fast.ops.hungarian_match.matcher``) as before.
"""

from collections.abc import Sequence

import numpy as np
import torch

from unit_fast.ops.hungarian_match.op import hungarian_match
from unit_fast.ops.hungarian_match.reference import (
    INFEASIBLE,
    INVALID,
    UNASSIGNED,
    hungarian_match_ref,
    hungarian_matcher_ref,
)

__all__ = [
    "INFEASIBLE",
    "INVALID",
    "UNASSIGNED",
    "HungarianMatcher",
    "batched_linear_sum_assignment",
    "hungarian_match",
    "hungarian_match_ref",
    "hungarian_matcher_ref",
    "linear_sum_assignment",
]

_SOLVE_DTYPES = (torch.float32, torch.float64)


def _num_cols_tensor(num_cols, B, M, device):
    """``num_cols`` as a ``(B,)`` int64 tensor on ``device``, or None; host values are range-checked."""
    if num_cols is None:
        return None
    if isinstance(num_cols, torch.Tensor):
        if num_cols.dtype.is_floating_point or num_cols.dtype.is_complex or num_cols.dtype == torch.bool:
            raise TypeError(f"num_cols must hold integers, got dtype {num_cols.dtype}")
        if num_cols.shape != (B,):
            raise ValueError(f"num_cols must have shape ({B},), got {tuple(num_cols.shape)}")
        if num_cols.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_num_cols_range(num_cols.tolist(), M)
        # Elsewhere the kernel checks the range and marks a bad problem INVALID: checking
        # here would be a host sync on CUDA, and a graph break under torch.compile.
        return num_cols.to(device=device, dtype=torch.long, non_blocking=True)
    if not isinstance(num_cols, Sequence) or isinstance(num_cols, (str, bytes)):
        raise TypeError(f"num_cols must be None, an int64 tensor or a sequence of ints, got {type(num_cols)}")
    values = list(num_cols)
    if len(values) != B:
        raise ValueError(f"num_cols has {len(values)} entries but cost has B={B} problems")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"num_cols entries must be ints, got {v!r}")
    _check_num_cols_range(values, M)
    return to_device(values, device)


def to_device(values, device):
    """Host ints or an int64 tensor -> int64 tensor on ``device``, without a host sync."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if torch.device(device).type == "cuda" and not torch.compiler.is_compiling():
        host = host.pin_memory()  # pinned + non_blocking: the copy does not wait for the GPU
    return host.to(device, non_blocking=True)


def _check_num_cols_range(values, M):
    for b, v in enumerate(values):
        if not 0 <= int(v) <= M:
            raise ValueError(f"num_cols[{b}] = {int(v)} is outside [0, M={M}]")


def _raise_on_codes(assign):
    """Raises ValueError naming the first problem marked INVALID or INFEASIBLE."""
    codes = assign.min(dim=1).values.cpu() if assign.shape[1] else torch.zeros(0)  # host sync
    for b, code in enumerate(codes.tolist()):
        if code == INVALID:
            raise ValueError(
                f"problem {b}: cost matrix contains invalid numeric entries (NaN, or -inf; +inf with "
                "maximize=True) or num_cols is out of range"
            )
        if code == INFEASIBLE:
            raise ValueError(f"problem {b}: cost matrix is infeasible (no complete finite-cost assignment)")


def batched_linear_sum_assignment(cost, num_cols=None, maximize=False, *, checked=False, backend=None):
    """Solves B linear-sum assignment problems exactly, in one call, on ``cost.device``.

    Args:
        cost: ``(B, N, M)`` tensor, float32 or float64 (float16 and bfloat16 are solved in
            float32).  ``+inf`` forbids a pair (``-inf`` with ``maximize=True``).  Any strides.
        num_cols: ``None`` (every problem uses all ``M`` columns), a ``(B,)`` integer tensor or
            a sequence of B ints: problem ``b`` assigns rows to columns ``[0, num_cols[b])``.
        maximize: maximise the total cost instead of minimising it.
        checked: raise ``ValueError`` for invalid or infeasible problems (costs a host sync on
            CUDA).
        backend: force ``"cpp"`` or ``"reference"`` (default: best available, see
            ``unit_fast._backend``).

    Returns:
        ``(B, N)`` int64 tensor on ``cost.device``: ``out[b, n]`` is the column assigned to row
        ``n`` of problem ``b``, or ``-1`` when the row is left unassigned.  Each problem gets
        ``min(N, num_cols[b])`` assignments with the optimal total (equal to scipy's up to
        rounding of the sums; ties may be broken differently).  On the CPU, float32, float16
        and bfloat16 costs are solved with float32 duals (optimal up to float32 rounding,
        as lapx's native-precision solvers); float64 costs solve in float64.

        Without ``checked``, errors are reported in the result, so CUDA never waits on the
        host: a problem whose active costs hold NaN or ``-inf`` (or a CUDA ``num_cols`` entry
        outside ``[0, M]``) has every entry set to ``unit_fast.INVALID`` (-2); one with no
        complete finite-cost assignment to ``unit_fast.INFEASIBLE`` (-3).  ``out.min(1)``
        below -1 flags them.
    """
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() != 3:
        raise ValueError(f"cost must have shape (B, N, M), got {tuple(cost.shape)}")
    if not cost.dtype.is_floating_point:
        raise TypeError(f"cost must be a floating tensor (float32/float64), got {cost.dtype}")
    if cost.dtype not in _SOLVE_DTYPES:
        cost = cost.float()
    B, _, M = cost.shape
    nc = _num_cols_tensor(num_cols, B, M, cost.device)
    out = hungarian_match(cost, nc, bool(maximize), False, backend=backend)
    if checked:
        _raise_on_codes(out)
    return out


def linear_sum_assignment(cost_matrix, maximize=False):
    """``scipy.optimize.linear_sum_assignment`` with the same contract, on the unit_fast solver.

    Accepts what scipy accepts (array-likes, numpy arrays and matrices, bool arrays) and
    torch tensors.  Returns ``(row_ind, col_ind)``: int64 numpy arrays, or int64 tensors on
    the input tensor's device.  ``row_ind`` is sorted and ties are broken exactly as scipy
    breaks them (the same algorithm and operation order, in float64), so results are equal
    to scipy's.  Raises what scipy raises: ``ValueError`` for a non-2-D input, NaN or
    ``-inf`` entries (``None`` in a list counts as NaN), an infeasible matrix, or a list entry
    that is not a number (``"a"``); ``TypeError`` for complex entries and for string, object or
    complex arrays (numpy's "safe" cast), as scipy does.
    """
    if isinstance(cost_matrix, torch.Tensor):
        if cost_matrix.dim() != 2:
            raise ValueError(f"expected a matrix (2-D array), got a {cost_matrix.dim()} array")
        if cost_matrix.is_complex():
            raise TypeError(f"Cannot cast tensor of dtype {cost_matrix.dtype} to float64 safely")
        cost = cost_matrix.detach().to(torch.float64)
    else:
        if isinstance(cost_matrix, np.ndarray):
            # An array converts with numpy's "safe" rule, as scipy's: string, object and complex
            # arrays raise TypeError.
            arr = cost_matrix.astype(np.float64, casting="safe")
        else:
            # Anything else converts element by element, as scipy's: a string that is not a
            # number raises ValueError, a complex number TypeError, None becomes NaN (which
            # raises ValueError below).
            arr = np.asarray(cost_matrix, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"expected a matrix (2-D array), got a {arr.ndim} array")
        cost = torch.from_numpy(np.ascontiguousarray(arr))
    N, M = cost.shape
    assign = hungarian_match(cost[None], None, bool(maximize), True)[0]
    if N and M:
        code = int(assign.min())  # host sync: scipy's contract is to raise
        if code == INVALID:
            raise ValueError("matrix contains invalid numeric entries")
        if code == INFEASIBLE:
            raise ValueError("cost matrix is infeasible")
    if N <= M:
        rows = torch.arange(N, device=assign.device)
    else:
        rows = torch.nonzero(assign >= 0).flatten()  # ascending, as scipy returns them
    cols = assign[rows]
    if isinstance(cost_matrix, torch.Tensor):
        return rows, cols
    return rows.numpy(), cols.numpy()


def __getattr__(name):
    # HungarianMatcher is a drop-in module and lives in unit_fast.nn, which imports this package:
    # resolved on first use, so that importing the op never imports nn (no cycle either way).
    if name == "HungarianMatcher":
        from unit_fast.nn.hungarian_matcher import HungarianMatcher

        return HungarianMatcher
    if name == "matcher":  # the old submodule, an alias of unit_fast.nn.hungarian_matcher
        import importlib

        return importlib.import_module(f"{__name__}.matcher")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
