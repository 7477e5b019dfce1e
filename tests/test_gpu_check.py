"""``python -m benchmarks.gpu_check`` on a CPU: the plan, --dry-run, the results writer, the exit
status, the sanitizer's refusal-as-skip, and that unit_fast works without pycocotools."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from benchmarks.gpu_check import plan as P
from benchmarks.gpu_check import sanitizer
from benchmarks.gpu_check.__main__ import main, run_plan
from benchmarks.gpu_check.report import Check, Run, case, exit_code, results_files, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("cuda", "cuda_ext", "triton", "compute-sanitizer", "torch_linear_assignment", "lapx")
ALL_PRESENT = dict.fromkeys(TOOLS)


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_plan_topics_dtypes_and_budget(quick):
    items = P.build_plan(quick, tools=ALL_PRESENT)
    assert {it.topic for it in items} == set(P.TOPICS)
    kinds = [it.kind for it in items]
    assert kinds == sorted(kinds, key=P.KINDS.index), "checks run first, benchmarks last"
    for it in items:
        if it.kind == "check" and not it.skip:
            assert set(it.dtypes) == {"bfloat16", "float16", "float32"}, it.key
    ran = [it for it in items if not it.skip]
    assert {it.topic for it in ran if it.kind == "check"} >= {"lsa", "matcher", "matching_cost", "box_loss",
                                                              "pairwise_giou", "attention"}
    assert {it.name for it in ran if it.kind == "sanitizer"} == {"memcheck", "racecheck"}
    assert {it.topic for it in ran if it.kind == "bench"} == {"lsa", "matcher", "matching_cost", "box_loss",
                                                              "attention", "unit_step"}
    check_s, total_s = P.estimate_s(items, quick)
    assert total_s <= (180 if quick else 420)
    assert total_s == check_s + (0 if quick else P.BUILD_S)
    if not quick:  # the full plan has every headline baseline and the autotuned configs
        attention = next(it for it in items if it.key == "attention/bench/fwdbwd")
        assert {"mha_need_weights", "flex_attention", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
                "sdpa_math"} <= set(attention.baselines)
        assert not next(it for it in items if it.name == "autotune_configs").skip


def test_plan_skips_say_why():
    tools = dict(ALL_PRESENT, **{"compute-sanitizer": "compute-sanitizer not on PATH",
                                 "torch_linear_assignment": "torch_linear_assignment is not installed"})
    items = P.build_plan(False, tools=tools)
    by_key = {it.key: it for it in items}
    assert by_key["lsa/sanitizer/memcheck"].skip == "compute-sanitizer not on PATH"
    assert by_key["lsa/bench/solver"].skip is None
    assert by_key["lsa/bench/solver"].skipped_baselines == {"torch_linear_assignment":
                                                             "torch_linear_assignment is not installed"}
    no_gpu = P.build_plan(False, tools=dict(tools, cuda="no CUDA device"))
    assert all(it.skip == "no CUDA device" for it in no_gpu)
    with pytest.raises(ValueError, match="unknown topic"):
        P.build_plan(False, only=["nope"], tools=ALL_PRESENT)


def test_dry_run_prints_the_plan(capsys):
    assert main(["--dry-run", "--quick", "--only", "lsa", "--only", "attention"]) == 0
    out = capsys.readouterr().out
    assert "solve_vs_scipy" in out and "memcheck" in out and "fwdbwd" in out
    assert "box_loss" not in out
    assert "fits" in out and "estimate" in out
    if P.probe_tools()["cuda"] is not None:  # on this CPU machine every item says why it is skipped
        assert "skipped: no CUDA device" in out


def _run():
    run = Run()
    run.checks += [Check("lsa", "solve_vs_scipy", "pass", "float32", "detr_coco_b64"),
                   Check("lsa", "sanitizer:memcheck", "skip", detail="refused")]
    run.add_case("lsa", case("detr_coco_b64", {"B": 64, "Q": 100, "T": 20}, "float32", 0.5,
                             {"scipy_loop": 2.0, "torch_linear_assignment": None}, 0, 3.25,
                             baselines_skipped={"torch_linear_assignment": "not installed"}))
    run.add_skip("attention", "attention/bench/fwdbwd", "time budget")
    return run


META = {"commit": "abc123", "device": "NVIDIA H200", "versions": {"torch": "2.11.0", "triton": "3.6.0",
                                                                   "cuda": "13.0", "python": "3.12.3"}}


def test_results_writer_round_trip(tmp_path):
    paths = results_files(_run(), META, str(tmp_path), date="2026-11-25")
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["2026-11-25-h200-attention.json", "2026-11-25-h200-lsa.json"]
    doc = json.loads((tmp_path / "2026-11-25-h200-lsa.json").read_text())
    assert {"topic", "commit", "device", "versions", "cases"} <= set(doc)  # shared/BENCHMARKS.md
    assert doc["topic"] == "lsa" and doc["device"] == "NVIDIA H200" and doc["commit"] == "abc123"
    (c,) = doc["cases"]
    assert {"name", "shape", "dtype", "metric", "unit_fast", "baselines", "host_syncs",
            "peak_mem_mb"} <= set(c)
    assert c["metric"] == "median_ms" and c["unit_fast"] == 0.5 and c["baselines"]["scipy_loop"] == 2.0
    assert [k["status"] for k in doc["checks"]] == ["pass", "skip"]
    attention = json.loads((tmp_path / "2026-11-25-h200-attention.json").read_text())
    assert attention["skipped"] == ["attention/bench/fwdbwd: time budget"]


def test_summary_table_and_exit_code():
    run = _run()
    text = summary(run)
    assert "detr_coco_b64" in text and "scipy_loop 2.0 (4.00x)" in text and "gpu_check: ok" in text
    assert exit_code(run.checks) == 0
    run.checks.append(Check("box_loss", "triton_vs_reference", "fail", "bfloat16", "pairs_1m",
                            "error 1 > 0.5"))
    assert exit_code(run.checks) == 1
    text = summary(run)
    assert "FAIL box_loss: triton_vs_reference bfloat16 pairs_1m: error 1 > 0.5" in text and "FAILED" in text


def test_runner_records_failures_skips_and_budget():
    items = P.build_plan(False, only=["box_loss"], tools=ALL_PRESENT)
    called = []

    def dispatch(item, run, quick):
        called.append(item.key)
        if item.kind == "check":
            raise RuntimeError("kernel broke")

    run = run_plan(items, False, budget_s=0.0, dispatch=dispatch)
    assert called == ["box_loss/check/triton_vs_reference"]  # the benchmark did not fit 0 s
    assert exit_code(run.checks) == 1 and "kernel broke" in run.checks[0].detail
    assert any("time budget" in s for s in run.skipped["box_loss"])


def test_no_cuda_is_not_a_pass(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--only", "box_loss"]) == 3


REFUSED = """========= COMPUTE-SANITIZER
========= Error: Device not supported
========= Program hit cudaErrorUnknown (error 999) due to "unknown error" on CUDA API call to cudaMalloc.
========= ERROR SUMMARY: 1 error
"""


def test_sanitizer_outcomes():
    assert sanitizer.classify(99, REFUSED)[0] == "skip"
    assert "Device not supported" in sanitizer.classify(99, REFUSED)[1]
    clean = "lsa_sanitize: 0 wrong total(s)\n========= ERROR SUMMARY: 0 errors\n"
    assert sanitizer.classify(0, clean)[0] == "pass"
    found = "========= Invalid __global__ read of size 4\n========= ERROR SUMMARY: 2 errors\n"
    assert sanitizer.classify(99, found)[0] == "fail"
    wrong = "lsa_sanitize: 1 wrong total(s)\n========= ERROR SUMMARY: 0 errors\n"
    assert sanitizer.classify(1, wrong)[0] == "fail"


def test_sanitizer_refusal_is_a_skip_end_to_end(tmp_path, monkeypatch):
    """A fake compute-sanitizer on PATH that refuses the device, as the gVisor machines' does."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text("#!/bin/sh\nprintf '%s' \"$REFUSAL\"\nexit 99\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("REFUSAL", REFUSED)
    item = next(it for it in P.build_plan(True, only=["lsa"], tools=ALL_PRESENT) if it.name == "memcheck")
    run = Run()
    sanitizer.run_sanitizer(item, run, quick=True)
    (rec,) = run.checks
    assert rec.status == "skip" and "Device not supported" in rec.detail
    assert exit_code(run.checks) == 0


