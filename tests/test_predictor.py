"""``unit_fast.Predictor`` (batched) against per-image ``python -m unit_fast.predict``; the
``--images`` / ``--output`` flags (COCO results, JSON Lines); bad input."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.test_evaluate_predict import TINY_RUN
from unit_fast import predict
from unit_fast.config import load_config
from unit_fast.predictor import Predictor
from unit_fast.train import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ["000000000042.png", "000000000007.png", "shapes.png"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("run")
    trainer = Trainer(load_config("default", [f"data.cache_dir={cache}", *TINY_RUN]), str(out))
    trainer.train(progress=False)
    folder = tmp_path_factory.mktemp("images")
    sources = [r.image_path for r in trainer.data.val["detection_coco"].records]
    sources += [r.image_path for r in trainer.data.val["vqa2"].records]
    for name, src in zip(NAMES, sources[:3], strict=True):
        with Image.open(src) as im:
            im.convert("RGB").save(folder / name, format="PNG")
    vqa = trainer.data.val["vqa2"].records[0]
    return SimpleNamespace(out=out, ckpt=str(out / "checkpoints" / "checkpoint_00000002.pt"),
                           folder=folder, paths=[str(folder / n) for n in sorted(NAMES)], vqa=vqa)


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor.from_checkpoint(run.ckpt)


def _same_detections(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["label"] == y["label"] and x["name"] == y["name"]
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
        assert x["box"] == pytest.approx(y["box"], abs=1e-3)


def test_batched_predictor_equals_per_image_cli(run, predictor, capsys):
    batched = predictor(images=run.paths, threshold=0.0, batch_size=3)
    assert len(batched) == 3
    for path, got in zip(run.paths, batched, strict=True):
        assert predict.main(["--checkpoint", run.ckpt, "--image", path, "--threshold", "0", "--json"]) == 0
        want = json.loads(capsys.readouterr().out)
        assert got["dataset"] == want["dataset"] == "detection_coco" and got["kind"] == "detection"
        assert len(got["detections"]) > 0
        _same_detections(got["detections"], want["detections"])


def test_path_pil_and_tensor_images_agree(run, predictor):
    path = run.paths[0]
    with Image.open(path) as im:
        pil = im.convert("RGB")
    tensor = torch.from_numpy(__import__("numpy").asarray(pil).copy()).permute(2, 0, 1).contiguous()
    assert tensor.dtype == torch.uint8
    results = [predictor(images=[x], threshold=0.0)[0] for x in (path, pil, tensor)]
    for r in results[1:]:
        _same_detections(r["detections"], results[0]["detections"])


def test_images_output_writes_coco_results(run, predictor, tmp_path, capsys):
    threshold = 0.05
    out = tmp_path / "results.json"
    assert predict.main(["--checkpoint", run.ckpt, "--images", str(run.folder), "--output", str(out),
                         "--threshold", str(threshold), "--batch-size", "2"]) == 0
    capsys.readouterr()
    written = json.loads(out.read_text())
    assert isinstance(written, list)
    expected = predictor(images=run.paths, threshold=threshold)
    assert len(written) == sum(len(r["detections"]) for r in expected)
    ids = {42, 7, "shapes.png"}
    for d in written:
        assert set(d) == {"image_id", "category_id", "bbox", "score"}
        assert d["image_id"] in ids
        assert isinstance(d["category_id"], int) and len(d["bbox"]) == 4
        assert d["bbox"][2] >= 0 and d["bbox"][3] >= 0 and d["score"] >= threshold
    # The boxes are the Predictor's xyxy boxes as xywh.
    by_image = dict(zip([42, 7, "shapes.png"], [None] * 3, strict=True))
    for path, r in zip(run.paths, expected, strict=True):
        by_image[predict.coco_image_id(path)] = r["detections"]
    for image_id, dets in by_image.items():
        mine = [d for d in written if d["image_id"] == image_id]
        assert len(mine) == len(dets)
        for w, d in zip(mine, dets, strict=True):
            x0, y0, x1, y1 = d["box"]
            assert w["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-4)
            assert w["score"] == pytest.approx(d["score"], abs=1e-6) and w["category_id"] == d["label"]


def test_vqa_images_output_writes_json_lines(run, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert predict.main(["--checkpoint", run.ckpt, "--images", str(run.folder), "--question",
                         run.vqa.question, "--output", str(out)]) == 0
    capsys.readouterr()
    lines = out.read_text().splitlines()
    assert len(lines) == len(NAMES)
    rows = [json.loads(line) for line in lines]
    assert sorted(r["image"].rsplit("/", 1)[-1] for r in rows) == sorted(NAMES)
    assert all(r["dataset"] == "vqa2" and "answer" in r for r in rows)


def _one_error(capsys, word):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert word in lines[-1], err


def test_images_of_an_empty_or_missing_folder(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for where in (str(empty), str(tmp_path / "missing")):
        assert predict.main(["--checkpoint", run.ckpt, "--images", where]) == 2
        _one_error(capsys, "--images")


def test_image_with_images_is_refused(run, capsys):
    code = predict.main(["--checkpoint", run.ckpt, "--image", run.paths[0], "--images", str(run.folder)])
    assert code == 2
    _one_error(capsys, "--images")



def test_from_checkpoint_refuses_a_payload_unless_trusted(run, tmp_path):
    from tests.test_checkpoint_trust import Payload
    from unit_fast import checkpoint_io

    state = torch.load(run.ckpt, weights_only=True)
    marker = tmp_path / "PAYLOAD_RAN"
    state["extra"] = Payload(marker)
    path = tmp_path / "payload.pt"
    torch.save(state, path)
    with pytest.raises(checkpoint_io.UntrustedCheckpointError):
        Predictor.from_checkpoint(str(path))
    assert not marker.exists()
    assert Predictor.from_checkpoint(str(path), trust=True).served
    assert marker.exists()


