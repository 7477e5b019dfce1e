"""unit_fast::hungarian_match: every backend on every device against the scipy reference.

Discrete op: totals are compared, never indices (ties may differ), except for
``linear_sum_assignment``, whose contract is scipy's tie-breaking.
"""

import numpy as np
import pytest
import scipy.optimize
import torch

import unit_fast
from unit_fast import _backend
from unit_fast.ops.hungarian_match import (
    INFEASIBLE,
    INVALID,
    batched_linear_sum_assignment,
    hungarian_match,
    hungarian_match_ref,
    linear_sum_assignment,
)
from unit_fast.testing import devices

DEVICE_BACKENDS = [(d, b) for d in devices() for b in _backend.backends_for("hungarian_match", d)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def scipy_total(cost2d, maximize=False):
    """Optimal total of one problem by scipy, in float64, or None if scipy refuses it."""
    c = cost2d.detach().to("cpu", torch.float64).numpy()
    r, k = scipy.optimize.linear_sum_assignment(c, maximize=maximize)
    return c[r, k].sum()


def check_solution(cost, assign, num_cols=None, maximize=False):
    """Valid partial permutation with min(N, num_cols[b]) assignments and scipy's optimal total."""
    B, N, M = cost.shape
    assert assign.shape == (B, N) and assign.dtype == torch.int64
    assert assign.device == cost.device
    a = assign.cpu()
    c64 = cost.detach().to("cpu", torch.float64)
    for b in range(B):
        nc = M if num_cols is None else int(num_cols[b])
        rows = torch.nonzero(a[b] >= 0).flatten()
        cols = a[b, rows]
        assert (a[b] >= -1).all(), f"problem {b}: unexpected code {a[b].min()}"
        assert len(rows) == min(N, nc), f"problem {b}: {len(rows)} assignments, expected {min(N, nc)}"
        assert (cols < nc).all(), f"problem {b}: column beyond num_cols={nc}"
        assert len(set(cols.tolist())) == len(cols), f"problem {b}: a column assigned twice"
        if len(rows) == 0:
            continue
        got = c64[b, rows, cols].sum().item()
        want = scipy_total(c64[b, :, :nc], maximize)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), f"problem {b}: total {got} != scipy {want}"


def solve(device, backend, cost, num_cols=None, maximize=False, **kw):
    return batched_linear_sum_assignment(cost.to(device), num_cols, maximize, backend=backend, **kw)


# ------------------------------------------------------------------ batched solver vs scipy
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 5), (4, 7, 13), (4, 13, 7), (2, 33, 65), (2, 100, 20)])
def test_random(device, backend, shape):
    cost = torch.rand(shape, dtype=torch.float64)
    check_solution(cost, solve(device, backend, cost))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(6, 8, 8), (6, 5, 9), (6, 9, 5)])
@pytest.mark.parametrize("high", [1, 2, 3])
def test_ties_and_integer_costs(device, backend, shape, high):
    cost = torch.randint(0, high, shape).double()
    check_solution(cost, solve(device, backend, cost))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_constant_matrix(device, backend):
    cost = torch.full((2, 6, 6), 3.0)
    check_solution(cost, solve(device, backend, cost))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("as_list", [True, False])
def test_ragged_num_cols(device, backend, as_list):
    cost = torch.rand(6, 9, 12)
    num_cols = [0, 1, 5, 9, 12, 3]
    nc = num_cols if as_list else torch.tensor(num_cols, device=device)
    assign = solve(device, backend, cost, nc)
    check_solution(cost, assign, num_cols)
    assert (assign[0] == -1).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_padding_beyond_num_cols_is_ignored(device, backend):
    cost = torch.rand(3, 10, 8)
    padded = cost.clone()
    padded[:, :, 4:] = float("nan")  # garbage past num_cols must not matter
    assign = solve(device, backend, padded, [4, 4, 4])
    check_solution(cost[:, :, :4], assign)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 4), (3, 0, 5), (3, 5, 0), (0, 0, 0)])
def test_empty(device, backend, shape):
    cost = torch.rand(shape)
    assign = solve(device, backend, cost)
    assert assign.shape == shape[:2]
    assert (assign == -1).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(4, 6, 6), (4, 4, 9), (4, 9, 4)])
def test_maximize(device, backend, shape):
    cost = torch.randn(shape, dtype=torch.float64)
    check_solution(cost, solve(device, backend, cost, maximize=True), maximize=True)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", [(5, 8, 8), (5, 6, 10), (5, 10, 6)])
