"""Your own datasets by config alone (issue 14 §2): one custom dataset of every task kind, made from
the synthetic generator's files under names of its own, trained, evaluated and predicted on end to
end; class counts from the data; every bad input a one-line error naming the dataset and key."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.test_train import ONE_THREAD_ENV
from unit_fast.config import load_config
from unit_fast.data.synthetic import generate
from unit_fast.tasks import resolve_run_config
from unit_fast.training.data import build_data, configure_model

CPU_SIZED = {
    "model": {"base_args": {"dim_feedforward": 64,
                            "num_queries": {"detection": {"widgets": 5}, "vl": {"quiz": 3, "scenes": 3},
                                            "glue": {"reviews": 3}}},
              "bert": {"config": {"intermediate_size": 64}}},
    "training": {"batch_size": 2, "warmup_steps": 1, "max_updates": 2, "log_every": 1, "eval_every": 0,
                 "device": "cpu", "sampling": {"widgets": 0.25, "quiz": 0.25, "scenes": 0.25, "reviews": 0.25},
                 "targets": {"widgets": 0.0, "reviews": 2.0}},
    "data": {"decoder": "pil", "image_sizes": {"train_scales": [64], "max_size": 96, "test_size": 64,
                                               "crop_scales": [64], "crop_size": [48, 64]}},
}


def _datasets(root):
    return {
        "widgets": {"kind": "detection",
                    "train": {"annotations": f"{root}/coco/annotations/instances_train2017.json",
                              "images": f"{root}/coco/train2017"},
                    "val": {"annotations": f"{root}/coco/annotations/instances_val2017.json",
                            "images": f"{root}/coco/val2017"}},
        "quiz": {"kind": "vqa",
                 "train": {"questions": f"{root}/vqa2/v2_OpenEnded_mscoco_train2014_questions.json",
                           "annotations": f"{root}/vqa2/v2_mscoco_train2014_annotations.json",
                           "images": f"{root}/coco/train2017"},
                 "val": {"questions": f"{root}/vqa2/v2_OpenEnded_mscoco_val2014_questions.json",
                         "annotations": f"{root}/vqa2/v2_mscoco_val2014_annotations.json",
                         "images": f"{root}/coco/val2017"}},
        "scenes": {"kind": "image_text_classification",
                   "train": {"jsonl": f"{root}/snli_ve/snli_ve_train.jsonl", "images": f"{root}/snli_ve/images"},
                   "val": {"jsonl": f"{root}/snli_ve/snli_ve_dev.jsonl", "images": f"{root}/snli_ve/images"}},
        "reviews": {"kind": "text_classification",
                    "train": {"tsv": f"{root}/glue/SST-2/train.tsv", "text_columns": ["sentence"],
                              "label_column": "label"},
                    "val": {"tsv": f"{root}/glue/SST-2/dev.tsv", "text_columns": ["sentence"],
                            "label_column": "label"}},
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(str(out), seed=0, num_train=16, num_val=4, image_size=64)
    return out


def _config(root, tmp_path, **extra):
    """A YAML config on ``base: default`` declaring the four custom datasets; its path."""
    cfg = {"base": "default", **yaml.safe_load(yaml.safe_dump(CPU_SIZED))}
    cfg["data"]["datasets"] = _datasets(root)
    cfg["data"]["tokenizer"] = f"{root}/vocab.txt"
    for key, value in extra.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=900,
                          env=ONE_THREAD_ENV)


def test_custom_datasets_train_evaluate_predict(root, tmp_path):
    out = tmp_path / "run"
    proc = _run("unit_fast.train", "--config", _config(root, tmp_path), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())
    # The declared set wins over default's five datasets.
    assert list(final["metrics"]) == ["widgets", "quiz", "scenes", "reviews"]
    assert set(final["metrics"]["widgets"]) >= {"AP", "AP50"} and "accuracy" in final["metrics"]["reviews"]
    # The targets table: by each dataset's headline metric (AP50 >= 0 always; accuracy >= 2 never).
    assert final["targets_met"] == {"widgets": True, "reviews": False}
    assert any(line.split()[:2] == ["reviews", "accuracy"] and line.split()[-1] == "NO"
               for line in proc.stdout.splitlines()), proc.stdout
    ckpt = out / "checkpoints" / "checkpoint_00000002.pt"
    state = __import__("torch").load(ckpt, weights_only=True)
    keys = state["model"].keys()
    assert "class_embeds.widgets.weight" in keys and "classifiers.glue.reviews.1.weight" in keys
    assert not any("detection_coco" in k or "glue_sst2" in k for k in keys)
    # Class counts from the data: synthetic category ids 1, 3, 6 -> 7 classes (+ no-object);
    # SST-2's labels "0", "1" -> 2; SNLI-VE's three; the answer vocabulary's size.
    assert state["model"]["class_embeds.widgets.weight"].shape[0] == 8
    assert state["model"]["classifiers.glue.reviews.1.weight"].shape[0] == 2
    assert state["model"]["classifiers.vl.scenes.1.weight"].shape[0] == 3
    meta = state["meta"]["datasets"]
    assert meta["reviews"]["labels"] == ["0", "1"] and meta["scenes"]["kind"] == "image_text_classification"
    assert state["model"]["classifiers.vl.quiz.1.weight"].shape[0] == len(meta["quiz"]["answers"])

    proc = _run("unit_fast.evaluate", "--checkpoint", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.splitlines()
    for ds, metric in (("widgets", "AP50"), ("quiz", "accuracy"), ("scenes", "accuracy"), ("reviews", "accuracy")):
        assert any(line.split()[:2] == [ds, metric] for line in table), proc.stdout

    image = str(root / "coco" / "val2017" / sorted(p.name for p in (root / "coco" / "val2017").iterdir())[0])
    for args, check in (
        (["--image", image], lambda r: r["dataset"] == "widgets" and "detections" in r),
        (["--image", image, "--question", "How many circles are there?"],
         lambda r: r["dataset"] == "quiz" and r["answer"] in meta["quiz"]["answers"]),
        (["--image", image, "--hypothesis", "There is a red circle."],
         lambda r: r["dataset"] == "scenes" and r["label"] in meta["scenes"]["labels"]),
        (["--text", "the plot never drags"], lambda r: r["dataset"] == "reviews" and r["label"] in ("0", "1")),
    ):
        proc = _run("unit_fast.predict", "--checkpoint", str(out), "--json", "--threshold", "0", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert check(json.loads(proc.stdout)), proc.stdout


def _resolved(root, tmp_path, *overrides):
    cfg = load_config(_config(root, tmp_path), list(overrides))
    resolve_run_config(cfg)
    return cfg


def test_declared_set_replaces_the_base_configs_datasets(root, tmp_path):
    cfg = _resolved(root, tmp_path)
    nq = cfg["model"]["base_args"]["num_queries"]
    assert nq == {"detection": {"widgets": 5}, "vl": {"quiz": 3, "scenes": 3}, "glue": {"reviews": 3}}
    assert set(cfg["training"]["sampling"]) == {"widgets", "quiz", "scenes", "reviews"}
    assert cfg["training"]["targets"] == {"widgets": 0.0, "reviews": 2.0}  # default's five are dropped
    heads = cfg["model"]["heads"]
    assert heads["glue"]["reviews"]["kind"] == "text_classification"
    assert heads["detection"]["widgets"]["task_token"] == "own"  # no MMF task index to collide with
    # Queries from the kind's defaults when the config has none for a dataset.
    cfg = load_config(_config(root, tmp_path))
    del cfg["model"]["base_args"]["num_queries"]["detection"]["widgets"]
    resolve_run_config(cfg)
    assert cfg["model"]["base_args"]["num_queries"]["detection"] == {"widgets": 100}


def test_counts_come_from_the_data_and_the_config_overrides_them(root, tmp_path):
    cfg = _resolved(root, tmp_path, "model.heads.glue.reviews.num_labels=5")
    data = build_data(cfg, ["widgets", "reviews"])
    configure_model(cfg, data)
    heads = cfg["model"]["heads"]
    assert heads["detection"]["widgets"]["num_classes"] == 7 and heads["glue"]["reviews"]["num_labels"] == 5
    assert data.dataset_info["reviews"]["labels"] == ["0", "1"]
    cfg = _resolved(root, tmp_path, "model.heads.detection.widgets.num_classes=3")
    with pytest.raises(ValueError, match=r"model.heads.detection.widgets.num_classes=3 cannot hold .* set it to 7"):
        configure_model(cfg, build_data(cfg, ["widgets"]))


def _error(root, tmp_path, capsys, *overrides):
    from unit_fast.train import main

    assert main(["--config", _config(root, tmp_path), "--output-dir", str(tmp_path / "out"), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_custom_datasets_are_one_line_errors(root, tmp_path, capsys):
    assert "data.datasets.reviews.kind: unknown task kind 'sentiment'" in _error(
        root, tmp_path, capsys, "data.datasets.reviews.kind=sentiment")
    err = _error(root, tmp_path, capsys, f"data.datasets.reviews.val.tsv={tmp_path}/nope.tsv")
    assert "data.datasets.reviews.val.tsv" in err and "nope.tsv" in err
    assert "unknown key data.datasets.reviews.train.label_col" in _error(
        root, tmp_path, capsys, "data.datasets.reviews.train.label_col=label")
    assert "unknown key(s) ['num_clases'] in model.heads.detection.widgets" in _error(
        root, tmp_path, capsys, "model.heads.detection.widgets.num_clases=3")
    assert "data.datasets.reviews.kind is not set" in _error(root, tmp_path, capsys, "data.datasets.reviews.kind=null")
    assert "no tokenizer for quiz, scenes, reviews" in _error(root, tmp_path, capsys, "data.tokenizer=null",
                                                              "model.bert.pretrained=null")


def test_val_label_missing_from_train_names_dataset_and_key(root, tmp_path, capsys):
    dev = tmp_path / "dev.tsv"
    lines = (root / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()
    dev.write_text("\n".join([lines[0], lines[1], "a new kind of sentence\t7"]) + "\n")
    err = _error(root, tmp_path, capsys, f"data.datasets.reviews.val.tsv={dev}")
    assert "data.datasets.reviews.val: label(s) ['7'] do not occur in train" in err


def test_register_task_kind_from_user_code(root, tmp_path):
    """A kind added from user code is used by config like a built-in one; names are unique."""
    import torch

    from unit_fast.data.datasets import BatchCollator
    from unit_fast.models.unit import build_model
    from unit_fast.tasks import KINDS, register_task_kind
    from unit_fast.tasks.text import TextClassificationKind

    class Shouting(TextClassificationKind):  # text classification that reads its text upper-cased
        name = "shouting_text"
        headline = "accuracy"

        def read(self, ctx, ds, split, paths):
            dataset = super().read(ctx, ds, split, paths)
            for r in dataset.records:
                r.text_a = r.text_a.upper()
            return dataset

    register_task_kind(Shouting())
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_task_kind(Shouting())
        cfg = _resolved(root, tmp_path, "data.datasets.reviews.kind=shouting_text")
        assert cfg["model"]["heads"]["glue"]["reviews"]["kind"] == "shouting_text"
        data = build_data(cfg, list(cfg["data"]["datasets"]))
        configure_model(cfg, data)
        assert data.kinds["reviews"] is KINDS["shouting_text"]
        assert data.train["reviews"].records[0].text_a.isupper()
        model = build_model(cfg)
        assert type(model.kinds["reviews"]) is Shouting
        batch = BatchCollator("reviews")([data.train["reviews"][i] for i in range(2)])
        assert torch.isfinite(model(batch)["losses"]["train/reviews/loss_0"])
    finally:
        KINDS.pop("shouting_text", None)


def test_vqa_evaluation_skips_an_unreadable_val_image(root, tmp_path):
    """One unreadable val image under on_error=skip: the VQA evaluator scores the other
    questions, each against its own record (the batch's ``indices``), not a shifted one."""
    import shutil

    from unit_fast.evaluation import VQAEvaluator
    from unit_fast.models.unit import build_model
    from unit_fast.training.evaluation_loop import evaluate_datasets

    images = tmp_path / "val_images"
    shutil.copytree(root / "coco" / "val2017", images)
    cfg = _resolved(root, tmp_path, "data.on_error=skip", f"data.datasets.quiz.val.images={images}")
    data = build_data(cfg, list(cfg["data"]["datasets"]))
    configure_model(cfg, data)
    records = data.val["quiz"].records
    bad = records[0].image_path
    open(bad, "wb").write(b"not a jpeg")
    model = build_model(cfg)
    kind, seen = data.kinds["quiz"], []
    make = kind.evaluator
    kind.evaluator = lambda *a: seen.append(make(*a)) or seen[-1]  # keep the loop's evaluator
    try:
        got = evaluate_datasets(model, data, cfg, __import__("torch").device("cpu"), batch_size=64, datasets=["quiz"])["quiz"]["accuracy"]
    finally:
        del kind.evaluator
    # The same model, scored by hand on the questions whose image reads, each with its record.
    from unit_fast.data.datasets import BatchCollator

    kept = [i for i, r in enumerate(records) if r.image_path != bad]
    ev = VQAEvaluator(data.dataset_info["quiz"]["answers"])
    model.eval()
    with __import__("torch").no_grad():
        for i in kept:
            batch = BatchCollator("quiz", decoder="pil", dataset_type="val")([data.val["quiz"][i]])
            batch.pop("targets")
            ev.update(model(batch)["scores"], [records[i]])
    assert 0 < len(kept) < len(records)
    assert seen[0].state()["ids"] == [records[i].question_id for i in kept]  # each scored with its record
    assert got == pytest.approx(ev.compute()["accuracy"], abs=1e-6)


def test_visual_genome_attributes_by_config(root, tmp_path, capsys):
    """A detection set with ``attributes: true`` (MMF's Visual Genome layout) gets an attribute
    head; an attribute count the data's ids do not fit is a one-line error naming the key."""
    vg = {"kind": "detection", "attributes": True,
          **{s: {"annotations": f"{root}/visual_genome/annotations/instances_{s}.json",
                 "images": f"{root}/visual_genome/images"} for s in ("train", "val")}}
    cfg = _resolved(root, tmp_path, f"data.datasets={{shapes: {json.dumps(vg)}}}",
                    "model.base_args.num_queries={detection: {shapes: 5}}", "training.sampling={}")
    assert cfg["model"]["heads"]["detection"]["shapes"]["use_attr"] is True
    data = build_data(cfg, ["shapes"])
    message = r"model.base_args.attribute_class_num=5 cannot hold data.datasets.shapes's attribute ids \(largest 11\)"
    with pytest.raises(ValueError, match=message):
        cfg["model"]["base_args"]["attribute_class_num"] = 5
        configure_model(cfg, data)
    cfg["model"]["base_args"]["attribute_class_num"] = 12
    configure_model(cfg, data)
    assert cfg["model"]["heads"]["detection"]["shapes"]["num_classes"] == 6
    assert data.train["shapes"].records[0].attributes is not None


def test_mnli_checkpoint_evaluates_on_the_matched_dev_split(root, tmp_path):
    """MMF's glue_mnli_mismatched scores dev_mismatched; README's line evaluates the same
    checkpoint on the synthetic dev_matched.tsv by declaring it as the val file."""
    from tests.test_train import TINY_RUN
    from unit_fast import evaluate
    from unit_fast.train import main

    mnli, out, results = root / "glue" / "MNLI", tmp_path / "run", tmp_path / "m.json"
    files = lambda dev: [f"data.tokenizer={root}/vocab.txt",  # noqa: E731
                         f"data.datasets.glue_mnli_mismatched.train.tsv={mnli}/train.tsv",
                         f"data.datasets.glue_mnli_mismatched.val.tsv={mnli}/{dev}.tsv"]
    assert main(["--config", "tiny", "--output-dir", str(out), *TINY_RUN, *files("dev_mismatched"),
                 "training.max_updates=1", "training.eval_every=0"]) == 0
    final = json.loads((out / "final_metrics.json").read_text())["metrics"]
    assert list(final) == ["glue_mnli_mismatched"]
    accuracy = {}
    for dev in ("dev_matched", "dev_mismatched"):
        assert evaluate.main(["--checkpoint", str(out), "--output", str(results), *files(dev)]) == 0
        accuracy[dev] = json.loads(results.read_text())["metrics"]["glue_mnli_mismatched"]["accuracy"]
    assert accuracy["dev_mismatched"] == pytest.approx(final["glue_mnli_mismatched"]["accuracy"])
    assert 0 <= accuracy["dev_matched"] <= 1


def test_a_kind_without_a_reader_cannot_be_made():
    """``read`` and ``predict_dataset`` have no default: an incomplete kind fails when it is made,
    not when a run first reads its data."""
    from unit_fast.tasks import TaskKind

    class NoReader(TaskKind):
        name, model_task = "no_reader", "glue"

        def predict_dataset(self, ds, entry, inputs, tokenizer, sizes):
            return None

    with pytest.raises(TypeError, match="read"):
        NoReader()
