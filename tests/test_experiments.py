"""``experiments/``: each experiment's ``--smoke`` run as a subprocess (as a user runs it) into a
temporary folder; its JSON has the expected structure, every number is finite, the baseline's
smoke metric is a finite accuracy, and the PNG is written.  About a minute in all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import add_task, conditioning, moe_capacity, sampling, weighting
from experiments.common import all_finite

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(name, out):
    """Run ``python -m experiments.<name> --smoke --out out`` from the repository root; the JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", f"experiments.{name}", "--smoke", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    png = out / f"{name}.png"
    assert png.is_file() and png.stat().st_size > 1000, f"{png} missing or empty"
    return json.loads((out / f"{name}.json").read_text())


def check_stat(stat, n):
    """A ``mean_std`` dict over ``n`` seeds."""
    assert set(stat) == {"mean", "std", "values"}, stat
    assert len(stat["values"]) == n


def check_common(data, name, baseline):
    assert data["experiment"] == name and data["smoke"] is True
    assert data["baseline"] == baseline
    assert all_finite(data), f"{name}: a non-finite number in the JSON"
    return len(data["config"]["seeds"])


@pytest.mark.parametrize("name", ["sampling", "weighting", "conditioning", "moe_capacity", "add_task"])
def test_smoke(name, tmp_path):
    data = run_smoke(name, tmp_path)
    CHECKS[name](data)


def check_sampling(data):
    n = check_common(data, "sampling", "proportional")
    tasks = list(sampling.SMOKE["sizes"])
    summary = data["summary"]
    assert list(summary) == list(sampling.METHODS)
    for method, s in summary.items():
        assert set(s["accuracy"]) == {*tasks, "macro"}, method
        timings = ("seconds", "overhead_vs_proportional", "overhead_own", "probe_seconds", "select_seconds")
        for stat in (*s["accuracy"].values(), s["macro_gain_vs_proportional"], *s["draw_share"].values(),
                     *(s[k] for k in timings)):
            check_stat(stat, n)
        assert abs(sum(v["mean"] for v in s["draw_share"].values()) - 1.0) < 1e-6, method
    assert 0.0 <= summary["proportional"]["accuracy"]["macro"]["mean"] <= 1.0
    assert summary["proportional"]["probe_seconds"]["mean"] == 0.0  # only the uncertainty samplers probe
    assert summary["uncertainty_task_example"]["select_seconds"]["mean"] > 0.0
    for method in ("uncertainty_task", "uncertainty_task_example"):
        u = summary[method]["uncertainty_over_training"]
        assert set(u) == set(tasks) and all(0.0 <= x <= 1.0 for v in u.values() for x in v)


def check_weighting(data):
    n = check_common(data, "weighting", "fixed")
    tasks = list(weighting.SMOKE["sizes"])
    summary = data["summary"]
    assert list(summary) == [*weighting.WEIGHTINGS, *weighting.AGGREGATORS]
    for method, s in summary.items():
        assert set(s["metric"]) == set(tasks), method
        for stat in (*s["metric"].values(), s["seconds"]):
            check_stat(stat, n)
    for method in weighting.WEIGHTINGS:
        assert set(summary[method]["final_weights"]) == set(tasks)
    for method in weighting.AGGREGATORS:
        check_stat(summary[method]["mean_grad_cosine"], n)
    for task in ("cls4", "cls16"):
        assert 0.0 <= summary["fixed"]["metric"][task]["mean"] <= 1.0


def check_conditioning(data):
    n = check_common(data, "conditioning", "none")
    summary = data["summary"]
    assert list(summary) == list(conditioning.VARIANTS)
    for variant, s in summary.items():
        assert set(s["accuracy"]) == set(conditioning.TASKS), variant
        for stat in (*s["accuracy"].values(), s["mean_accuracy"], s["gain_vs_none"], s["seconds"]):
            check_stat(stat, n)
    assert summary["none"]["added_parameters"] == 0
    assert all(s["added_parameters"] > 0 for v, s in summary.items() if v != "none")
    assert 0.0 <= summary["none"]["mean_accuracy"]["mean"] <= 1.0


def check_moe_capacity(data):
    n = check_common(data, "moe_capacity", "dense_small")
    summary = data["summary"]
    assert list(summary) == list(moe_capacity.VARIANTS)
    for variant, s in summary.items():
        assert set(s["mse"]) == set(moe_capacity.TASKS), variant
        for stat in (*s["mse"].values(), s["mean_mse"], s["gain_vs_dense_small"], s["seconds"]):
            check_stat(stat, n)
        is_moe = variant.startswith("moe")
        assert ("cv_load" in s) == is_moe and ("mi_bits" in s) == is_moe, variant
        if is_moe:
            for key in ("cv_load", "mi_bits", "cv_load_train", "mi_bits_train"):
                check_stat(s[key], n)
            assert all(0.0 <= x <= data["max_cv_load"] + 1e-6 for x in s["cv_load"]["values"]), variant
            assert all(-1e-6 <= x <= 3.0 + 1e-6 for x in s["mi_bits"]["values"]), variant
    small, moe1 = summary["dense_small"], summary["moe_k1"]
    # the same active expert FLOPs (+ the gate)
    assert moe1["ffn_mult_adds_per_token"] < 2 * small["ffn_mult_adds_per_token"]
    assert moe1["ffn_parameters"] > 6 * small["ffn_parameters"]
    assert abs(summary["dense_8x"]["ffn_parameters"] / moe1["ffn_parameters"] - 1) < 0.1  # same parameters


def check_add_task(data):
    n = check_common(data, "add_task", "plain")
    summary = data["summary"]
    assert list(summary) == list(add_task.VARIANTS)
    for variant, s in summary.items():
        for key in ("joint_accuracy", "added_accuracy", "ratio", "ratio_chance_corrected"):
            assert set(s[key]) == set(add_task.TASKS), (variant, key)
            for stat in s[key].values():
                check_stat(stat, n)
        check_stat(s["mean_ratio"], n)
        assert s["all_old_params_bitwise_equal"] is True and s["all_old_outputs_bitwise_equal"] is True
        assert all(p.startswith(("query_embed.", "heads.", "medusa.")) for p in s["trained_parameters"])
    assert not any(p.startswith("medusa.") for p in summary["plain"]["trained_parameters"])
    multiscale = summary["feature+multiscale"]["trained_parameters"]
    assert any(p.startswith("medusa.layer_logits.") for p in multiscale)


CHECKS = {"sampling": check_sampling, "weighting": check_weighting, "conditioning": check_conditioning,
          "moe_capacity": check_moe_capacity, "add_task": check_add_task}
