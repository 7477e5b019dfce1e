"""``experiments/``: each experiment's ``--smoke`` run as a subprocess (as a user runs it) into a
temporary folder; its JSON has the expected structure, every number is finite, the baseline's
smoke metric is a finite accuracy, and the PNG is written.  About a minute in all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import conditioning, sampling, weighting
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


@pytest.mark.parametrize("name", ["sampling", "weighting", "conditioning"])
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


CHECKS = {"sampling": check_sampling, "weighting": check_weighting, "conditioning": check_conditioning}