def test_forbidden_pairs(device, backend, shape):
    cost = torch.rand(shape, dtype=torch.float64)
    B, N, M = shape
    # forbid roughly half the pairs but keep a feasible diagonal
    cost[torch.rand(shape) < 0.5] = float("inf")
    k = min(N, M)
    cost[:, torch.arange(k), torch.arange(k)] = torch.rand(B, k, dtype=torch.float64)
    assign = solve(device, backend, cost)
    check_solution(cost, assign)
    a = assign.cpu()
    for b in range(B):
        rows = torch.nonzero(a[b] >= 0).flatten()
        assert torch.isfinite(cost[b, rows, a[b, rows]]).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_infeasible_invalid_codes(device, backend):
    cost = torch.rand(5, 3, 3)
    cost[1, 0, :] = float("inf")  # row 0 cannot be assigned
    cost[2, 1, 2] = float("nan")
    cost[3, 2, 0] = float("-inf")
    assign = solve(device, backend, cost).cpu()
    assert (assign[1] == INFEASIBLE).all()
    assert (assign[2] == INVALID).all()
    assert (assign[3] == INVALID).all()
    check_solution(cost[[0, 4]], assign[[0, 4]].to(device))
    # maximize flips the sign: +inf is then invalid and -inf forbidden.
    mx = torch.rand(2, 3, 3)
    mx[0, 0, 0] = float("inf")
    mx[1, 0, 0] = float("-inf")
    out = solve(device, backend, mx, maximize=True).cpu()
    assert (out[0] == INVALID).all()
    assert (out[1] >= 0).all() and out[1, 0] != 0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_checked_mode_raises(device, backend):
    cost = torch.rand(3, 4, 4)
    cost[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="problem 2: .*invalid numeric"):
        solve(device, backend, cost, checked=True)
    cost = torch.rand(3, 4, 4)
    cost[1, :, 2:] = float("inf")
    cost[1, 2:, :] = float("inf")  # rows 2, 3 have no finite column
    with pytest.raises(ValueError, match="problem 1: .*infeasible"):
        solve(device, backend, cost, checked=True)
    ok = torch.rand(2, 3, 5)
    check_solution(ok, solve(device, backend, ok, checked=True).cpu())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(device, backend, dtype):
    cost = torch.rand(4, 12, 9).to(dtype)
    assign = solve(device, backend, cost)
    check_solution(cost.double(), assign)  # the rounded values are the problem solved


VIEWS = {
    "transposed": lambda t: t.transpose(1, 2),
    "strided": lambda t: t[::2, 1::2, ::3],
    "permuted": lambda t: t.permute(2, 1, 0)[:5],
}


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("view", VIEWS)
def test_non_contiguous(device, backend, view):
    base = torch.rand(6, 14, 22, dtype=torch.float64)
    dev_view = VIEWS[view](base.to(device))
    assert not dev_view.is_contiguous()
    assign = batched_linear_sum_assignment(dev_view, backend=backend)
    check_solution(VIEWS[view](base), assign.cpu())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_batched_equals_per_problem(device, backend):
    cost = torch.rand(7, 10, 15, dtype=torch.float64)
    num_cols = [15, 3, 10, 0, 7, 15, 12]
    batched = solve(device, backend, cost, num_cols).cpu()
    for b in range(7):
        single = solve(device, backend, cost[b : b + 1], [num_cols[b]]).cpu()
        rows_b, rows_s = batched[b] >= 0, single[0] >= 0
        tot_b = cost[b][rows_b.nonzero().flatten(), batched[b][rows_b]].sum()
        tot_s = cost[b][rows_s.nonzero().flatten(), single[0][rows_s]].sum()
        assert tot_b.item() == pytest.approx(tot_s.item(), rel=1e-12)


def test_reference_matches_scipy_semantics():
    cost = torch.rand(3, 4, 6)
    out = hungarian_match_ref(cost, torch.tensor([6, 2, 0]))
    check_solution(cost, out, [6, 2, 0])
    assert (hungarian_match_ref(cost, torch.tensor([7, 2, 0]))[0] == INVALID).all()


