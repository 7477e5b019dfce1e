"""``unit_fast::hungarian_match`` and ``HungarianMatcher`` against DETR's scipy loop and peers.

Groups (``benchmark.group``), each timed in one run on the same inputs:
  ``hungarian_match:<shape>``          the solver on ``(B, Q, T)`` float32 costs (shapes.py):
      scipy_loop               the reference: ``cost.cpu()``, one scipy call per problem (DETR)
      lapx_<solver>            each of lapx's batch solvers (LAPX_BATCH_SOLVERS), from the torch
                               tensor as float32, ``extend_cost=True``, as many threads as torch
      lapx_lapmod_batch        lapx's sparse solver on square shapes only (the dense costs as CSR,
                               built before timing)
      torch_linear_assignment  its Triton kernel (CUDA only: its CPU path is a scipy loop)
      unit_fast_cpp / unit_fast_cuda   ``batched_linear_sum_assignment(cost, backend="cpp")``
  A ragged shape (``T_min``) gives unit_fast and scipy each problem's ``num_cols``; the solvers
  that take only uniform batches solve the zero-padded tensor (exact: see ``lsa_costs``).
  ``hungarian_matcher:<setting>``      DETR's matcher over every decoder layer:
      detr_matcher             ``hungarian_matcher_ref`` once per layer, as DETR's criterion does
      unit_fast_match_all      ``HungarianMatcher.match_all``: all layers in one solve
      unit_fast_match_all_keep_on_device   the same, indices left on the GPU (CUDA only)

Every provider starts from the cost (or the outputs) on the case's device, so the CPU solvers'
cases on CUDA include the copy to the host.  Before timing, every result's total cost is
checked against scipy's, per problem (totals, not indices: ties may differ).
"""

import functools

import pytest
import torch

import unit_fast
from benchmarks.conftest import CUDA, cuda_only, devices, measure
from benchmarks.shapes import (
    LSA_DTYPE,
    LSA_SHAPES,
    MATCHER_COSTS,
    MATCHER_SETTINGS,
    lsa_costs,
    lsa_num_cols,
    matcher_inputs,
)
from unit_fast import _backend
from unit_fast.ops.hungarian_match.reference import hungarian_match_ref, hungarian_matcher_ref
from unit_fast.ops.matching_cost import matching_cost_ref

# Totals are evaluated in float64 on float32 costs; a float32 solve may pick an assignment whose
# total differs from scipy's float64 optimum by rounding only (tests/ops use the same rtol).
TOTAL_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _cpp_marks(device):
    """Skips a unit_fast case whose C++/CUDA kernel is not built, instead of timing a fallback."""
    missing = _backend.missing_backends("hungarian_match", device).get("cpp")
    return [pytest.mark.skipif(missing is not None, reason=f"unit_fast cpp backend on {device}: {missing}")]


def _provider_cases(generic, cpu_only, cuda_only_providers):
    cases = [pytest.param(p, d, id=f"{p}-{d}") for p in generic for d in devices()]
    cases += [pytest.param(p, "cpu", marks=m, id=f"{p}-cpu") for p, m in cpu_only]
    cases += [pytest.param(p, "cuda", marks=m, id=f"{p}-cuda") for p, m in cuda_only_providers]
    return cases


# lapx's dense batch solvers (lapx 0.11): h = hybrid native-rectangular, r = native rectangular,
# x / xa = the classic JV (square-padded), s / sa = the lapjvs variant; "a" solvers return pairs.
LAPX_BATCH_SOLVERS = ("lapjvh_batch", "lapjvr_batch", "lapjvx_batch", "lapjvxa_batch", "lapjvs_batch",
                      "lapjvsa_batch")

SOLVER_CASES = _provider_cases(
    ["scipy_loop", *(f"lapx_{n}" for n in LAPX_BATCH_SOLVERS), "lapx_lapmod_batch"],
    [("unit_fast_cpp", _cpp_marks("cpu"))],
    [
        ("torch_linear_assignment", cuda_only(
            "torch_linear_assignment is benchmarked on CUDA only (its CPU path is a scipy loop); "
            "no CUDA device here")),
        ("unit_fast_cuda", cuda_only("unit_fast's CUDA kernel needs a CUDA device; none here")
         + (_cpp_marks("cuda") if CUDA else [])),
    ],
)

MATCHER_CASES = _provider_cases(
    ["detr_matcher"],
    [("unit_fast_match_all", _cpp_marks("cpu"))],
    [
        ("unit_fast_match_all", cuda_only() + (_cpp_marks("cuda") if CUDA else [])),
        ("unit_fast_match_all_keep_on_device",
         cuda_only("keep_on_device only matters on CUDA; no CUDA device here")
         + (_cpp_marks("cuda") if CUDA else [])),
    ],
)