BLOCKED = """
import sys
sys.modules["pycocotools"] = None  # import pycocotools now raises ImportError
import unit_fast, unit_fast.evaluation as E, unit_fast.train  # noqa: F401
import benchmarks.gpu_check.__main__ as G
assert G.main(["--dry-run", "--quick"]) == 0
vqa = E.AccuracyEvaluator()
import torch
vqa.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
assert vqa.compute()["accuracy"] == 0.5, vqa.compute()
try:
    E.DetectionEvaluator({"images": [], "annotations": [], "categories": []})
except ImportError as e:
    assert "pycocotools" in str(e)
else:
    raise AssertionError("DetectionEvaluator built without pycocotools")
print("ok")
"""


def test_works_without_pycocotools():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_on_request_topics_run_only_when_named(quick):
    items = {it.key: it for it in P.build_plan(quick, tools=ALL_PRESENT)}
    ptf = items["patch_transformers/bench/loss"]
    assert "--only patch_transformers" in ptf.skip and ptf.est_s == 0
    assert bool(items["moe_dispatch/check/triton_vs_reference"].skip) is not quick  # quick runs moe
    (named,) = P.build_plan(quick, only=["patch_transformers"], tools=ALL_PRESENT)
    assert named.skip is None and named.est_s > 0 and named.baselines == ("transformers",)
    assert P.estimate_s([named], quick)[1] <= P.budget_s(quick)