# ------------------------------------------------------------------ argument checking
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bad_arguments(device, backend):
    cost = torch.rand(2, 3, 4, device=device)
    with pytest.raises(ValueError, match="shape"):
        batched_linear_sum_assignment(cost[0], backend=backend)
    with pytest.raises(TypeError, match="floating"):
        batched_linear_sum_assignment(torch.ones(2, 3, 4, dtype=torch.long, device=device), backend=backend)
    with pytest.raises(TypeError, match="torch.Tensor"):
        batched_linear_sum_assignment(np.ones((2, 3, 4)), backend=backend)
    with pytest.raises(ValueError, match=r"num_cols\[1\] = 5 is outside"):
        batched_linear_sum_assignment(cost, [4, 5], backend=backend)
    with pytest.raises(ValueError, match="2 problems"):
        batched_linear_sum_assignment(cost, [4], backend=backend)
    with pytest.raises(ValueError, match="shape"):
        batched_linear_sum_assignment(cost, torch.tensor([1, 2, 3]), backend=backend)
    with pytest.raises(TypeError, match="integers"):
        batched_linear_sum_assignment(cost, torch.tensor([1.0, 2.0]), backend=backend)
    with pytest.raises(TypeError, match="ints"):
        batched_linear_sum_assignment(cost, [1, "2"], backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        batched_linear_sum_assignment(cost, backend="nope")


@pytest.mark.parametrize("device", devices())
def test_op_flags_out_of_range_num_cols(device):
    # The op itself never reads num_cols on the host (no sync on CUDA): the kernel flags it.
    cost = torch.rand(3, 3, 4, device=device)
    out = torch.ops.unit_fast.hungarian_match(cost, torch.tensor([4, 9, -1], device=device), False, False)
    assert (out[1:] == INVALID).all() and (out[0] >= 0).all()


def test_forced_backend_from_environment(monkeypatch):
    cost = torch.rand(2, 5, 5)
    monkeypatch.setenv("UNIT_FAST_BACKEND", "reference")
    assert _backend.select_backend("hungarian_match", "cpu") == "reference"
    check_solution(cost, batched_linear_sum_assignment(cost))
    monkeypatch.setenv("UNIT_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        batched_linear_sum_assignment(cost)


# ------------------------------------------------------------------ registration
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("with_num_cols", [False, True])
def test_opcheck(device, with_num_cols):
    cost = torch.rand(3, 5, 7, device=device)
    nc = torch.tensor([7, 2, 0], device=device) if with_num_cols else None
    torch.library.opcheck(torch.ops.unit_fast.hungarian_match.default, (cost, nc, False, False))
    torch.library.opcheck(torch.ops.unit_fast.hungarian_match.default, (cost.transpose(1, 2), None, True, True))


def test_compile_solver_fullgraph():
    def f(c):
        return batched_linear_sum_assignment(c * 2.0)

    cost = torch.rand(4, 6, 5)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    check_solution(cost, compiled(cost))


# ------------------------------------------------------------------ scipy-compatible single problem
@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (3, 7), (7, 3), (0, 3), (3, 0), (0, 0)])
@pytest.mark.parametrize("kind", ["rand", "int", "const"])
@pytest.mark.parametrize("maximize", [False, True])
def test_lsa_identical_to_scipy(shape, kind, maximize):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20 if kind != "const" else 1):
        if kind == "rand":
            c = rng.random(shape)
        elif kind == "int":
            c = rng.integers(0, 3, shape).astype(np.float64)
        else:
            c = np.full(shape, 2.0)
        want = scipy.optimize.linear_sum_assignment(c, maximize=maximize)
        got = linear_sum_assignment(c, maximize=maximize)
        for w, g in zip(want, got):
            assert isinstance(g, np.ndarray) and g.dtype == np.int64
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    "value",
    [
        [[1, 2], [3, 0]],
        np.matrix([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]),
        np.array([[True, False], [False, True]]),
        np.array([[3, 1], [2, 2]], dtype=np.int32),
        np.array([[3, 1], [2, 2]], dtype=np.float32),
        np.array([[np.inf, 1.0], [1.0, np.inf]]),
        [["1", "2.5"], ["0", "3"]],  # a list converts element by element: numeric strings are numbers
        ((1, 2), (3, 4)),
    ],
)
def test_lsa_accepts_what_scipy_accepts(value):
    want = scipy.optimize.linear_sum_assignment(value)
    got = linear_sum_assignment(value)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    "value,maximize",
    [
        (np.zeros(3), False),
        (np.zeros((2, 2, 2)), False),
        (np.array([[np.nan, 1.0], [1.0, 1.0]]), False),
        (np.array([[-np.inf, 1.0], [1.0, 1.0]]), False),
        (np.array([[np.inf, 1.0], [1.0, 1.0]]), True),
        (np.array([[np.inf, np.inf], [1.0, 1.0]]), False),
        (np.array([["a", "b"], ["c", "d"]]), False),
        (np.array([[1 + 1j, 2], [3, 4]]), False),
        (np.array([[object(), 1], [1, 1]], dtype=object), False),
        # Lists convert element by element (ValueError for a non-numeric string, NaN for None,
        # TypeError for complex), arrays by numpy's "safe" cast (TypeError above).
        ([["a", "b"], ["c", "d"]], False),
        ([[1, "x"]], False),
        ([[None, 1.0], [1.0, 1.0]], False),
        ([[1 + 2j, 3]], False),
        ([[1, 2], [3]], False),
        (["a", "b"], False),
    ],
)
def test_lsa_raises_what_scipy_raises(value, maximize):
    with pytest.raises(Exception) as want:
        scipy.optimize.linear_sum_assignment(value, maximize=maximize)
    with pytest.raises(want.type) as got:
        linear_sum_assignment(value, maximize=maximize)
    if want.type is ValueError:
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bool])
def test_lsa_tensors(device, dtype):
    c = (torch.rand(5, 8) * 4).to(dtype).to(device)
    rows, cols = linear_sum_assignment(c)
    assert rows.device == c.device and cols.device == c.device
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    want = scipy.optimize.linear_sum_assignment(c.cpu().double().numpy())
    np.testing.assert_array_equal(rows.cpu().numpy(), want[0])
    np.testing.assert_array_equal(cols.cpu().numpy(), want[1])
    with pytest.raises(ValueError, match="2-D"):
        linear_sum_assignment(c[0])
    bad = c.double().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="invalid numeric entries"):
        linear_sum_assignment(bad)


