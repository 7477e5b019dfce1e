"""The CPU LSA kernel's float path (csrc/ops/cpu/lsa_simd.h, lsa_transpose.h) at sizes its
vector loops and blocked copy need: more than one 64-row copy block, lengths that are not a
multiple of the lane count, forbidden pairs, ragged ``num_cols``, strided views.  The AVX2
build and the generic one (``UNIT_FAST_CPU_ISA=generic``, in a subprocess) are both checked
against scipy.

Float inputs are solved with float32 duals, so totals are compared at float32's rounding
(``rel=1e-5``), as the benchmarks compare them.
"""

import os
import subprocess
import sys

import pytest
import scipy.optimize
import torch

from unit_fast.ops.hungarian_match import batched_linear_sum_assignment

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.unit_fast, "_lsa_cpu_isa"),
                                reason="unit_fast._C is not built")

# (B, N, M): transposed with N over two copy blocks and odd M; square (JV start, column
# reduction); wide; DETR's 100 x 20; a 1-column and a 1-row edge.
SHAPES = [(3, 130, 37), (3, 67, 67), (3, 37, 130), (4, 100, 20), (2, 9, 1), (2, 1, 9)]


def _problems(shape, seed, forbid, ties=False):
    """``shape`` costs uniform in [0, 1), or small integers (``ties``: equal minima everywhere,
    the cases where the JV start's second-best column matters)."""
    gen = torch.Generator().manual_seed(seed)
    cost = torch.randint(0, 3, shape, generator=gen).float() if ties else torch.rand(*shape, generator=gen)
    if forbid:  # ~10% forbidden, never a whole row or column of the smaller side
        drop = torch.rand(*shape, generator=gen) < 0.1
        drop[:, torch.arange(min(shape[1:])), torch.arange(min(shape[1:]))] = False
        cost[drop] = float("inf")
    return cost


def _check(cost, out, num_cols=None):
    B, N, M = cost.shape
    c = cost.double()
    for b in range(B):
        nc = M if num_cols is None else int(num_cols[b])
        rows = torch.nonzero(out[b] >= 0).flatten()
        cols = out[b, rows]
        assert len(rows) == min(N, nc) and len(set(cols.tolist())) == len(cols) and (cols < nc).all()
        r, k = scipy.optimize.linear_sum_assignment(c[b, :, :nc].numpy())
        want = c[b, :, :nc].numpy()[r, k].sum()
        got = c[b, rows, cols].sum().item()
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), f"problem {b}: {got} != scipy {want}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("forbid", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_float_path_matches_scipy(shape, forbid, ties):
    for seed in range(3):
        cost = _problems(shape, seed, forbid, ties)
        _check(cost, batched_linear_sum_assignment(cost, backend="cpp"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_take_the_float_path(dtype):
    cost = _problems((3, 130, 37), 0, False).to(dtype)
    _check(cost.float(), batched_linear_sum_assignment(cost, backend="cpp"))


def test_float_path_ragged_and_strided():
    cost = _problems((4, 140, 60), 1, False)
    num_cols = torch.tensor([60, 0, 13, 41])
    _check(cost, batched_linear_sum_assignment(cost, num_cols, backend="cpp"), num_cols)
    view = _problems((4, 60, 140), 2, False).transpose(1, 2)  # [4, 140, 60], column-major rows
    _check(view, batched_linear_sum_assignment(view, backend="cpp"))
    sliced = _problems((4, 140, 120), 3, False)[:, :, ::2]  # sM = 2: the copy's scalar path
    _check(sliced, batched_linear_sum_assignment(sliced, backend="cpp"))


def test_float_path_flags_invalid_inputs_found_by_the_vector_copy():
    cost = _problems((3, 130, 37), 0, False)
    cost[1, 77, 5] = float("nan")
    cost[2, 3, 36] = -float("inf")
    out = batched_linear_sum_assignment(cost, backend="cpp")
    assert (out[0] >= 0).sum() == 37
    assert (out[1] == -2).all() and (out[2] == -2).all()


def test_isa_reported_and_generic_build_matches_scipy():
    """This CPU's build is reported, and the generic build gives scipy's totals too."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    have_avx2 = " avx2" in flags and " fma" in flags and sys.platform == "linux"
    import platform

    expect = "avx2" if have_avx2 and platform.machine() == "x86_64" else "generic"
    assert torch.ops.unit_fast._lsa_cpu_isa() == expect
    code = (
        "import sys, torch, unit_fast; sys.path.insert(0, sys.argv[1]);"
        "import test_hungarian_match_float_path as t;"
        "assert torch.ops.unit_fast._lsa_cpu_isa() == 'generic';"
        "[t.test_float_path_matches_scipy(s, f, i) for s in t.SHAPES for f in (0, 1) for i in (0, 1)];"
        "t.test_float_path_ragged_and_strided();"
        "t.test_float_path_flags_invalid_inputs_found_by_the_vector_copy();"
        "print('ok')"
    )
    env = dict(os.environ, UNIT_FAST_CPU_ISA="generic")
    res = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
