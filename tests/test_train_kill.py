"""A run killed with SIGKILL resumes from its last checkpoint, loses at most one checkpoint
interval, never leaves a corrupt checkpoint, and ends bitwise where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train import (
    ONE_THREAD_ENV,
    assert_same_params,
    params,
    small_config,
)
from unit_fast.train import Trainer
from unit_fast.training import checkpoint as ckpt
from unit_fast.training.report import read_log

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sigkill_mid_run_then_resume_is_exact(train_cache, tmp_path):
    every, total = 2, 6
    overrides = [f"data.cache_dir={train_cache}", f"training.max_updates={total}",
                 f"training.checkpoint_every={every}", "training.keep_checkpoints=10"]
    path, cfg = small_config(tmp_path, train_cache, *overrides)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "unit_fast.train", "--config", path, "--output-dir", str(out),
               *overrides]
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=ONE_THREAD_ENV)
        # Kill as soon as the first checkpoint is complete: 4 more steps, an evaluation and the
        # plots are still ahead, so the kill lands mid-run.
        first = out / "checkpoints" / "checkpoint_00000002.pt"
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, (tmp_path / "killed.err").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "final_metrics.json").exists()

    # Every file under a checkpoint's name loads; a partial write would only be a temporary.
    names = sorted(os.listdir(out / "checkpoints"))
    complete = ckpt.list_checkpoints(str(out / "checkpoints"))
    assert complete and all(ckpt.load(p)["step"] % every == 0 for p in complete)
    assert all(n.endswith(".pt") or ".pt.tmp-" in n for n in names), names
    logged = [r["step"] for r in read_log(str(out / "log.jsonl"))]  # a half-written last line is dropped
    last = ckpt.load(complete[-1])["step"]
    assert max(logged) - last <= every  # at most one checkpoint interval lost
    stale = out / "checkpoints" / "checkpoint_00000099.pt.tmp-12345"  # as if killed mid-save
    stale.write_bytes(b"half a checkpoint")

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300,
                             env=ONE_THREAD_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not stale.exists()  # temporaries of unfinished saves are cleaned up
    steps = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
             if r["event"] == "train"]
    assert steps == list(range(1, total + 1))  # the killed run's steps after its checkpoint are not doubled

    straight = Trainer(cfg, str(tmp_path / "straight"))
    straight.train(progress=False)
    final = ckpt.load(str(out / "checkpoints" / f"checkpoint_{total:08d}.pt"))
    assert final["step"] == total
    assert_same_params(final["model"], params(straight.model))