def _describe(benchmark, op, case, provider, device, shape, dtype):
    benchmark.group = f"{op}:{case}"
    benchmark.extra_info.update(
        op=op, case=case, provider=provider, device=device, shape=shape,
        dtype=str(dtype).removeprefix("torch."),
        role="unit_fast" if provider.startswith("unit_fast") else "baseline",
    )


def _assignment_totals(cost, assign):
    """Total cost (float64) and number of assigned rows of each problem: ``(B,)``, ``(B,)``."""
    c = cost.detach().double().cpu()  # [B, N, M]
    a = assign.cpu()  # [B, N]
    taken = a >= 0
    picked = c.gather(2, a.clamp(min=0)[..., None])[..., 0]  # [B, N]
    return (picked * taken).sum(1), taken.sum(1)


def _pairs_totals(cost, pairs):
    """As ``_assignment_totals`` for per-problem ``(rows, cols)`` index arrays."""
    c = cost.detach().double().cpu()  # [B, N, M]
    totals = torch.zeros(len(pairs), dtype=torch.float64)
    counts = torch.zeros(len(pairs), dtype=torch.long)
    for b, (rows, cols) in enumerate(pairs):
        rows, cols = torch.as_tensor(rows).cpu(), torch.as_tensor(cols).cpu()
        totals[b], counts[b] = c[b, rows, cols].sum(), min(len(torch.unique(rows)), len(torch.unique(cols)))
    return totals, counts


@functools.cache
def _scipy_totals(shape_name):
    """scipy's optimal totals of each input set of a shape: list of ``(B,)`` float64."""
    shape = LSA_SHAPES[shape_name]
    num_cols = lsa_num_cols(shape)
    return [_assignment_totals(c, hungarian_match_ref(c, num_cols))[0] for c in lsa_costs(shape)]


def _lapx_pairs(provider, out):
    """lapx's batch output as per-problem ``(rows, cols)`` arrays."""
    import numpy as np

    if provider == "lapx_lapmod_batch":  # (x, y): x[i] is row i's column
        return [(np.arange(len(x)), x) for x in out[0]]
    if provider.endswith("a_batch"):  # lapjvxa / lapjvsa: one (K, 2) pairs array per problem
        return [(p[:, 0], p[:, 1]) for p in out]
    return list(zip(*out, strict=True))  # (rows list, cols list)


def _lapmod_problems(cost):
    """The dense ``(B, n, n)`` costs as lapmod's CSR problems: ``(n, cc, ii, kk)`` each."""
    import numpy as np

    c = cost.detach().cpu().double().numpy()
    n = c.shape[1]
    ii, kk = np.arange(0, n * n + 1, n), np.tile(np.arange(n), n)
    return [(n, c[b].ravel(), ii, kk) for b in range(c.shape[0])]


def _solver(provider, shape=None, inputs=()):
    """``provider``'s batched solve as a callable of the cost tensor (one of ``inputs``)."""
    num_cols = None if shape is None else lsa_num_cols(shape)
    if provider == "scipy_loop":  # cost.cpu() (a host sync on CUDA), then scipy per problem
        return lambda cost: hungarian_match_ref(cost, num_cols)
    if provider.startswith("lapx_"):
        lap = pytest.importorskip("lap", reason="lapx is not installed (pip install lapx)")
        solve = getattr(lap, provider.removeprefix("lapx_"))
        threads = torch.get_num_threads()  # as many workers as unit_fast's CPU kernel gets
        if provider == "lapx_lapmod_batch":
            if shape is None or shape.Q != shape.T or shape.T_min is not None:
                pytest.skip("lapmod solves square problems only")
            csr = {id(c): _lapmod_problems(c) for c in inputs}  # prepared outside the timing
            return lambda cost: solve(csr[id(cost)], return_cost=False, n_threads=threads)
        # .numpy() is zero-copy for a CPU tensor; on CUDA .cpu() is the copy DETR makes (host sync).
        return lambda cost: solve(cost.cpu().numpy(), extend_cost=True, return_cost=False, n_threads=threads)
    if provider == "torch_linear_assignment":
        tla = pytest.importorskip("torch_linear_assignment")
        return tla.batch_linear_assignment
    nc = None if num_cols is None else num_cols.to(inputs[0].device if inputs else "cpu")
    return lambda cost: unit_fast.batched_linear_sum_assignment(cost, nc, backend="cpp")


