"""Fine-tuning a trained model (issue 14 section 4): ``training.init_from`` with other class counts
(the heads whose shapes differ re-initialised and reported; ``training.init_strict``),
``training.freeze`` (patterns and presets; the rows of a shared task-token table masked), and a
dataset added to a trained run from the CLI with ``training.freeze=[shared]``."""

import fnmatch
import json

import pytest
import torch

from tests.test_train import params
from unit_fast.config import load_config
from unit_fast.models.checkpoint import load_mmf_checkpoint, save_mmf_checkpoint
from unit_fast.models.unit import build_model
from unit_fast.train import Trainer, main
from unit_fast.training.freeze import PRESETS, freeze
from unit_fast.training.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A small trainer config; ``{num_queries}`` says which datasets it serves.
CONFIG = """
model:
  base_args:
    backbone: resnet18
    lr_backbone: 0.0
    enc_layers: 1
    dec_layers: 1
    dim_feedforward: 32
    encoder_hidden_dim: 32
    decoder_hidden_dim: 32
    nheads: 2
    dropout: 0.0
    share_decoders: true
    use_task_embedding_in_img_encoder: true
    max_task_num: 16
    num_queries: {num_queries}
  heads:
    detection:
      detection_coco: {{task_idx: 0, num_classes: 7, use_attr: false}}
  bert:
    pretrained: null
    config: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32,
             max_position_embeddings: 64, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}
  use_task_embedding_in_lang_encoder: true
  max_task_num: 16
  classifier_dropout: 0.0
training:
  lr: 1.0e-3
  warmup_steps: 1
  max_updates: 2
  batch_size: 4
  sampling_mode: proportional
  log_every: 1
  eval_every: 0
  checkpoint_every: 1000
  device: cpu
data:
  synthetic: {{seed: 0, num_train: 16, num_val: 4, image_size: 64}}
  decoder: pil
  image_sizes: {{train_scales: [64], max_size: 96, test_size: 64, crop_scales: [64], crop_size: [48, 64]}}
  text_max_length: {{glue_sst2: 16, glue_qnli: 16}}
"""


def _config(directory, num_queries):
    path = str(directory / "finetune.yaml")
    with open(path, "w") as f:
        f.write(CONFIG.format(num_queries=json.dumps(num_queries)))
    return path