def test_hungarian_match_dispatcher_backends_agree():
    cost = torch.rand(5, 9, 6, dtype=torch.float64)
    for backend in _backend.backends_for("hungarian_match", "cpu"):
        check_solution(cost, hungarian_match(cost, None, False, False, backend=backend))


def test_public_names():
    for name in ("batched_linear_sum_assignment", "linear_sum_assignment", "HungarianMatcher", "box_loss",
                 "BoxLoss", "matching_cost"):
        assert callable(getattr(unit_fast, name))


# ------------------------------------------------------------------ the CUDA decomposition, on CPU
# unit_fast::_hungarian_match_block_sim runs the CUDA kernel's code paths on the CPU, so
# CPU-only CI executes them.  threads > 0: the block path -- strided Problem view, in-solver
# NaN check, T strided workers merged as a block reduction merges them, run one after another.
# threads a multiple of 32: lsa::solve_block, the block kernel's own body, and threads = -W:
# lsa::solve_warp, the warp kernel's own body with W warps (problems) per simulated block --
# each lane a fiber, lanes interleaved in a new order between every two warp primitives or
# barriers (csrc/ops/cpu/hungarian_match_kernel.cpp, warpsim).  threads = (T, K): the cluster
# path, lsa::solve_cluster -- K blocks of T threads on one problem, all K * T threads fibers of
# one simulated cluster whose barriers are cluster-wide.
SIM_THREADS = [1, 7, 32, 128, -1, -3, (32, 2), (64, 4)]  # 32, 128: the block path on fibers
needs_ext = pytest.mark.skipif(not unit_fast._ext.HAS_EXT, reason="unit_fast._C not built (pure-Python install)")


def block_sim(cost, num_cols=None, maximize=False, scipy_ties=False, threads=32):
    threads, cluster = threads if isinstance(threads, tuple) else (threads, 1)
    return torch.ops.unit_fast._hungarian_match_block_sim(cost, num_cols, maximize, scipy_ties, threads, cluster)


@needs_ext
@pytest.mark.parametrize("threads", SIM_THREADS)
@pytest.mark.parametrize("scipy_ties", [False, True])
@pytest.mark.parametrize("kind", ["rand", "int", "forbidden"])
@pytest.mark.parametrize("shape", [(3, 9, 9), (3, 6, 17), (3, 17, 6), (2, 40, 40)])
def test_block_sim_matches_cpu_kernel(threads, scipy_ties, kind, shape):
    if kind == "rand":
        cost = torch.rand(shape, dtype=torch.float64)
    elif kind == "int":
        cost = torch.randint(0, 3, shape).double()
    else:
        cost = torch.rand(shape, dtype=torch.float64)
        cost[torch.rand(shape) < 0.4] = float("inf")
    want = torch.ops.unit_fast.hungarian_match(cost, None, False, scipy_ties)
    got = block_sim(cost, None, False, scipy_ties, threads)
    # Same driver, same total order on candidates: identical indices, codes included.
    assert torch.equal(got, want)
    if kind != "forbidden":
        check_solution(cost, got)


