"""``python -m unit_fast.train``: a CPU smoke run, exact resume, checkpoint hygiene, CLI errors."""

import json
import subprocess
import sys

import pytest
import torch

from unit_fast.config import load_config
from unit_fast.train import Trainer, main

TINY_RUN = [
    "data.synthetic.num_train=16", "data.synthetic.num_val=4", "data.synthetic.image_size=64",
    "data.image_sizes.train_scales=[64]", "data.image_sizes.test_size=64", "data.image_sizes.crop_scales=[64]",
    "data.image_sizes.crop_size=[48,64]", "data.image_sizes.max_size=96", "data.decode_backend=pil",
    "training.batch_size=2", "training.log_every=1", "training.warmup_steps=2",
    "model.base_args.dim_feedforward=64", "model.bert.config.intermediate_size=64",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _cfg(cache, *extra):
    return load_config("default", [f"data.cache_dir={cache}", *TINY_RUN, *extra])


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly(cache, tmp_path):
    """N steps straight == k steps, a resume from the checkpoint, N - k steps: bitwise on CPU
    (model, optimizer and schedule, task sampler, data streams and every RNG are restored)."""
    straight = Trainer(_cfg(cache, "training.max_updates=4"), str(tmp_path / "a"))
    straight.train(progress=False)
    first = Trainer(_cfg(cache, "training.max_updates=4", "training.checkpoint_every=2"), str(tmp_path / "b"))
    first.train(max_updates=2, progress=False)
    resumed = Trainer(_cfg(cache, "training.max_updates=4", "training.checkpoint_every=2"), str(tmp_path / "b"),
                      resume="latest")
    assert resumed.step == 2
    resumed.train(progress=False)
    a, b = _params(straight.model), _params(resumed.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    before = _params(Trainer(_cfg(cache), str(tmp_path / "c")).model)
    assert any(not torch.equal(a[k], before[k]) for k in a)  # training changed the weights


def test_checkpoints_are_atomic_and_pruned(cache, tmp_path):
    run = Trainer(_cfg(cache, "training.max_updates=3", "training.checkpoint_every=1",
                       "training.keep_checkpoints=2"), str(tmp_path))
    run.train(progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint_00000002.pt", "checkpoint_00000003.pt"]  # no temporaries, last 2 kept
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"step": 3' in lines[-1]


@pytest.mark.parametrize("args,message", [
    (["model.base_args.enc_layerz=3"], "unknown config key 'model.base_args.enc_layerz'"),
    (["training.lr"], "expected dotted.key=value"),
    (["--config", "no_such_config"], "unknown config 'no_such_config'"),
    (["data.root=/nonexistent/data"], "no data configured for ['detection_coco'"),
])
def test_cli_errors_are_one_line_and_exit_2(args, message, capsys, tmp_path):
    assert main(["--output-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_missing_dataset_path_names_the_key():
    from unit_fast.training.data import _need

    with pytest.raises(FileNotFoundError, match="data.datasets.vqa2.train.questions: '/nope.json' does not exist"):
        _need({"questions": "/nope.json"}, "questions", "vqa2", "train")
    with pytest.raises(ValueError, match="data.datasets.vqa2.val.images is not set"):
        _need({}, "images", "vqa2", "val")


def test_cli_smoke_run(cache, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "unit_fast.train", "--output-dir", str(tmp_path),
                           f"data.cache_dir={cache}", *TINY_RUN, "training.max_updates=2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "checkpoint_00000002.pt").exists()
    # The per-task table: every task of the default, its metric, chance level and result.
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["task", "metric", "chance", "result"])
    tasks = [line.split()[0] for line in lines[header + 2:header + 7]]
    assert tasks == ["detection_coco", "vqa2", "visual_entailment", "glue_sst2", "glue_qnli"]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["step"] == 2 and set(final["metrics"]["detection_coco"]) == {"AP", "AP50", "AP75"}
    assert final["chance"]["visual_entailment"] == pytest.approx(1 / 3, abs=1e-3)
