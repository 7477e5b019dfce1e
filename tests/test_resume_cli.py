"""Resume and interrupt the way a user tries them: ``--resume`` past a torn newest checkpoint,
with a run folder or a file, alone (the newest run of the config), followed by overrides; the
checkpoint's config; SIGINT / SIGTERM write a checkpoint and print the command that resumes; no
folder before the run starts; each step once in log.jsonl and TensorBoard; one atomic writer."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.test_train import child_env, small_config
from unit_fast import atomic
from unit_fast.train import Trainer, main
from unit_fast.training import checkpoint as ckpt
from unit_fast.training.report import read_log
from unit_fast.training.stopping import GracefulStop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train_steps(run):
    return [r["step"] for r in read_log(os.path.join(run, "log.jsonl")) if r["event"] == "train"]


def _tensorboard_steps(run, tag="loss/total"):
    acc = EventAccumulator(os.path.join(run, "tensorboard"))  # honours the purge of a resumed run
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.fixture
def cli(train_cache, tmp_path, monkeypatch):
    """The small config's CLI arguments, run from an empty working folder (``runs/`` goes there)."""
    path, _ = small_config(tmp_path, train_cache)
    monkeypatch.chdir(tmp_path)
    return ["--config", path, f"data.cache_dir={train_cache}", "training.checkpoint_every=1"]


def test_resume_falls_back_past_a_torn_newest_checkpoint(cli, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*cli, "--output-dir", str(out), "training.max_updates=3"]) == 0
    torn = out / "checkpoints" / "checkpoint_00000003.pt"
    torn.write_bytes(torn.read_bytes()[:1000])  # a copy cut short
    capsys.readouterr()
    with pytest.warns(UserWarning, match=f"--resume: skipped {re.escape(str(torn))}: .* is truncated"):
        assert main(["--resume", str(out)]) == 0  # a run folder; the config is the checkpoint's
    captured = capsys.readouterr()
    assert "resumed from step 2 of 3" in captured.out
    assert _train_steps(out) == [1, 2, 3]  # step 3 of the first run was dropped, then redone
    assert _tensorboard_steps(out) == [1, 2, 3]  # TensorBoard hides the abandoned step 3
    assert ckpt.load(str(torn))["step"] == 3  # rewritten whole
    capsys.readouterr()
    assert main(["--resume", str(out), "model.base_args.enc_layers=2"]) == 2  # no longer the same model
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: ") and "does not fit" in err and err.count("\n") == 1, err