@needs_ext
@pytest.mark.parametrize("threads", SIM_THREADS)
def test_block_sim_edge_cases(threads):
    cost = torch.rand(6, 9, 12)
    nc = torch.tensor([0, 1, 5, 9, 12, 3])
    check_solution(cost, block_sim(cost, nc, threads=threads), nc.tolist())
    bad = torch.rand(4, 3, 3)
    bad[1, 0, :] = float("inf")
    bad[2, 1, 2] = float("nan")
    bad[3, 2, 0] = float("-inf")
    out = block_sim(bad, threads=threads)
    assert (out[1] == INFEASIBLE).all() and (out[2] == INVALID).all() and (out[3] == INVALID).all()
    assert (block_sim(bad, torch.tensor([3, 3, 3, 4]), threads=threads)[3] == INVALID).all()
    mx = torch.randn(3, 5, 8, dtype=torch.float64)
    check_solution(mx, block_sim(mx, None, True, False, threads), maximize=True)
    for dtype in DTYPES:
        c = torch.rand(2, 7, 5).to(dtype)
        check_solution(c.double(), block_sim(c, threads=threads))
    base = torch.rand(4, 10, 14, dtype=torch.float64)
    for view in VIEWS.values():
        check_solution(view(base), block_sim(view(base), threads=threads))
    assert block_sim(torch.rand(0, 3, 3), threads=threads).shape == (0, 3)
    assert (block_sim(torch.rand(2, 4, 0), threads=threads) == -1).all()


@needs_ext
def test_block_sim_registration():
    for threads, cluster in ((32, 1), (-2, 1), (32, 2)):
        torch.library.opcheck(torch.ops.unit_fast._hungarian_match_block_sim.default,
                              (torch.rand(2, 4, 6), None, False, False, threads, cluster))
    for threads in (0, -9, 1025):
        with pytest.raises(ValueError, match="threads"):
            block_sim(torch.rand(1, 2, 2), threads=threads)
    for threads in ((32, 0), (32, 17), (-2, 2), (48, 2), (512, 4)):
        with pytest.raises(ValueError, match="cluster"):
            block_sim(torch.rand(1, 2, 2), threads=threads)


@needs_ext
@pytest.mark.parametrize("warps", [1, 2, 4])
def test_warp_sim_partial_blocks_and_shapes(warps):
    """Several problems per simulated block, a last block only partly used, DETR's transposed
    Q > T shape, a wide one and ragged num_cols: the warp path equals the CPU kernel."""
    for shape, nc in [((5, 25, 7), None), ((3, 6, 40), None), ((6, 9, 12), [0, 1, 5, 9, 12, 3])]:
        cost = torch.rand(shape, dtype=torch.float64)
        ncol = None if nc is None else torch.tensor(nc)
        for ties in (False, True):
            want = torch.ops.unit_fast.hungarian_match(cost, ncol, False, ties)
            assert torch.equal(block_sim(cost, ncol, False, ties, -warps), want)


def _fault_inputs():
    gen = torch.Generator().manual_seed(7)
    return [torch.rand(4, 12, 9, dtype=torch.float64, generator=gen),
            torch.randint(0, 3, (4, 10, 10), generator=gen).double(),
            torch.rand(3, 7, 30, dtype=torch.float64, generator=gen)]


@needs_ext
@pytest.mark.parametrize("threads,fault", [(-2, "drop_syncwarp"), (-2, "partial_mask"), (64, "partial_mask"),
                                           ((32, 2), "partial_mask"), (64, "drop_barrier"),
                                           ((32, 2), "drop_barrier")])
