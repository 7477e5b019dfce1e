"""Malformed dataset files through ``python -m unit_fast.train`` (issue 12.3): one ``error:`` line
naming the file and the record or key, exit status 2, no traceback; ``data.on_error=skip`` trains
and counts the skips per dataset (``RunData.read_reports``).

Each case copies the synthetic data, corrupts one file and points ``data.datasets`` at the copy.
"""

import json
import logging
import os
import shutil

import pytest

from tests.test_train import TINY_RUN, small_config
from unit_fast.config import load_config
from unit_fast.train import main
from unit_fast.training.data import build_data, synthetic_paths, synthetic_root

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COCO_TRAIN = "coco/annotations/instances_train2017.json"
COCO_VAL = "coco/annotations/instances_val2017.json"
VQA_QUESTIONS = "vqa2/v2_OpenEnded_mscoco_train2014_questions.json"
VQA_ANNOTATIONS = "vqa2/v2_mscoco_train2014_annotations.json"
SNLI_TRAIN = "snli_ve/snli_ve_train.jsonl"
SST2_DEV = "glue/SST-2/dev.tsv"


@pytest.fixture
def data_copy(train_cache, tmp_path):
    """A writable copy of the trainer tests' synthetic data: ``(root, args)``, the CLI arguments
    that train the default config on it (real-data mode: ``data.root`` and ``data.datasets``)."""
    cfg = load_config("default", [f"data.cache_dir={train_cache}", *TINY_RUN])
    root = str(tmp_path / "data")
    shutil.copytree(synthetic_root(cfg["data"]), root)
    # max_updates=1: should a check be missing, the run that starts is short (and still fails the test).
    args = [f"data.cache_dir={train_cache}", *TINY_RUN, "training.max_updates=1", f"data.root={root}",
            f"data.tokenizer={root}/vocab.txt", f"data.datasets={json.dumps(synthetic_paths(root))}"]
    return root, args


def _edit_json(root, rel, edit, raw=None):
    """Apply ``edit`` to the parsed file; then replace ``raw`` (``{"__X__": text}``) in its text."""
    path = os.path.join(root, rel)
    with open(path) as f:
        data = json.load(f)
    edit(data)
    text = json.dumps(data)
    for key, value in (raw or {}).items():
        text = text.replace(json.dumps(key), value)
    with open(path, "w") as f:
        f.write(text)
    return path


def _edit_bytes(root, rel, edit):
    path = os.path.join(root, rel)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(edit(data))
    return path


def _first_ann(key, value):
    def edit(d):
        d["annotations"][0][key] = value
    return edit


def _no_annotations(d):
    del d["annotations"]


def _duplicate_annotation(d):
    d["annotations"].append(dict(d["annotations"][0]))


def _second_line_not_utf8(data):
    return data.replace(b"\n", b"\n\xe9", 1)  # a Latin-1 byte opens line 2


def _second_line_escapes(data):
    lines = data.split(b"\n")
    lines[1] = lines[1].replace(b'"Flikr30kID": "', b'"Flikr30kID": "../', 1)
    return b"\n".join(lines)


