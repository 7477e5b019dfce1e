"""``python -m unit_fast.evaluate`` and ``python -m unit_fast.predict`` on a checkpoint of a tiny
smoke run (trained once for the module): metrics equal the trainer's evaluation loop; every kind
of prediction equals the model's own output on the same val item made by the dataset path; bad
input is one ``error:`` line and exit status 2."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from unit_fast import evaluate, predict
from unit_fast.config import load_config
from unit_fast.data.datasets import BatchCollator
from unit_fast.data.readers.glue import GLUE_TASKS
from unit_fast.data.records import ENTAILMENT_LABELS
from unit_fast.data.synthetic import CATEGORIES
from unit_fast.models.postprocess import PostProcess
from unit_fast.train import Trainer
from unit_fast.training.evaluation_loop import evaluate_datasets
from unit_fast.training.metadata import tokenizer_from_metadata
from unit_fast.training.restore import read_checkpoint

# tests/test_train.py's smoke recipe; 2 val images and batches of 16: every val set is one batch.
TINY_RUN = [
    "data.synthetic.num_train=16", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
    "data.image_sizes.train_scales=[64]", "data.image_sizes.test_size=64",
    "data.image_sizes.crop_scales=[64]", "data.image_sizes.crop_size=[48,64]", "data.image_sizes.max_size=96",
    "data.decoder=pil",
    "training.batch_size=16", "training.warmup_steps=2", "training.max_updates=2",
    "model.base_args.dim_feedforward=64", "model.bert.config.intermediate_size=64",
]
DATASETS = ["detection_coco", "vqa2", "visual_entailment", "glue_sst2", "glue_qnli"]
# Class names by label index, as the checkpoint metadata gives them.
LABEL_NAMES = {"visual_entailment": ENTAILMENT_LABELS, "glue_sst2": ("negative", "positive"),
               "glue_qnli": ("entailment", "not_entailment")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("run")
    trainer = Trainer(load_config("default", [f"data.cache_dir={cache}", *TINY_RUN]), str(out))
    trainer.train(progress=False)
    trainer.model.eval()
    return SimpleNamespace(trainer=trainer, data=trainer.data, model=trainer.model, out=out,
                           ckpt=str(out / "checkpoints" / "checkpoint_00000002.pt"))


@torch.no_grad()
def _model_output(run, ds, index=0):
    """The trained model's output on val item ``index`` of ``ds``, made by the evaluation path."""
    dataset = run.data.val[ds]
    batch = BatchCollator(ds, decoder="pil", dataset_type="val")([dataset[index]])
    batch.pop("targets")
    return run.model(batch), dataset.records[index]