def test_sim_detects_injected_faults(monkeypatch, threads, fault):
    """Break-check of the simulation: with every __syncwarp dropped (warp path), the shuffles'
    mask narrowed to half the warp (every path), or every block / cluster barrier dropped (block
    and cluster paths), the interleaved lanes must either trip the simulator's checks or change
    the result.  Without the fault the same calls are exact."""
    inputs = _fault_inputs()
    wants = [torch.ops.unit_fast.hungarian_match(c, None, False, True) for c in inputs]
    for c, want in zip(inputs, wants):
        assert torch.equal(block_sim(c, None, False, True, threads), want)
    monkeypatch.setenv("UNIT_FAST_LSA_SIM_FAULT", fault)
    caught = 0
    for c, want in zip(inputs, wants):
        try:
            got = block_sim(c, None, False, True, threads)
        except RuntimeError as e:
            assert "simulation" in str(e)
            if fault == "partial_mask":
                assert "mask" in str(e)
            caught += 1
            continue
        caught += not torch.equal(got, want)
    assert caught == len(inputs), f"{fault}: only {caught} of {len(inputs)} runs noticed it"


@needs_ext
@pytest.mark.parametrize("seed", range(4))
def test_randomized_against_scipy(seed):
    """Many small problems of every character -- ties, huge and tiny scales, negative costs,
    forbidden pairs, maximize, infeasible -- through the CPU kernel (both tie modes) and the
    CUDA decomposition (1, 3 and 32 workers, 2 warps, a 2-block cluster): scipy's total, or
    INFEASIBLE where scipy raises."""
    rng = np.random.default_rng(seed)
    for _ in range(60):
        n, m = (int(x) for x in rng.integers(1, 14, 2))
        kind = rng.integers(0, 5)
        if kind == 0:
            c = rng.random((n, m))
        elif kind == 1:
            c = rng.integers(-3, 4, (n, m)).astype(float)
        elif kind == 2:
            c = rng.integers(0, 2, (n, m)) * 1e6
        elif kind == 3:
            c = rng.normal(size=(n, m)) * 10.0 ** rng.integers(-8, 8)
        else:
            c = np.round(rng.random((n, m)), 1)
        if rng.random() < 0.4:
            c[rng.random((n, m)) < rng.random() * 0.8] = np.inf
        maximize = bool(rng.random() < 0.3)
        if maximize:
            c[c == np.inf] = -np.inf
        try:
            r, k = scipy.optimize.linear_sum_assignment(c, maximize=maximize)
            want = c[r, k].sum()
        except ValueError:
            want = None
        t = torch.from_numpy(c)[None]
        outs = [torch.ops.unit_fast.hungarian_match(t, None, maximize, ties) for ties in (False, True)]
        outs += [block_sim(t, None, maximize, ties, threads) for ties in (False, True)
                 for threads in (1, 3, 32, -2, (32, 2))]
        for out in outs:
            out = out[0]
            if want is None:
                assert (out == INFEASIBLE).all(), (c, out)
                continue
            rows = torch.nonzero(out >= 0).flatten()
            assert len(rows) == min(n, m) and len(set(out[rows].tolist())) == len(rows), (c, out)
            got = c[rows.numpy(), out[rows].numpy()].sum()
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9 * max(1.0, abs(want))), (c, out)


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA launch paths need a GPU")
@pytest.mark.parametrize("shape,ragged", [((64, 100, 20), False), ((64, 300, 100), False),
                                          ((4, 300, 300), False), ((2, 900, 100), False),
                                          ((1, 1000, 1000), True)])
def test_cuda_launch_paths_match_the_cpu_kernel(monkeypatch, shape, ragged):
    """Each CUDA path on the device -- warp (64 x 100 x 20), block with the transposed copy
    (64 x 300 x 100), cluster (few problems of >= 256 columns; 900 x 100 transposed, 1000^2
    ragged) -- gives the CPU kernel's exact indices in scipy_ties mode, with the cluster path on
    and off (UNIT_FAST_LSA_CLUSTER=0): same driver, same total order on candidates."""
    gen = torch.Generator().manual_seed(3)
    cost = torch.rand(shape, generator=gen)
    nc = torch.randint(shape[2] // 2, shape[2] + 1, (shape[0],), generator=gen) if ragged else None
    want = torch.ops.unit_fast.hungarian_match(cost, nc, False, True)
    for env in ("", "0"):
        if env:
            monkeypatch.setenv("UNIT_FAST_LSA_CLUSTER", env)
        else:
            monkeypatch.delenv("UNIT_FAST_LSA_CLUSTER", raising=False)
        got = torch.ops.unit_fast.hungarian_match(cost.cuda(), None if nc is None else nc.cuda(), False, True)
        assert torch.equal(got.cpu(), want), f"UNIT_FAST_LSA_CLUSTER={env!r}"
