"""A run killed with SIGKILL resumes from its newest checkpoint, loses at most one checkpoint
interval, never leaves a corrupt checkpoint, and ends bitwise where an uninterrupted run ends.

The run has dropout on (every step draws torch RNG, so a resume that does not restore the RNG
state diverges) and is killed after several checkpoints (so a resume from an older one, or from
step 0, is told apart from a resume from the newest)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train import assert_same_params, child_env, params, small_config, train_losses
from unit_fast.config import load_config
from unit_fast.train import Trainer
from unit_fast.training import checkpoint as ckpt
from unit_fast.training.report import read_log

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sigkill_mid_run_then_resume_is_exact(train_cache, tmp_path):
    every, total, kill_after = 2, 8, 4
    overrides = [f"data.cache_dir={train_cache}", f"training.max_updates={total}",
                 f"training.checkpoint_every={every}", "training.keep_checkpoints=10",
                 "model.base_args.dropout=0.1"]  # random masks every step: the RNG state matters
    path, cfg = small_config(tmp_path, train_cache, *overrides)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "unit_fast.train", "--config", path, "--output-dir", str(out),
               *overrides]
    env = child_env()
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
        # Kill as soon as checkpoint 4 (the second) is complete: 4 more steps, an evaluation and
        # the plots are still ahead, so the kill lands mid-run.
        awaited = out / "checkpoints" / f"checkpoint_{kill_after:08d}.pt"
        deadline = time.monotonic() + 180
        while not awaited.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, (tmp_path / "killed.err").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "final_metrics.json").exists()

    # Every file under a checkpoint's name loads; a partial write would only be a temporary.
    names = sorted(os.listdir(out / "checkpoints"))
    complete = ckpt.list_checkpoints(str(out / "checkpoints"))
    saved = [ckpt.load(p)["step"] for p in complete]
    last = saved[-1]
    assert saved == list(range(every, last + 1, every)) and kill_after <= last < total, saved
    assert all(n.endswith(".pt") or ".pt.tmp-" in n for n in names), names
    killed_log = read_log(str(out / "log.jsonl"))  # a half-written last line is dropped
    logged = [r["step"] for r in killed_log]
    assert max(logged) - last <= every  # at most one checkpoint interval lost

    # A resume starts from the newest checkpoint: its step, its weights (on a copy of the
    # checkpoints, so the CLI resume below finds the folder as the kill left it).
    probe = tmp_path / "probe"
    shutil.copytree(out / "checkpoints", probe / "checkpoints", copy_function=os.link)
    resumed_here = Trainer(cfg, str(probe), resume="latest")
    assert resumed_here.step == last, f"resumed from step {resumed_here.step}, the newest checkpoint: {last}"
    assert_same_params(params(resumed_here.model), ckpt.load(complete[-1])["model"])
    resumed_here.log.close()

    stale = out / "checkpoints" / "checkpoint_00000099.pt.tmp-12345"  # as if killed mid-save
    stale.write_bytes(b"half a checkpoint")
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {last} of {total}" in resumed.stdout, resumed.stdout[-3000:]
    assert not stale.exists()  # temporaries of unfinished saves are cleaned up
    records = read_log(str(out / "log.jsonl"))
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == list(range(1, total + 1))  # the killed run's steps after its checkpoint are not doubled
    # The killed run's records up to its checkpoint are kept as written (timings included): a
    # resume from an earlier step would have rewritten some of them.
    kept = [r for r in killed_log if r["step"] <= last]
    assert records[:len(kept)] == kept

    # Straight through (no checkpoint on the way: saving does not change the training).
    straight_cfg = load_config(path, [*overrides, f"training.checkpoint_every={total}"])
    straight = Trainer(straight_cfg, str(tmp_path / "straight"))
    straight.train(progress=False)
    # Each step of the resumed segment has the uninterrupted run's loss (dropout masks included).
    assert train_losses(out) == train_losses(tmp_path / "straight")
    final = ckpt.load(str(out / "checkpoints" / f"checkpoint_{total:08d}.pt"))
    assert final["step"] == total
    assert_same_params(final["model"], params(straight.model))
