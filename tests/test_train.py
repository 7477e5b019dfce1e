"""``python -m unit_fast.train``: a CPU smoke run, exact resume, checkpoint hygiene, CLI errors."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from unit_fast.config import load_config
from unit_fast.train import Trainer, main

TINY_RUN = [
    "data.synthetic.num_train=16", "data.synthetic.num_val=4", "data.synthetic.image_size=64",
    "data.image_sizes.train_scales=[64]", "data.image_sizes.test_size=64",
    "data.image_sizes.crop_scales=[64]", "data.image_sizes.crop_size=[48,64]", "data.image_sizes.max_size=96",
    "data.decoder=pil",
    "training.batch_size=2", "training.log_every=1", "training.warmup_steps=2",
    "model.base_args.dim_feedforward=64", "model.bert.config.intermediate_size=64",
]


# A smaller run than the default config's, for the trainer's feature tests: two tasks (detection,
# whose loss all-reduces num_boxes under DDP, and a GLUE task), a frozen backbone (no backbone
# backward: the cheapest detection step), no dropout (ranks and runs draw no random masks).
SMALL_CONFIG = """
model:
  implementation: fast
  base_args:
    backbone: resnet18
    lr_backbone: 0.0
    enc_layers: 1
    dec_layers: 2
    dim_feedforward: 32
    encoder_hidden_dim: 32
    decoder_hidden_dim: 32
    nheads: 2
    dropout: 0.0
    share_decoders: true
    use_task_embedding_in_img_encoder: true
    max_task_num: 16
    num_queries: {detection: {detection_coco: 4}, glue: {glue_sst2: 2}}
  heads:
    detection:
      detection_coco: {task_idx: 0, num_classes: 7, use_attr: false}
  bert:
    pretrained: null
    config: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32,
             max_position_embeddings: 64, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}
  use_task_embedding_in_lang_encoder: true
  max_task_num: 16
  classifier_dropout: 0.0
training:
  lr: 1.0e-3
  warmup_steps: 2
  max_updates: 4
  batch_size: 4
  sampling_mode: proportional
  log_every: 1
  eval_every: 0
  checkpoint_every: 1000
  device: cpu
data:
  synthetic: {seed: 0, num_train: 16, num_val: 4, image_size: 64}
  decoder: pil
  image_sizes: {train_scales: [64], max_size: 96, test_size: 64, crop_scales: [64], crop_size: [48, 64]}
  text_max_length: {glue_sst2: 16}
"""


# Trainer tests run torch on one intra-op thread, subprocesses too (ONE_THREAD_ENV): on the 2-core
# CI machine a second OpenMP thread competing with any other busy process makes a step ~50x
# slower (spinning threads), and runs compared bitwise must use the same thread count anyway.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shared_cache(tmp_path_factory):
    """One synthetic-data cache for all trainer test modules of a session (generated once; the
    generation is atomic, so a module that finds it half-written cannot happen)."""
    path = tmp_path_factory.getbasetemp() / "unit_fast_cache"
    path.mkdir(exist_ok=True)
    return str(path)


def small_config(directory, train_cache, *overrides):
    """``(path, cfg)``: ``SMALL_CONFIG`` written to ``directory/small.yaml``, loaded with the
    ``cache`` and ``overrides``; pass the path and overrides to the CLI for the same run."""
    path = os.path.join(str(directory), "small.yaml")
    with open(path, "w") as f:
        f.write(SMALL_CONFIG)
    return path, load_config(path, [f"data.cache_dir={train_cache}", *overrides])


def params(model):
    """``{name: tensor}`` copies of a model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(a, b):
    """Bitwise equality of two state dicts, naming the first differing keys."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(train_cache, *extra):
    return load_config("default", [f"data.cache_dir={train_cache}", *TINY_RUN, *extra])


def test_resume_continues_exactly(train_cache, tmp_path):
    """N steps straight == k steps, a resume from the checkpoint, N - k steps: bitwise on CPU
    (model, optimizer and schedule, task sampler, data streams and every RNG are restored).
    Dropout is on, so the torch RNG state at the checkpoint decides the resumed steps' masks."""
    dropout = "model.base_args.dropout=0.1"
    straight = Trainer(_cfg(train_cache, dropout, "training.max_updates=4"), str(tmp_path / "a"))
    straight.train(progress=False)
    every2 = (dropout, "training.max_updates=4", "training.checkpoint_every=2")
    first = Trainer(_cfg(train_cache, *every2), str(tmp_path / "b"))
    first.train(max_updates=2, progress=False)
    resumed = Trainer(_cfg(train_cache, *every2), str(tmp_path / "b"), resume="latest")
    assert resumed.step == 2
    resumed.train(progress=False)
    # Step by step, the resumed segment's losses are the uninterrupted run's.
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    a = params(straight.model)
    assert_same_params(a, params(resumed.model))
    before = params(Trainer(_cfg(train_cache), str(tmp_path / "c")).model)
    assert any(not torch.equal(a[k], before[k]) for k in a)  # training changed the weights