def test_patch_transformers_bench_times_patched_against_unpatched_on_cpu(monkeypatch):
    """The GPU bench's wiring, run on the CPU with CUDA-event timing faked and tiny settings:
    unit_fast is timed under the patch and transformers without it, after a passing check."""
    from benchmarks import bench_patch_transformers as X
    from benchmarks.gpu_check import bench
    from unit_fast.patch import transformers as PT

    monkeypatch.setitem(X.SETTINGS, "tiny_detr", ("DETR", 2, 5, 4, 2, 2))
    monkeypatch.setitem(X.SETTINGS, "tiny_rtdetr", ("RT-DETR", 2, 6, 4, 2, 2))
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    patched_at_call = []

    def fake_measure(fn, inputs):
        fn(inputs[0])
        patched_at_call.append(bool(PT._ORIGINALS))
        return {"ms": 1.0 + len(patched_at_call), "peak_mem_mb": None, "host_syncs": None}

    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "_free", lambda: None)  # torch.cuda.synchronize / empty_cache
    (item,) = P.build_plan(False, only=["patch_transformers"], tools=ALL_PRESENT)
    run = Run()
    bench.bench_patch_transformers(replace(item, shapes=("tiny_detr", "tiny_rtdetr")), run)
    assert [c.status for c in run.checks] == ["pass", "pass"], run.checks
    assert patched_at_call == [True, False, True, False]  # unit_fast patched, the baseline not
    assert not PT._ORIGINALS  # the patch is undone
    cases = run.cases["patch_transformers"]
    assert [c["name"] for c in cases] == ["tiny_detr", "tiny_rtdetr"]
    assert [(c["unit_fast"], c["baselines"]["transformers"]) for c in cases] == [(2.0, 3.0), (4.0, 5.0)]