def test_resume_from_a_bad_file_is_one_line(cli, tmp_path, capsys):
    bad = tmp_path / "checkpoint_00000007.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert main([*cli, "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: ") and str(bad) in err and err.count("\n") == 1, err
    assert main([*cli, "--resume", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bare_resume_continues_the_newest_run_of_the_config(cli, tmp_path, capsys):
    assert main([*cli, "training.max_updates=2"]) == 0  # runs/small-<time>/
    (run,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    # "--resume key=value": the override is not taken for the PATH; the checkpoint's max_updates (2)
    # would end the run at once, the override given again moves it on.
    assert main(["--config", cli[1], "--resume", "training.max_updates=3"]) == 0
    printed = capsys.readouterr().out
    newest = os.path.join("runs", run.name, "checkpoints", "checkpoint_00000002.pt")
    assert f"resumed from step 2 of 3 ({newest})" in printed
    assert "overrides on top of its config: training.max_updates=3" in printed
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]  # the same folder, no new one
    assert _train_steps(run) == [1, 2, 3]
    # With no override the checkpoint's own config holds: max_updates 3, not the file's 4.
    assert main(["--resume", str(run / "checkpoints" / "checkpoint_00000003.pt")]) == 0
    assert "resumed from step 3 of 3" in capsys.readouterr().out and _train_steps(run) == [1, 2, 3]


def test_bare_resume_without_a_run_says_what_to_pass(cli, tmp_path, capsys):
    assert main([cli[0], cli[1], "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no run of config 'small'" in err and "--resume RUN_FOLDER" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args", [["data.root=/nonexistent/data"], ["training.accumulate=0"],
                                  ["training.init_from=/nonexistent.pth"]])
def test_a_failed_start_leaves_no_folder(cli, tmp_path, args, capsys):
    assert main([*cli, *args]) == 2
    assert not (tmp_path / "runs").exists()
    assert main([*cli, "--output-dir", str(tmp_path / "out"), *args]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_and_prints_the_resume_command(cli, tmp_path, sig, code):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "unit_fast.train", *cli, "--output-dir", str(out),
               "training.max_updates=500", "training.checkpoint_every=1000"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(_train_steps(out)) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err
    found = re.search(r"checkpoint of step (\d+) written; resume with: "
                      r"(python -m unit_fast\.train --resume \S+)", err)
    assert found, err
    step = int(found.group(1))
    assert 2 <= step < 500 and ckpt.latest(str(out / "checkpoints")).endswith(f"{step:08d}.pt")
    assert max(_train_steps(out)) == step  # the step under way when the signal came was finished
    assert not (out / "final_metrics.json").exists()
    printed = found.group(2).split()  # the command as printed, "python" being this interpreter
    resumed = subprocess.run([sys.executable, *printed[1:], f"training.max_updates={step + 1}"], cwd=tmp_path,
                             capture_output=True, text=True, env=child_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step} of {step + 1}" in resumed.stdout
    assert _train_steps(out) == list(range(1, step + 2)) and (out / "final_metrics.json").exists()


def test_a_second_signal_stops_at_once():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_second_signal_in_the_cli_is_one_message(cli, tmp_path, capsys, monkeypatch):
    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", stopped)
    assert main([*cli, "--output-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "stopped at once" in err and f"--resume {tmp_path / 'run'}" in err and "Traceback" not in err


def test_atomic_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") and os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "out.json"
    atomic.atomic_write(target, "{}", binary=False)
    assert target.read_text() == "{}"
    assert synced == [False, str(tmp_path)]  # the file's data, then the folder's new entry

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write(target, fail)
    assert target.read_text() == "{}" and os.listdir(tmp_path) == ["out.json"]  # old file kept, no temporary


def test_every_file_written_by_the_package_goes_through_atomic_write():
    """One writer: no other module renames a temporary file into place."""
    package = os.path.dirname(atomic.__file__)
    offenders = []
    for folder, _, files in os.walk(package):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != atomic.__file__:
                with open(path) as f:
                    if "os.replace(" in f.read():
                        offenders.append(os.path.relpath(path, package))
    assert offenders == []


def test_a_folder_of_runs_means_its_newest_run(cli, tmp_path, capsys):
    """``--checkpoint runs`` (evaluate, predict, export): the run whose newest checkpoint is newest."""
    from unit_fast.training.restore import read_checkpoint

    assert main([*cli, "--output-dir", str(tmp_path / "runs" / "small-a"), "training.max_updates=1"]) == 0
    older = tmp_path / "runs" / "small-a" / "checkpoints" / "checkpoint_00000001.pt"
    newer = tmp_path / "runs" / "small-b" / "checkpoints" / "checkpoint_00000001.pt"
    newer.parent.mkdir(parents=True)
    newer.write_bytes(older.read_bytes())
    os.utime(older, (1e9, 1e9))  # small-a's checkpoint is the older one, whatever the names say
    (tmp_path / "runs" / "not-a-run").mkdir()
    capsys.readouterr()
    assert os.path.abspath(read_checkpoint("runs").path) == str(newer)
    assert "using the newest run in runs: runs/small-b" in capsys.readouterr().err
    os.utime(newer, (1e8, 1e8))
    assert os.path.abspath(read_checkpoint("runs").path) == str(older)
    with pytest.raises(FileNotFoundError, match="no checkpoint_"):
        read_checkpoint(str(tmp_path / "runs" / "not-a-run"))


def _children(pid):
    """PIDs whose parent is ``pid`` (from /proc: torchrun's worker processes)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(cli, tmp_path):
    """Under DDP (2 gloo ranks) a SIGINT that reaches rank 1 only: the request rides on the step's
    loss all-reduce, so both ranks stop after the same step (no rank left waiting in a collective)
    and rank 0 writes that step's checkpoint."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen([*torchrun, "-m", "unit_fast.train", *cli, "--output-dir", str(out),
                             "training.max_updates=500", "training.checkpoint_every=1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline and len(_train_steps(out)) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    ranks = {}
    for pid in _children(proc.pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        ranks[int(env.get(b"RANK", b"-1"))] = pid
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGINT)
    _, err = proc.communicate(timeout=120)  # a rank stuck in a collective would hang here
    found = re.search(r"checkpoint of step (\d+) written", err)
    assert found, err[-3000:]
    step = int(found.group(1))
    assert ckpt.latest(str(out / "checkpoints")).endswith(f"{step:08d}.pt")
    assert max(_train_steps(out)) == step and step < 500