@pytest.mark.parametrize("shape", list(LSA_SHAPES.values()), ids=list(LSA_SHAPES))
@pytest.mark.parametrize("provider,device", SOLVER_CASES)
def test_hungarian_match(benchmark, provider, device, shape):
    _describe(benchmark, "hungarian_match", shape.name, provider, device, shape.as_dict(), LSA_DTYPE)
    inputs = lsa_costs(shape, device)
    solve = _solver(provider, shape, inputs)
    if provider == "torch_linear_assignment":
        from torch_linear_assignment import assignment

        if not assignment._cuda_uses_triton(inputs[0]):
            pytest.skip("torch_linear_assignment has no Triton path here and would time its scipy fallback")
    want = {id(x): t for x, t in zip(inputs, _scipy_totals(shape.name), strict=True)}
    num_cols = lsa_num_cols(shape)
    expect_count = (torch.full((shape.B,), min(shape.Q, shape.T)) if num_cols is None
                    else num_cols.clamp(max=shape.Q))

    def check(cost, out):
        if provider.startswith("lapx_"):
            pairs = _lapx_pairs(provider, out)
            if num_cols is not None:  # drop the padding columns' matches
                pairs = [(r[c < n], c[c < n]) for (r, c), n in zip(pairs, num_cols.tolist(), strict=True)]
            got, count = _pairs_totals(cost, pairs)
        else:
            if num_cols is not None:  # torch_linear_assignment solves the padded tensor too
                out = torch.where(out.cpu() < num_cols[:, None], out.cpu(), -1)
            got, count = _assignment_totals(cost, out)
        assert (count == expect_count).all(), f"{provider}: not {expect_count.tolist()} matches per problem"
        torch.testing.assert_close(got, want[id(cost)], **TOTAL_TOL,
                                   msg=lambda m: f"{provider} total vs scipy: {m}")

    measure(benchmark, solve, inputs, device, check)


@functools.cache
def _matcher_reference(setting_name):
    """Per-image float64 costs ``(L*B, Q, T)`` of a setting's inputs and scipy's totals ``(L*B,)``."""
    outputs, targets = matcher_inputs(MATCHER_SETTINGS[setting_name])
    layers = [outputs, *outputs["aux_outputs"]]
    L = len(layers)
    logits = torch.cat([o["pred_logits"] for o in layers]).double()  # [L*B, Q, C+1]
    boxes = torch.cat([o["pred_boxes"] for o in layers]).double()  # [L*B, Q, 4]
    labels = torch.stack([t["labels"] for t in targets]).repeat(L, 1)  # [L*B, T]
    tboxes = torch.stack([t["boxes"] for t in targets]).double().repeat(L, 1, 1)  # [L*B, T, 4]
    num_targets = torch.full((labels.shape[0],), labels.shape[1])  # [L*B]: every image has T targets
    cost = matching_cost_ref(logits, boxes, labels, tboxes, num_targets, logsoftmax=False,
                             **MATCHER_COSTS)  # [L*B, Q, T]
    return cost, _assignment_totals(cost, hungarian_match_ref(cost))[0]


def _matcher(provider, targets):
    """``provider``'s matching of every decoder layer, as a callable of ``outputs``."""
    if provider == "detr_matcher":
        return lambda outputs: [
            hungarian_matcher_ref(o, targets, **MATCHER_COSTS) for o in [outputs, *outputs["aux_outputs"]]
        ]
    keep = provider.endswith("keep_on_device")
    matcher = unit_fast.HungarianMatcher(**MATCHER_COSTS, keep_on_device=keep, backend="cpp")
    return lambda outputs: matcher.match_all(outputs, targets)


@pytest.mark.parametrize("setting", list(MATCHER_SETTINGS.values()), ids=list(MATCHER_SETTINGS))
@pytest.mark.parametrize("provider,device", MATCHER_CASES)
def test_hungarian_matcher(benchmark, provider, device, setting):
    _describe(benchmark, "hungarian_matcher", setting.name, provider, device, setting.as_dict(), LSA_DTYPE)
    outputs, targets = matcher_inputs(setting, device)
    cost, want = _matcher_reference(setting.name)
    expect_count = min(setting.Q, setting.T)

    def check(_, out):
        assert len(out) == setting.layers and all(len(layer) == setting.B for layer in out)
        pairs = [(i, j) for layer in out for i, j in layer]  # L*B pairs, layer-major as `cost`
        got, count = _pairs_totals(cost, pairs)
        assert (count == expect_count).all(), f"{provider}: not {expect_count} distinct matches per image"
        torch.testing.assert_close(got, want, **TOTAL_TOL, msg=lambda m: f"{provider} total vs scipy: {m}")

    # One input set: a matcher call reads its inputs many times over, L2 reuse is part of it.
    measure(benchmark, _matcher(provider, targets), [outputs], device, check)