def _tiny(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(load_config("tiny", list(overrides)))


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# init_from with other class counts


def test_heads_of_other_sizes_are_reinitialised_whole(tmp_path):
    """A head with any shape unlike the checkpoint's keeps its fresh init, every key of it (the
    classifier's first layer has the same shape and is not loaded either; the no-object weight
    is); everything else loads.  Without ``reinit_mismatched_heads`` it is an error, as before."""
    trained = _tiny(seed=0)
    path = str(tmp_path / "a.pth")
    save_mmf_checkpoint(trained, path)
    other = _tiny("model.heads.detection.detection_coco.num_classes=4",
                  "model.heads.glue.glue_sst2.num_labels=5", seed=1)
    fresh = params(other)
    with pytest.raises(RuntimeError, match=r"(?s)shape mismatches .*class_embeds.detection_coco.weight: "
                                           r"checkpoint \(8, 48\) vs model \(5, 48\)"):
        load_mmf_checkpoint(path, other)
    report = load_mmf_checkpoint(path, other, reinit_mismatched_heads=True)
    heads = ("class_embeds.detection_coco.*", "det_losses.detection_coco.*", "classifiers.glue.glue_sst2.*")
    expected = sorted(k for k in fresh if any(fnmatch.fnmatchcase(k, h) for h in heads))
    assert "det_losses.detection_coco.empty_weight" in expected
    assert "classifiers.glue.glue_sst2.0.dense.weight" in expected  # same shape, still fresh
    assert report.reinitialized == expected and report.ok
    assert f"reinitialized ({len(expected)}): {expected[0]}, {expected[1]}" in str(report)
    source, now = trained.state_dict(), other.state_dict()
    wrong = [k for k in now if not torch.equal(now[k], fresh[k] if k in expected else source[k])]
    assert not wrong, wrong[:5]


def test_shape_mismatch_outside_the_heads_stays_an_error(tmp_path):
    path = str(tmp_path / "a.pth")
    save_mmf_checkpoint(_tiny(), path)
    other = _tiny("model.base_args.num_queries.detection.detection_coco=9",
                  "model.heads.detection.detection_coco.num_classes=4")
    with pytest.raises(RuntimeError, match=r"outside the output heads .*\n  "
                                           r"unit_base_model.query_embeds.detection.detection_coco.weight"):
        load_mmf_checkpoint(path, other, reinit_mismatched_heads=True)


def test_init_from_with_another_class_count(train_cache, tmp_path, capsys):
    """A detection_coco run with 7 classes, then ``init_from`` it with 9: the run starts, the
    report lists the head's keys, every other weight is the checkpoint's at step 0 and the head
    is the fresh init; ``training.init_strict=true`` makes it a one-line error (exit 2)."""
    path = _config(tmp_path, {"detection": {"detection_coco": 4}})
    first = Trainer(load_config(path, [f"data.cache_dir={train_cache}"]), str(tmp_path / "a"))
    first.train(progress=False)
    saved = tmp_path / "a" / "checkpoints" / "checkpoint_00000002.pt"
    source = torch.load(saved, weights_only=True)["model"]
    capsys.readouterr()

    more = [f"data.cache_dir={train_cache}", "model.heads.detection.detection_coco.num_classes=9",
            f"training.init_from={saved}"]
    run = Trainer(load_config(path, more), str(tmp_path / "b"))
    head = ["class_embeds.detection_coco.bias", "class_embeds.detection_coco.weight",
            "det_losses.detection_coco.empty_weight"]
    assert f"reinitialized (3): {', '.join(head)}" in capsys.readouterr().out
    record = _log(tmp_path / "b")[0]
    assert record["event"] == "init_from" and record["reinitialized"] == head and record["missing"] == []
    torch.manual_seed(run.cfg["training"]["seed"])
    fresh = build_model(run.cfg).state_dict()  # the initialisation the run starts from
    now = params(run.model)
    assert now["class_embeds.detection_coco.weight"].shape[0] == 10 and source[head[1]].shape[0] == 8
    wrong = [k for k in now if not torch.equal(now[k], fresh[k] if k in head else source[k])]
    assert not wrong, wrong[:5]
    run.train(max_updates=1, progress=False)
    assert run.step == 1

    rc = main(["--config", path, "--output-dir", str(tmp_path / "c"), *more, "training.init_strict=true"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: training.init_from: ") and err.count("\n") == 1, err
    assert "class_embeds.detection_coco.weight: checkpoint (8, 32) vs model (10, 32)" in err
    assert "training.init_strict=false" in err


# ---------------------------------------------------------------------------------------------
# training.freeze


def test_presets_freeze_exactly_what_they_say():
    model = _tiny()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    report = freeze(model, ["encoders"])
    frozen = trainable - {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = ("unit_base_model.backbone.", "unit_base_model.input_proj.",
                "unit_base_model.transformer.encoder.", "bert_model.")
    assert frozen == {n for n in trainable if n.startswith(prefixes)}
    assert report.frozen == {"encoders": len(frozen)} and not report.masked
    for name in ("unit_base_model.transformer.enc2dec_proj.weight", "bert_projection.weight",
                 "unit_base_model.transformer.task_embeddings_enc.weight", "task_embeddings_lang.weight",
                 "unit_base_model.transformer.decoder.layers.0.linear1.weight",
                 "classifiers.glue.glue_sst2.1.weight"):
        assert name in trainable - frozen
    assert PRESETS["backbone"] == ("unit_base_model.backbone.*",)

    model = _tiny()
    report = freeze(model, ["backbone", "classifiers.glue.*"])
    assert report.frozen["backbone"] == 15 and report.frozen["classifiers.glue.*"] == 12  # resnet18: layer2-4


@pytest.mark.parametrize("entries,message", [
    (["no_such_module.*"], "training.freeze: 'no_such_module.*' matches no parameter name"),
    ("backbone", "training.freeze must be a list"),
    (["*"], r"training.freeze: \['\*'\] freezes every parameter"),
    (["shared"], r"training.freeze: shared: the model has no dataset \['coco'\]"),
])
def test_bad_freeze_entries_name_the_key(entries, message):
    with pytest.raises(ValueError, match=message):
        freeze(_tiny(), entries, ["coco"])


def test_shared_trains_only_the_rows_of_the_trained_datasets():
    """``shared`` for glue_qnli: its own head and queries train, and of MMF's language task-token
    table only its row (task_idx 5).  The other rows get a zero gradient even when the loss
    reaches them (a NaN too), and sit in a group without weight decay: AdamW leaves them bitwise."""
    model = _tiny()
    report = freeze(model, ["shared"], ["glue_qnli"])
    table = "task_embeddings_lang.weight"
    assert report.masked == {table: [5]}
    per_dataset = {n for n, _ in model.dataset_parameters()["glue_qnli"]}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == per_dataset
    weight = model.task_embeddings_lang.weight
    before = weight.detach().clone()
    optimizer = build_optimizer(model, 1e-2, 1e-2, weight_decay=0.5, no_decay=report.no_decay)
    [group] = [g for g in optimizer.param_groups if any(p is weight for p in g["params"])]
    assert group["weight_decay"] == 0.0 and group["params"] == [weight]
    for _ in range(2):
        poison = torch.ones_like(weight)
        poison[3, 0] = float("nan")
        (weight * poison).sum().backward()  # a gradient on every row
        assert weight.grad[5].eq(1).all() and weight.grad[torch.arange(16) != 5].eq(0).all()
        optimizer.step()
        optimizer.zero_grad()
    rows = [i for i in range(16) if not torch.equal(before[i], weight[i])]
    assert rows == [5]


def test_frozen_batch_norm_keeps_its_running_statistics():
    """``backbone_norm: batch_norm``: a frozen backbone's BatchNorm layers also stop updating
    their statistics in training mode, so the old tasks' outputs cannot move through them."""
    model = _tiny("model.base_args.backbone_norm=batch_norm")
    report = freeze(model, ["backbone"])
    assert report.norms_in_eval == 20  # resnet18: every BatchNorm
    buffers = {k: v.clone() for k, v in model.unit_base_model.backbone.state_dict().items()}
    model.train()
    gen = torch.Generator().manual_seed(0)
    model({"dataset_name": "detection_coco", "image": [torch.randn(3, 64, 64, generator=gen)],
           "targets": [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]})
    after = model.unit_base_model.backbone.state_dict()
    assert all(torch.equal(buffers[k], after[k]) for k in buffers)


# ---------------------------------------------------------------------------------------------
# a dataset added to a trained run, from the CLI


def test_cli_adds_a_dataset_and_trains_only_it(train_cache, tmp_path, capsys):
    """2 steps on glue_sst2; then a run serving glue_sst2 and glue_qnli, ``init_from`` the first,
    ``training.freeze=[shared]``, sampling only glue_qnli: every weight of the first checkpoint
    (glue_sst2's and the shared ones) is bitwise the same but glue_qnli's task-token row (row 5
    of MMF's table; glue_sst2's row 7 stays), and glue_qnli's own parameters trained."""
    path = _config(tmp_path, {"glue": {"glue_sst2": 2}})
    base = ["--config", path, f"data.cache_dir={train_cache}"]
    assert main([*base, "--output-dir", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "checkpoints" / "checkpoint_00000002.pt"
    first = torch.load(saved, weights_only=True)["model"]
    add = ["model.base_args.num_queries.glue.glue_qnli=2", f"training.init_from={saved}",
           "training.freeze=[shared]", "training.sampling_mode=ratios",
           "training.sampling={glue_sst2: 0.0, glue_qnli: 1.0}",
           "training.weight_decay=0.1"]  # a decay that would move any decayed frozen row
    assert main([*base, "--output-dir", str(tmp_path / "b"), "training.max_updates=3", *add]) == 0
    second = torch.load(tmp_path / "b" / "checkpoints" / "checkpoint_00000003.pt", weights_only=True)["model"]

    table = "task_embeddings_lang.weight"
    assert [k for k in first if not torch.equal(first[k], second[k])] == [table]
    assert [i for i in range(len(first[table])) if not torch.equal(first[table][i], second[table][i])] == [5]
    record = next(r for r in _log(tmp_path / "b") if r["event"] == "freeze")
    assert record["masked_rows"] == {table: [5]} and record["trainable"] == 8  # the table + glue_qnli's 7
    assert list(record["frozen"]) == ["shared"] and record["frozen_total"] > 50

    capsys.readouterr()
    start = Trainer(load_config(path, [f"data.cache_dir={train_cache}", *add]), str(tmp_path / "c")).model
    own = [n for n, row in start.dataset_parameters()["glue_qnli"] if row is None]
    assert len(own) == 7  # queries + classifier
    initial = start.state_dict()
    assert all(not torch.equal(initial[n], second[n]) for n in own)
    rc = main([*base, "--output-dir", str(tmp_path / "d"), *add[:2], "training.freeze=[bert.*]"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: training.freeze: 'bert.*' matches no parameter name"), err
