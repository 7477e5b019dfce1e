"""README.md's "Train on your own data" and "adding a task" examples, run as written: the shell
blocks under ``<!-- example: own-data -->`` and ``<!-- example: add-task -->`` in a fresh folder
(synthetic files under names of their own trained, evaluated and predicted on; then a task added
to the trained model with everything else frozen)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.test_train import ONE_THREAD_ENV

README = Path(__file__).resolve().parents[1] / "README.md"


def example_block(name):
    text = README.read_text()
    match = re.search(rf"<!-- example: {name} -->\n```bash\n(.*?)\n```", text, re.S)
    assert match, f"README.md has no {name} example block"
    return match.group(1)


@pytest.mark.slow
def test_readme_own_data_example_runs_as_written(tmp_path):
    script = "set -euo pipefail\n" + example_block("own-data") + "\n" + example_block("add-task")
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=1500,
                          env={**ONE_THREAD_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [
                              str(README.parent), ONE_THREAD_ENV.get("PYTHONPATH", "")]))})
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    out = proc.stdout
    # The table of the run and of evaluate: the two datasets of their own names, nothing of default's.
    rows = [line.split()[:2] for line in out.splitlines()]
    assert rows.count(["widgets", "AP50"]) == 3 and rows.count(["reviews", "accuracy"]) == 3, out  # 2 runs, evaluate
    assert not any(r and r[0] in ("detection_coco", "glue_sst2") for r in rows)  # no table row of default's
    assert "widgets: " in out and "detection(s) with score >= 0.30" in out  # predict --image
    assert re.search(r"^reviews: [01]$", out, re.M), out  # predict --text: the label, a TSV value
    # Adding a task: the old datasets' and the shared weights bitwise the first run's, the new task's trained.
    first = torch.load(tmp_path / "runs/my_data/checkpoints/checkpoint_00000200.pt", weights_only=True)["model"]
    plus = torch.load(tmp_path / "runs/my_data_plus/checkpoints/checkpoint_00000100.pt", weights_only=True)
    assert set(first) < set(plus["model"])
    assert all(torch.equal(first[k], plus["model"][k]) for k in first)
    assert any(k.startswith("classifiers.glue.pairs.") for k in plus["model"])
    metrics = [json.loads((tmp_path / "runs" / run / "final_metrics.json").read_text())["metrics"]
               for run in ("my_data", "my_data_plus")]
    for ds in ("widgets", "reviews"):
        for name, value in metrics[0][ds].items():
            assert metrics[1][ds][name] == pytest.approx(value, abs=1e-3), (ds, name)
    assert "pairs" in metrics[1]