# (name, corrupt(root) -> bad file, needles besides the file)
CASES = [
    ("coco_no_annotations", lambda r: _edit_json(r, COCO_TRAIN, _no_annotations), ["'annotations'"]),
    ("coco_truncated", lambda r: _edit_bytes(r, COCO_VAL, lambda b: b[: len(b) // 2]), ["malformed JSON"]),
    ("vqa_invalid_utf8",
     lambda r: _edit_bytes(r, VQA_ANNOTATIONS, lambda b: b.replace(b"triangle", b"tri\xffngle", 1)),
     [":1: not valid UTF-8"]),
    ("snli_truncated_line", lambda r: _edit_bytes(r, SNLI_TRAIN, lambda b: b.rstrip(b"\n")[:-20]),
     ["malformed JSON"]),
    ("glue_invalid_utf8", lambda r: _edit_bytes(r, SST2_DEV, _second_line_not_utf8), [":2: not valid UTF-8"]),
    ("coco_category_overflow", lambda r: _edit_json(r, COCO_TRAIN, _first_ann("category_id", 2**70)),
     ["annotation id=1 (image_id=24584)", str(2**70)]),
    ("coco_bbox_overflow", lambda r: _edit_json(r, COCO_TRAIN, _first_ann("bbox", "__X__"),
                                                {"__X__": "[1e400, 0, 1, 1]"}),
     ["annotation id=1 (image_id=24584)", "finite float32"]),
    ("coco_negative_category", lambda r: _edit_json(r, COCO_TRAIN, _first_ann("category_id", -6)),
     ["annotation id=1 (image_id=24584)", "non-negative"]),
    ("coco_unknown_category", lambda r: _edit_json(r, COCO_TRAIN, _first_ann("category_id", 2)),
     ["annotation id=1 (image_id=24584)", "not among the file's categories"]),
    ("vqa_image_id_mismatch", lambda r: _edit_json(r, VQA_ANNOTATIONS, _first_ann("image_id", 7)),
     ["question #0 (question_id=24584000): image_id=24584", "has image_id=7"]),
    ("vqa_duplicate_question_id", lambda r: _edit_json(r, VQA_ANNOTATIONS, _duplicate_annotation),
     ["(question_id=24584000): duplicate question_id"]),
    ("vqa_no_answers", lambda r: _edit_json(r, VQA_ANNOTATIONS, _first_ann("answers", [])),
     ["annotation #0 (question_id=24584000): no answers"]),
    ("coco_absolute_file_name",
     lambda r: _edit_json(r, COCO_VAL, lambda d: d["images"][0].update(file_name="/etc/hostname")),
     ["image #0 (id=", "'/etc/hostname' is absolute"]),
    ("snli_escaping_file_name", lambda r: _edit_bytes(r, SNLI_TRAIN, _second_line_escapes),
     [":2: Flikr30kID '../", "leaves the image folder"]),
]


@pytest.mark.parametrize("corrupt, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_file_is_one_error_line(data_copy, tmp_path, capsys, corrupt, needles):
    root, args = data_copy
    bad = corrupt(root)
    assert main(["--output-dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert bad in err and all(n in err for n in needles), err  # a VQA pairing names both files


def test_skip_trains_and_counts_per_dataset(train_cache, data_copy, tmp_path, caplog):
    """``data.on_error=skip``: a bad COCO annotation and a bad SST-2 row are skipped, counted in
    their own dataset's report and logged; the run trains."""
    root, _ = data_copy
    _edit_json(root, COCO_TRAIN, _first_ann("category_id", -6))
    sst2_dev = _edit_bytes(root, SST2_DEV, _second_line_not_utf8)
    paths = synthetic_paths(root)
    overrides = [f"data.root={root}", f"data.tokenizer={root}/vocab.txt", "data.on_error=skip",
                 f"data.datasets={json.dumps({ds: paths[ds] for ds in ('detection_coco', 'glue_sst2')})}",
                 "training.max_updates=1", "training.warmup_steps=1"]
    config, cfg = small_config(tmp_path, train_cache, *overrides)
    assert main(["--config", config, "--output-dir", str(tmp_path / "run"), f"data.cache_dir={train_cache}",
                 *overrides]) == 0
    with caplog.at_level(logging.WARNING, logger="unit_fast.data.readers"):
        data = build_data(cfg, ["detection_coco", "glue_sst2"])
    coco, sst2 = data.read_reports["detection_coco"], data.read_reports["glue_sst2"]
    assert set(data.read_reports) == {"detection_coco", "glue_sst2"}
    assert coco.skipped == 1 and "annotation id=1 (image_id=24584)" in coco.messages[0]
    assert sst2.skipped == 1 and sst2.messages[0].startswith(f"{sst2_dev}:2:")
    assert data.report.skipped == 2 and len(data.report.messages) == 2  # the sum, kept for old readers
    logged = [r.getMessage() for r in caplog.records]
    assert any(sst2_dev in m and "skipped 1" in m for m in logged), logged
    # The trainer reports the same counts: final_metrics.json and one log.jsonl record.
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["skipped_records"] == {"detection_coco": 1, "glue_sst2": 1}
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_records"] for r in records if r["event"] == "skipped_records"] == \
        [{"detection_coco": 1, "glue_sst2": 1}]
    assert records[-1]["event"] == "final" and records[-1]["skipped_records"] == final["skipped_records"]