def _predict_json(capsys, *args):
    assert predict.main(["--checkpoint", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _assert_one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err, err


# -- metadata --------------------------------------------------------------------------------------


def test_checkpoint_metadata_is_self_contained(run):
    meta = read_checkpoint(run.ckpt).meta
    json.dumps(meta)  # JSON-like
    assert list(meta["datasets"]) == DATASETS
    entries = meta["datasets"]
    assert entries["detection_coco"]["categories"] == [{"id": i, "name": n} for i, n in CATEGORIES.items()]
    assert entries["vqa2"]["answers"] == run.data.answer_vocab
    assert entries["visual_entailment"]["labels"] == list(ENTAILMENT_LABELS)
    assert entries["glue_sst2"]["pair"] is False and entries["glue_qnli"]["pair"] is True
    for ds in DATASETS[1:]:
        assert entries[ds]["max_length"] == run.data.val[ds].max_length
    # Label names agree with the indices the readers assign where the files name the labels.
    qnli_map = GLUE_TASKS["qnli"][3]
    assert entries["glue_qnli"]["labels"] == sorted(qnli_map, key=qnli_map.get)
    assert entries["glue_sst2"]["labels"] == list(LABEL_NAMES["glue_sst2"])
    assert {e["kind"] for e in entries.values()} == {"detection", "vqa", "image_text_classification",
                                                     "text_classification"}
    # The rebuilt tokenizer encodes as the run's did.
    tok = tokenizer_from_metadata(meta)
    for text in ("How many circles are there?", "the red square is left of the BLUE circle ."):
        assert tok.encode(text) == run.data.tokenizer.encode(text)


# -- evaluate --------------------------------------------------------------------------------------


def test_evaluate_matches_the_evaluation_loop(run, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert evaluate.main(["--checkpoint", run.ckpt, "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["task", "metric"])
    assert [line.split()[0] for line in lines[header + 2:header + 2 + len(DATASETS)]] == DATASETS
    written = json.loads(out.read_text())
    expected = evaluate_datasets(run.model, run.data, run.trainer.cfg, torch.device("cpu"))
    # Exact equality, compared as JSON text (NaN-safe).
    assert json.dumps(written["metrics"], sort_keys=True) == \
        json.dumps(expected, sort_keys=True, default=float)
    assert written["step"] == 2 and written["chance"]["visual_entailment"] == pytest.approx(1 / 3, abs=1e-3)


def test_evaluate_a_subset_from_the_run_folder(run, capsys):
    assert evaluate.main(["--checkpoint", str(run.out), "--datasets", "glue_sst2,vqa2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:4]] == ["glue_sst2", "vqa2"]  # the table: these two only
    assert lines[4].startswith("evaluated ") and "on 2 dataset(s)" in lines[4]


@pytest.fixture(scope="module")
def mmf(run, tmp_path_factory):
    """The smoke run's weights as an MMF checkpoint (``{"model": state_dict}``, no config, no
    metadata), and the config arguments that describe its model."""
    from unit_fast.models.checkpoint import save_mmf_checkpoint

    path = str(tmp_path_factory.mktemp("mmf") / "unit_mmf.pth")
    save_mmf_checkpoint(run.model, path)
    # The config describes the model: here also the VQA head's size, as vqa2's data is not read.
    config = ["--config", "default", f"data.cache_dir={run.trainer.cfg['data']['cache_dir']}", *TINY_RUN,
              f"model.heads.vl.vqa2.num_labels={len(run.data.answer_vocab)}"]
    return SimpleNamespace(path=path, config=config)


def test_evaluate_an_mmf_checkpoint_needs_and_uses_a_config(run, mmf, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", mmf.path, "--datasets", "glue_sst2"]) == 2
    _assert_one_line_error(capsys, "pass --config")
    out = tmp_path / "m.json"
    assert evaluate.main(["--checkpoint", mmf.path, "--datasets", "glue_sst2", "--output", str(out),
                          *mmf.config]) == 0
    expected = evaluate_datasets(run.model, run.data, run.trainer.cfg, torch.device("cpu"),
                                 datasets=["glue_sst2"])
    assert json.loads(out.read_text())["metrics"] == expected


# -- predict ---------------------------------------------------------------------------------------


def test_predict_detection_equals_postprocess_and_draws(run, tmp_path, capsys):
    out, rec = _model_output(run, "detection_coco")
    png = tmp_path / "boxes.png"
    got = _predict_json(capsys, run.ckpt, "--image", rec.image_path, "--threshold", "0",
                        "--save-image", str(png))
    # Every query (threshold 0), in original-image pixels, as PostProcess gives them.
    ref = PostProcess()(out, torch.tensor([[rec.height, rec.width]]))[0]
    want = sorted(zip(ref["scores"].tolist(), ref["labels"].tolist(), ref["boxes"].tolist(), strict=True),
                  reverse=True)
    found = sorted(got["detections"], key=lambda d: (d["score"], d["label"], d["box"]), reverse=True)
    assert len(found) == len(want) == out["pred_logits"].shape[1]
    for d, (score, label, box) in zip(found, want, strict=True):
        assert d["label"] == label and d["name"] == CATEGORIES.get(label, f"class {label}")
        assert d["score"] == pytest.approx(score, abs=1e-6) and d["box"] == pytest.approx(box, abs=1e-4)
    assert got["image_size"] == [rec.width, rec.height]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (rec.width, rec.height)
    # A threshold keeps only the detections scoring at least that much.
    top = max(d["score"] for d in found)
    kept = _predict_json(capsys, run.ckpt, "--image", rec.image_path, "--threshold", f"{top - 1e-6:.8f}")
    assert len(kept["detections"]) >= 1 and all(d["score"] >= top - 1e-6 for d in kept["detections"])


def test_predict_vqa_answer_is_the_model_argmax(run, capsys):
    out, rec = _model_output(run, "vqa2")
    got = _predict_json(capsys, run.ckpt, "--image", rec.image_path, "--question", rec.question,
                        "--top-k", "3")
    probs = out["scores"][0].sigmoid()
    assert got["answer"] in run.data.answer_vocab
    assert got["answer"] == run.data.answer_vocab[int(probs.argmax())]
    assert [a["score"] for a in got["top"]] == pytest.approx(probs.topk(3).values.tolist(), abs=1e-6)


def test_predict_entailment_label_is_the_model_argmax(run, capsys):
    out, rec = _model_output(run, "visual_entailment")
    got = _predict_json(capsys, run.ckpt, "--image", rec.image_path, "--hypothesis", rec.hypothesis)
    probs = out["scores"][0].softmax(-1)
    assert got["label"] in ENTAILMENT_LABELS and got["label"] == ENTAILMENT_LABELS[int(probs.argmax())]
    assert list(got["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-6)


@pytest.mark.parametrize("ds", ["glue_sst2", "glue_qnli"])
def test_predict_sentence_label_is_the_model_argmax(run, ds, capsys):
    out, rec = _model_output(run, ds)
    pair = [] if rec.text_b is None else ["--text-pair", rec.text_b]
    got = _predict_json(capsys, run.ckpt, "--task", ds, "--text", rec.text_a, *pair)
    probs = out["scores"][0].softmax(-1)
    assert got["label"] == LABEL_NAMES[ds][int(probs.argmax())]
    assert list(got["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-6)


def test_predict_on_an_mmf_checkpoint_rebuilds_the_metadata_from_the_data(run, mmf, capsys):
    out, rec = _model_output(run, "glue_sst2")
    got = _predict_json(capsys, mmf.path, "--task", "glue_sst2", "--text", rec.text_a, *mmf.config)
    probs = out["scores"][0].softmax(-1)
    assert list(got["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-6)


def test_predict_human_readable_output(run, capsys):
    rec = run.data.val["glue_sst2"].records[0]
    assert predict.main(["--checkpoint", run.ckpt, "--task", "glue_sst2", "--text", rec.text_a]) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.split(": ")[0] == "glue_sst2" and first.split(": ")[1] in LABEL_NAMES["glue_sst2"]
    assert second.strip().startswith("probabilities: negative")


@pytest.fixture(scope="module")
def no_vqa_ckpt(run, tmp_path_factory):
    """The smoke checkpoint with vqa2 cut out of the model: config, weights and metadata."""
    state = torch.load(run.ckpt, map_location="cpu", weights_only=False)
    del state["config"]["model"]["base_args"]["num_queries"]["vl"]["vqa2"]
    state["model"] = {k: v for k, v in state["model"].items() if ".vqa2." not in k}
    del state["meta"]["datasets"]["vqa2"]
    path = str(tmp_path_factory.mktemp("novqa") / "checkpoint.pt")
    torch.save(state, path)
    return path


def test_predict_task_not_in_the_model(run, no_vqa_ckpt, capsys):
    rec = run.data.val["vqa2"].records[0]
    args = ["--checkpoint", no_vqa_ckpt, "--image", rec.image_path]
    assert predict.main([*args, "--question", rec.question]) == 2
    _assert_one_line_error(capsys, "asks for a vqa task, which this model does not serve")
    # The cut checkpoint is a working model otherwise.
    ve = run.data.val["visual_entailment"].records[0]
    got = _predict_json(capsys, no_vqa_ckpt, "--image", ve.image_path, "--hypothesis", ve.hypothesis)
    assert got["label"] in ENTAILMENT_LABELS


def test_predict_cli_entry_point(run):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    rec = run.data.val["glue_qnli"].records[0]
    proc = subprocess.run([sys.executable, "-m", "unit_fast.predict", "--checkpoint", run.ckpt,
                           "--task", "glue_qnli", "--text", rec.text_a, "--text-pair", rec.text_b, "--json"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["label"] in LABEL_NAMES["glue_qnli"]


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "/nonexistent/ckpt.pt"], "checkpoint '/nonexistent/ckpt.pt' does not exist"),
    (["model.base_args.enc_layerz=3"], "unknown config key 'model.base_args.enc_layerz'"),
    (["training.lr"], "expected dotted.key=value"),
    (["--datasets", "glue_sst2,coco"], "--datasets: ['coco'] not served by this model"),
    (["--output", "/nonexistent/dir/m.json"], "--output: folder '/nonexistent/dir' does not exist"),
    (["--datasets", "glue_sst2", "data.root=/tmp", "data.tokenizer={vocab}",
      "data.datasets.glue_sst2={{train: {{tsv: /nonexistent/train.tsv}}, val: {{tsv: /nonexistent/d.tsv}}}}"],
     "data.datasets.glue_sst2.train.tsv: '/nonexistent/train.tsv' does not exist"),
    (["--datasets", "glue_sst2", "data.root=/tmp",
      "data.datasets.glue_sst2={{train: {{tsv: /nonexistent/train.tsv}}, val: {{tsv: /nonexistent/d.tsv}}}}"],
     "no tokenizer for glue_sst2: set data.tokenizer"),
])
def test_evaluate_bad_input(run, args, message, capsys):
    vocab = os.path.join(run.data.root, "vocab.txt")
    args = [a.format(vocab=vocab) for a in args]
    if "--checkpoint" not in args:
        args = ["--checkpoint", run.ckpt, *args]
    assert evaluate.main(args) == 2
    _assert_one_line_error(capsys, message)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "/nonexistent/c.pt", "--text", "hi"], "checkpoint '/nonexistent/c.pt' does not exist"),
    (["--image", "/nonexistent/a.jpg"], "--image '/nonexistent/a.jpg' does not exist"),
    (["--image", "{not_an_image}"], "--image: cannot identify image file"),
    (["--task", "glue_cola", "--text", "hi"], "--task 'glue_cola': this model serves detection_coco, vqa2"),
    (["--text", "hi"], "several text_classification datasets (glue_sst2, glue_qnli): choose one with --task"),
    (["--task", "glue_qnli", "--text", "hi"], "glue_qnli is a sentence-pair task: give --text-pair"),
    (["--task", "vqa2", "--question", "what?"], "vqa2: needs --image"),
    (["--question", "what?", "--text", "hi"], "give one of --question, --hypothesis, --text"),
    ([], "nothing to predict"),
    (["--text", "hi", "--task", "glue_sst2", "--save-image", "x.png"], "--save-image draws detections"),
    (["--text", "hi", "--task", "glue_sst2", "model.bert.pretrainedd=x"],
     "unknown config key 'model.bert.pretrainedd'"),
    (["--text", "hi", "--task", "glue_sst2", "--threshold", "2"], "--threshold must be in [0, 1]"),
])
def test_predict_bad_input(run, args, message, capsys):
    args = [a.format(not_an_image=__file__) for a in args]
    if "--checkpoint" not in args:
        args = ["--checkpoint", run.ckpt, *args]
    assert predict.main(args) == 2
    _assert_one_line_error(capsys, message)


# -- the README's examples -------------------------------------------------------------------------


def _readme_examples(heading="**Evaluation and prediction**"):
    """The commands of the README's first bash block after ``heading``: ``[(argv, comment)]``,
    with continuation lines joined and ``comment`` the text after ``#`` ("" without one)."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    start = text.index(heading)
    begin = text.index("```bash\n", start) + len("```bash\n")
    block = text[begin:text.index("\n```", begin)].replace("\\\n", " ")
    return [(shlex.split(line, comments=True), line.partition(" # ")[2].strip())
            for line in block.splitlines()]


def test_readme_examples_run_after_the_quick_start(run, tmp_path, monkeypatch, capsys):
    """Every README line on ``--checkpoint runs`` (the quick start's output folder; here the smoke
    run's folder in its place) and the sample picture's line run as written, from a fresh folder;
    the comments' true answers are the sample picture's; every text is in the default run's
    vocabulary (no word split into pieces)."""
    from unit_fast.data import sample_image, synthetic

    examples = _readme_examples()
    runnable = [(argv, c) for argv, c in examples if "runs" in argv or "unit_fast.data.sample_image" in argv]
    modules = [argv[2] for argv, _ in runnable]
    assert modules.count("unit_fast.evaluate") == 2 and modules.count("unit_fast.predict") == 5, examples
    assert modules.index("unit_fast.data.sample_image") < modules.index("unit_fast.predict")
    mains = {"unit_fast.evaluate": evaluate.main, "unit_fast.predict": predict.main,
             "unit_fast.data.sample_image": sample_image.main}
    monkeypatch.chdir(tmp_path)
    truth = sample_image.describe(sample_image.sample_scene())
    texts = []
    for argv, comment in runnable:
        assert argv[:2] == ["python", "-m"], argv
        args = [str(run.out) if a == "runs" and prev == "--checkpoint" else a
                for prev, a in zip(["", *argv], argv, strict=False)][3:]
        assert mains[argv[2]](args) == 0, (argv, capsys.readouterr().err)
        capsys.readouterr()
        given = dict(zip(args, args[1:], strict=False))
        if "--question" in given:
            assert (given["--question"], comment) == (truth["question"], truth["answer"])
        if "--hypothesis" in given:
            assert (given["--hypothesis"], comment) == (truth["hypothesis"], truth["label"])
        if "--save-image" in given:
            assert comment == f"{len(truth['shapes'])} shapes"
            assert os.path.isfile(given["--save-image"])
        texts += [given[k] for k in ("--question", "--hypothesis", "--text", "--text-pair") if k in given]
    assert os.path.isfile("shapes.jpg") and os.path.isfile("m.json") and len(texts) == 5
    # The default run's vocabulary: its data, generated as its config says.
    synth = load_config("default")["data"]["synthetic"]
    vocab_file = synthetic.generate(tmp_path / "data", **synth)["files"]["vocab"]
    with open(vocab_file) as f:
        vocab = set(f.read().split())
    for t in texts:
        assert set(synthetic._words(t)) <= vocab, t


def test_readme_safetensors_examples_run(run, tmp_path, monkeypatch, capsys):
    """The README's export block runs as written after the quick start (``runs``: the smoke run's
    folder in its place): export to safetensors, then predict from the exported file alone."""
    from unit_fast import export

    examples = _readme_examples("**Checkpoints you did not write.**")
    assert [argv[2] for argv, _ in examples] == ["unit_fast.export", "unit_fast.predict"], examples
    monkeypatch.chdir(tmp_path)
    mains = {"unit_fast.export": export.main, "unit_fast.predict": predict.main}
    outputs = []
    for argv, _ in examples:
        args = [str(run.out) if a == "runs" and prev == "--checkpoint" else a
                for prev, a in zip(["", *argv], argv, strict=False)][3:]
        assert mains[argv[2]](args) == 0, (argv, capsys.readouterr().err)
        outputs.append(capsys.readouterr().out)
    assert os.path.isfile("unit.safetensors") and outputs[1].startswith("glue_sst2: "), outputs
