"""``benchmarks.kernel_report``: the occupancy calculator, the ``ptxas -v`` parser, the threshold
checks, a fresh compile of every kernel for sm_90 (slow), and the committed report.

The compile test fails on any spill in a config the autotuner can pick, and on attention
forward / backward or LSA launches below 2 resident blocks per SM (the LSA small-problem path
below 25% warp occupancy), unless the row carries a documented ``why`` (``report.WHY``).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks.kernel_report import cuda_build
from benchmarks.kernel_report import report as R
from benchmarks.kernel_report.occupancy import occupancy
from benchmarks.kernel_report.ptxas import find_ptxas, parse_ptxas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "kernel_report.json")
ROW_FIELDS = ("name", "source", "config", "num_warps", "registers", "spill_stores", "spill_loads",
              "shared_bytes", "blocks_per_sm", "warp_occupancy", "limited_by")


# (threads, registers, shared bytes) -> (blocks, warp occupancy, limited by), by hand:
OCCUPANCY_CASES = [
    # 8 warps x 255 regs: 8192 regs/warp, 2 warps per 16K sub-partition -> 8 warps -> 1 block.
    ((256, 255, 16384), (1, 8 / 64, "registers")),
    # 4 warps x 255 regs: the same 8 warps -> 2 blocks.
    ((128, 255, 0), (2, 8 / 64, "registers")),
    # 1 warp x 92 regs: 2944 -> 3072 regs/warp, 5 per sub-partition -> 20 warps = 20 blocks;
    # shared 4032 + 1 KiB reserved -> 5120 B, 45 blocks.
    ((32, 92, 464 + 3568), (20, 20 / 64, "registers")),
    # 32 warps x 32 regs: 1024 regs/warp, 16 per sub-partition -> 64 warps = 2 blocks = the warp limit.
    ((1024, 32, 0), (2, 1.0, "warps+registers")),
    # 100 KiB + 1 KiB reserved = 103,424 B: 233,472 // 103,424 = 2 blocks.
    ((128, 32, 100 * 1024), (2, 8 / 64, "shared")),
    # 2 warps x 16 regs: the 32-block limit ties with the warp limit (64 // 2).
    ((64, 16, 0), (32, 1.0, "blocks+warps")),
    # more than 227 KiB per block cannot launch.
    ((128, 32, 228 * 1024), (0, 0.0, "launch")),
    # 40 regs: 1280 regs/warp, 12 per sub-partition (not 51 from 65536 // 1280) -> 48 warps.
    ((128, 40, 0), (12, 48 / 64, "registers")),
]


@pytest.mark.parametrize("launch, expected", OCCUPANCY_CASES)
def test_occupancy_by_hand(launch, expected):
    occ = occupancy(*launch)
    assert (occ.blocks_per_sm, occ.warp_occupancy, occ.limited_by) == expected


PTXAS_LOG = """\
ptxas info    : 11 bytes gmem
ptxas info    : Function properties for _Z6helperv
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    32 bytes stack frame, 24 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 464 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 1.0 ms
ptxas info    : Compiling entry function '_attention_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _attention_fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 127 registers, used 1 barriers
"""


def test_parse_ptxas():
    got = parse_ptxas(PTXAS_LOG)
    assert got == {
        "_Z3fooPf": dict(registers=255, spill_stores=24, spill_loads=28, stack_bytes=32, smem_bytes=464),
        "_attention_fwd_kernel": dict(registers=127, spill_stores=0, spill_loads=0, stack_bytes=0,
                                      smem_bytes=0),
    }  # _Z6helperv is a device function's frame, not a kernel


def test_parse_ptxas_empty():
    assert parse_ptxas("") == {}


def _row(**kw):
    row = dict(name="attention_fwd", source="x",
               config=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2), settings=["unit_encoder_dc5"],
               role="attention_fwd", tuned=True, num_warps=4, registers=128,
               spill_stores=0, spill_loads=0, stack_bytes=0, smem_bytes=0, dynamic_shared=8192)
    row.update(kw)
    return R.finish_row(row)


def test_checks_pass_a_clean_row():
    row = _row()
    assert row["blocks_per_sm"] == 4 and "why" not in row
    assert R.failures({"kernels": [row]}) == []


def test_checks_fail_on_a_spill_even_with_a_why():
    """A spill is never excused: not by the built-in reasons, nor by one that matches the row."""
    assert any("spills" in f for f in R.failures({"kernels": [_row(spill_stores=8, spill_loads=8)]}))
    excuse = [(lambda r: True, lambda r: "documented")]
    row = R.finish_row(dict(_row(spill_stores=8, spill_loads=0)), why=excuse)
    assert "why" not in row  # occupancy is fine: nothing to excuse, and a spill is not excusable
    assert any("spills" in f for f in R.failures({"kernels": [row]}))


def test_checks_fail_below_two_blocks_without_a_why():
    row = R.finish_row(dict(_row(num_warps=8, registers=200)), why=[])
    assert row["blocks_per_sm"] == 1 and "why" not in row
    assert any("no documented why" in f for f in R.failures({"kernels": [row]}))


def test_documented_why_excuses_low_occupancy_only():
    row = _row(num_warps=8, registers=200)  # WHY's 8-warp register-bound rule
    assert row["blocks_per_sm"] == 1 and row["why"].strip()
    assert R.failures({"kernels": [row]}) == []
    stale = dict(_row(), why="no longer true")
    assert any("has a why but meets" in f for f in R.failures({"kernels": [stale]}))


def test_lsa_small_path_needs_quarter_of_the_warps():
    lsa = dict(name="hungarian_match_lsa[warp]", source="x", config=dict(Q=100, T=20, threads=32),
               settings=["detr_coco"], role="lsa_small", tuned=False, num_warps=1, spill_stores=0,
               spill_loads=0, stack_bytes=0, smem_bytes=464, dynamic_shared=3568)
    assert R.failures({"kernels": [R.finish_row(dict(lsa, registers=92))]}) == []  # 20 blocks, 31%
    low = R.finish_row(dict(lsa, registers=168))  # 5376 regs/warp: 3 x 4 = 12 warps = 19%
    assert low["warp_occupancy"] < 0.25 and low["blocks_per_sm"] >= 2
    assert any("warp_occupancy" in f for f in R.failures({"kernels": [low]}))


def test_lsa_launch_plan_mirrors_the_launcher():
    """Warp path while 16 warps' slices fit (problems a block: ceil(B / 132 SMs), at most 4),
    else the block path, its workspace shared while it fits."""
    optin = 227 * 1024
    assert cuda_build.launch_plan(32, 5000, 6000, batch=64) == ("warp", 32, 6000, "shared")
    assert cuda_build.launch_plan(32, 5000, 6000, batch=400) == ("warp", 128, 24000, "shared")
    assert cuda_build.launch_plan(32, 5000, 14_000, batch=400) == ("warp", 128, 56_000, "shared")
    assert cuda_build.launch_plan(32, 5000, 15_000, batch=400) == ("block", 32, 5000, "shared")
    assert cuda_build.launch_plan(128, 50_000, optin, batch=64) == ("block", 128, 50_000, "shared")
    assert cuda_build.launch_plan(256, optin, optin, batch=64) == ("block", 256, 0, "global")
    # The cluster path: K >= 2 blocks of cluster_threads(C, K) threads, workspace as the block path.
    plan = cuda_build.launch_plan(128, 46_000, 4_050_032, (16, 64), batch=8)
    assert plan == ("cluster", 64, 46_000, "shared")
    assert cuda_build.launch_plan(256, optin, optin, (4, 256), batch=8) == ("cluster", 256, 0, "global")
    assert cuda_build.launch_plan(32, 5000, 6000, (4, 64), batch=8)[0] == "warp"  # small: warp path first


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_cluster_choice_from_the_sources():
    """cluster_blocks / cluster_threads, compiled out of the .cu: the issue's 8 x 1000 x 1000
    gets 16-block clusters (128 of 132 SMs), DINO's 900 x 100 at 16 problems 8 blocks; at
    B = 64 (a quarter of the SMs exceeded) and for small problems, no cluster."""
    sizes = cuda_build.launch_sizes([(1000, 1000, 8), (900, 100, 16), (900, 100, 64), (100, 20, 8),
                                     (300, 100, 33), (1000, 1000, 1)])
    assert [s[3] for s in sizes] == [(16, 64), (8, 128), (1, 928), (1, 128), (4, 96), (16, 64)]
    for *_, (k, t) in sizes:
        assert k * t <= 1024 and t % 32 == 0


def test_a_compile_error_fails():
    err = dict(name="attention_dq", source="x", config={}, settings=["s"], role="attention_bwd", tuned=True,
               error="CompilationError: boom")
    assert any("did not compile" in f for f in R.failures({"kernels": [R.finish_row(err)]}))


def _have_toolchain():
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if find_ptxas() is None:
        return "no ptxas (CUDA toolkit) found"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_have_toolchain() is not None, reason=str(_have_toolchain()))
def test_fresh_compile_meets_thresholds():
    """Compiles the default set (every attention config the autotuner can pick at UniT's encoder
    and decoder keys, the other Triton kernels, the LSA kernel): minutes on two cores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.kernel_report.triton_build", "--list"]
    listed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    expected = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    report = R.build()
    rows = report["kernels"]
    key = lambda r: (r["name"], json.dumps(r["config"], sort_keys=True))  # noqa: E731
    assert sorted(map(key, (r for r in rows if "threads" not in r["config"]))) == sorted(map(key, expected))
    for name in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        assert {s for r in rows if r["name"] == name for s in r["settings"]} >= {"unit_encoder_dc5",
                                                                              "unit_decoder_cross"}
    assert {r["role"] for r in rows} >= {"attention_fwd", "attention_bwd", "lsa_small", "lsa_large"}
    problems = R.failures(report)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)


def test_committed_report():
    assert os.path.exists(COMMITTED), "run python -m benchmarks.kernel_report and commit the JSON"
    with open(COMMITTED) as f:
        report = json.load(f)
    assert report["arch"] == "sm_90"
    assert report["triton"][0].isdigit() and "." in report["triton"]
    assert report["ptxas"][0].isdigit() and report["ptxas"].count(".") >= 1
    names = {r["name"] for r in report["kernels"]}
    assert {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "hungarian_match_lsa[warp]",
            "hungarian_match_lsa[block]"} <= names
    for row in report["kernels"]:
        if "error" not in row:
            assert all(k in row for k in ROW_FIELDS), row
            assert 0.0 <= row["warp_occupancy"] <= 1.0
        if "why" in row:
            assert row["why"].strip()
    assert "| kernel |" in R.table(report)