def test_checkpoints_are_atomic_and_pruned(train_cache, tmp_path):
    run = Trainer(_cfg(train_cache, "training.max_updates=3", "training.checkpoint_every=1",
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

    message = "data.datasets.vqa2.train.questions: '/nope.json' does not exist"
    with pytest.raises(FileNotFoundError, match=message):
        _need({"questions": "/nope.json"}, "questions", "vqa2", "train")
    with pytest.raises(ValueError, match="data.datasets.vqa2.val.images is not set"):
        _need({}, "images", "vqa2", "val")


def test_cli_smoke_run(train_cache, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "unit_fast.train", "--output-dir", str(tmp_path),
                           f"data.cache_dir={train_cache}", *TINY_RUN, "training.max_updates=2"],
                          capture_output=True, text=True, timeout=600, env=ONE_THREAD_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "checkpoint_00000002.pt").exists()
    # The per-task table: every task of the default, its metric, chance level and result.
    lines = proc.stdout.splitlines()
    columns = ["task", "metric", "chance", "result"]
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == columns)
    tasks = [line.split()[0] for line in lines[header + 2:header + 7]]
    assert tasks == ["detection_coco", "vqa2", "visual_entailment", "glue_sst2", "glue_qnli"]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["step"] == 2 and set(final["metrics"]["detection_coco"]) == {"AP", "AP50", "AP75"}
    assert final["chance"]["visual_entailment"] == pytest.approx(1 / 3, abs=1e-3)


def test_real_data_without_tokenizer_is_a_clear_error(train_cache):
    """``data.root`` set (real data), no ``data.tokenizer`` and a from-scratch BERT: nothing says
    which vocabulary to use -> a ValueError naming both keys (not a TypeError from deep inside)."""
    from unit_fast.training.data import build_data, synthetic_paths, synthetic_root

    cfg = _cfg(train_cache)
    root = synthetic_root(cfg["data"])
    cfg["data"]["root"] = root
    cfg["data"]["datasets"] = synthetic_paths(root)
    with pytest.raises(ValueError, match="set data.tokenizer .* or model.bert.pretrained"):
        build_data(cfg, ["glue_sst2"])
    cfg["data"]["tokenizer"] = f"{root}/vocab.txt"
    assert len(build_data(cfg, ["glue_sst2"]).train["glue_sst2"]) > 0


def test_table_shows_targets_and_whether_they_are_met():
    from unit_fast.training.evaluation_loop import format_table, targets_met

    results = {"detection_coco": {"AP50": 0.31, "AP": 0.1}, "glue_sst2": {"accuracy": 0.84}, "vqa2": {"accuracy": 0.6}}
    targets = {"detection_coco": 0.3, "glue_sst2": 0.9}
    assert targets_met(results, targets) == {"detection_coco": True, "glue_sst2": False}
    lines = format_table(results, {"glue_sst2": 0.5}, targets).splitlines()
    assert lines[0].split() == ["task", "metric", "chance", "result", "target", "met"]
    assert lines[2].split() == ["detection_coco", "AP50", "-", "0.310", "0.300", "yes"]
    assert lines[3].split() == ["glue_sst2", "accuracy", "0.500", "0.840", "0.900", "NO"]
    assert lines[4].split() == ["vqa2", "accuracy", "-", "0.600", "-", "-"]
    assert format_table(results, {}).splitlines()[0].split() == ["task", "metric", "chance", "result"]


def child_env():
    """``ONE_THREAD_ENV`` for a subprocess that must import this very ``unit_fast`` (the checkout
    the tests run from, not an installed copy): its root goes first on ``PYTHONPATH``."""
    import unit_fast

    root = os.path.dirname(os.path.dirname(os.path.abspath(unit_fast.__file__)))
    path = [root, *filter(None, ONE_THREAD_ENV.get("PYTHONPATH", "").split(os.pathsep))]
    return {**ONE_THREAD_ENV, "PYTHONPATH": os.pathsep.join(path)}


def train_losses(output_dir):
    """``{step: loss}`` of the train records in ``output_dir/log.jsonl``."""
    from unit_fast.training.report import read_log

    return {r["step"]: r["loss"] for r in read_log(os.path.join(str(output_dir), "log.jsonl"))
            if r["event"] == "train"}
