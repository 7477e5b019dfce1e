"""Readers refuse malformed files with one line naming the file and the record or key (issue 12.3).

Per record, ``on_error="skip"`` leaves the record out, counts it in the ``ReadReport`` and logs a
warning naming the file.  The CLI side is ``test_reader_errors_cli.py``.
"""

import json
import logging
import os
import warnings

import pytest

from tests.data.test_readers import _ann, _answers, _coco, _snli_line, _tsv, _vqa_files, _write_json
from unit_fast.data.readers import (
    ReadReport,
    load_answer_vocab,
    read_coco_detection,
    read_glue,
    read_snli_ve,
    read_vqa2,
)


def _raises(fn, *needles):
    """Call ``fn``; assert a one-line ValueError holding every needle; return its message."""
    with pytest.raises(ValueError) as exc:
        fn()
    message = str(exc.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


def _skips(fn, caplog, path, n=1):
    """Call ``fn(on_error="skip", report=...)``; assert ``n`` counted skips naming ``path`` and a
    logged warning naming ``path``; return ``(result, report)``."""
    report = ReadReport()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unit_fast.data.readers"):
        out = fn(on_error="skip", report=report)
    assert report.skipped == n and all(str(path) in m for m in report.messages), report.messages
    assert any(str(path) in r.getMessage() and f"skipped {n} " in r.getMessage() for r in caplog.records)
    return out, report


def _raw_json(path, text):
    """Write JSON text as given (``1e400``, ``10**400`` digits: json.dumps cannot write them)."""
    path.write_text(text)
    return path


# --- COCO: annotations and categories ------------------------------------------------------------


def test_coco_without_annotations_is_an_error_unless_unlabelled(tmp_path):
    data = _coco([])
    del data["annotations"]
    path = _write_json(tmp_path / "instances_train2017.json", data)
    _raises(lambda: read_coco_detection(path, tmp_path), path, "'annotations'", "labelled=False")
    records = read_coco_detection(path, tmp_path, labelled=False)  # an image_info_test file
    assert len(records) == 3 and all(r.boxes.shape == (0, 4) for r in records)
    bad = _write_json(tmp_path / "bad.json", {**data, "annotations": {"id": 1}})
    _raises(lambda: read_coco_detection(bad, tmp_path, labelled=False), bad, "'annotations' must be a list")


def test_coco_categories_required_when_classes_come_from_the_data(tmp_path):
    data = _coco([_ann(1, 1, [0, 0, 5, 5], category_id=999)])
    del data["categories"]
    path = _write_json(tmp_path / "no_cats.json", data)
    _raises(lambda: read_coco_detection(path, tmp_path, require_categories=True), path, "'categories'")
    # Without require_categories: read, any non-negative id accepted (the class count is the config's).
    assert read_coco_detection(path, tmp_path)[0].labels.tolist() == [999]
    empty = _write_json(tmp_path / "empty_cats.json", {**data, "categories": []})
    _raises(lambda: read_coco_detection(empty, tmp_path, require_categories=True), empty, "'categories'")
    bad = _write_json(tmp_path / "bad_cats.json", {**data, "categories": [{"id": 1}, {"id": -3}]})
    _raises(lambda: read_coco_detection(bad, tmp_path), bad, "categories[1]", "-3")


@pytest.mark.parametrize(
    "category_id, needle",
    [
        (-1, "category_id must be a non-negative 64-bit integer, got -1"),
        (2, "category_id 2 is not among the file's categories"),  # the file has 1, 18, 90
        (2**70, f"got {2**70}"),  # an int64 overflow, once a traceback in np.asarray
    ],
)
def test_coco_negative_unknown_or_overflowing_category_id(tmp_path, caplog, category_id, needle):
    anns = [_ann(1, 1, [0, 0, 5, 5]), _ann(7, 2, [0, 0, 5, 5], category_id=category_id)]
    path = _write_json(tmp_path / "instances_val2017.json", _coco(anns))
    _raises(lambda: read_coco_detection(path, tmp_path), path, "annotation id=7 (image_id=2)", needle)
    records, _ = _skips(lambda **kw: read_coco_detection(path, tmp_path, **kw), caplog, path)
    assert [len(r.labels) for r in records] == [1, 0, 0]


@pytest.mark.parametrize("category_id", [-2, 2**70])
def test_coco_negative_or_overflowing_category_id_without_categories(tmp_path, category_id):
    data = _coco([_ann(7, 1, [0, 0, 5, 5], category_id=category_id)])
    del data["categories"]
    path = _write_json(tmp_path / "no_cats.json", data)
    _raises(lambda: read_coco_detection(path, tmp_path), path, "annotation id=7", "non-negative 64-bit")


# --- COCO: numbers that overflow -------------------------------------------------------------------


_IMAGE = '{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}'


@pytest.mark.parametrize(
    "bbox, area",
    [
        ("[1e400, 0, 2, 2]", "4"),  # json reads 1e400 as inf
        ("[0, 0, 2, 2]", "1e400"),
        ("[0, 0, 1e39, 2]", "4"),  # a finite float64 beyond float32
        ("[0, 0, 1" + "0" * 400 + ", 2]", "4"),  # an int beyond float64: np.asarray raised OverflowError
    ],
)
def test_coco_overflowing_box_numbers(tmp_path, caplog, bbox, area):
    good = '{"id": 1, "image_id": 1, "bbox": [0, 0, 2, 2], "category_id": 1}'
    bad = f'{{"id": 2, "image_id": 1, "bbox": {bbox}, "area": {area}, "category_id": 1}}'
    text = f'{{"images": [{_IMAGE}], "annotations": [{good}, {bad}], "categories": [{{"id": 1}}]}}'
    path = _raw_json(tmp_path / "big.json", text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in cast" is no way to say it
        _raises(lambda: read_coco_detection(path, tmp_path), path, "annotation id=2 (image_id=1)",
                "finite float32")
    records, _ = _skips(lambda **kw: read_coco_detection(path, tmp_path, **kw), caplog, path)
    assert records[0].boxes.tolist() == [[0, 0, 2, 2]]


@pytest.mark.parametrize(
    "image, needle",
    [
        ('{"id": 2, "file_name": "b.jpg", "width": 1' + "0" * 400 + ', "height": 10}', "width"),
        ('{"id": 2, "file_name": "b.jpg", "width": 10, "height": 1e400}', "height"),
        (f'{{"id": {2**70}, "file_name": "b.jpg", "width": 10, "height": 10}}', "64-bit"),
    ],
)
def test_coco_overflowing_image_numbers(tmp_path, caplog, image, needle):
    text = f'{{"images": [{_IMAGE}, {image}], "annotations": []}}'
    path = _raw_json(tmp_path / "big.json", text)
    _raises(lambda: read_coco_detection(path, tmp_path), path, "image #1 (id=", needle)
    records, _ = _skips(lambda **kw: read_coco_detection(path, tmp_path, **kw), caplog, path)
    assert [r.image_id for r in records] == [1]


def test_coco_overflowing_attribute_id(tmp_path, caplog):
    anns = [_ann(1, 1, [0, 0, 5, 5], attribute_ids=[1]), _ann(2, 1, [0, 0, 5, 5], attribute_ids=[3, 2**70])]
    path = _write_json(tmp_path / "vg.json", _coco(anns))
    _raises(lambda: read_coco_detection(path, tmp_path, with_attributes=True), path, "annotation id=2",
            "attribute_ids")
    read = lambda **kw: read_coco_detection(path, tmp_path, with_attributes=True, **kw)  # noqa: E731
    records, _ = _skips(read, caplog, path)
    assert records[0].attributes.shape == (1, 16)


# --- every reader: truncated JSON, invalid UTF-8, a folder ----------------------------------------


def test_coco_truncated_json_and_invalid_utf8(tmp_path):
    text = json.dumps(_coco([_ann(1, 1, [0, 0, 5, 5])]), indent=1)
    cut = _raw_json(tmp_path / "cut.json", text[: len(text) // 2])
    line = cut.read_text().count("\n") + 1  # where the text stops (no JSON string spans lines)
    _raises(lambda: read_coco_detection(cut, tmp_path), f"{cut}:{line}: malformed JSON")
    data = text.encode().replace(b'"c18"', b'"c\xff18"')
    (tmp_path / "latin.json").write_bytes(data)
    line = data[: data.index(b"\xff")].count(b"\n") + 1
    _raises(lambda: read_coco_detection(tmp_path / "latin.json", tmp_path), f"latin.json:{line}:", "UTF-8")
    deep = _raw_json(tmp_path / "deep.json", "[" * 100_000)  # RecursionError inside json
    _raises(lambda: read_coco_detection(deep, tmp_path), deep, "malformed JSON")
    digits = _raw_json(tmp_path / "digits.json", '{"images": [1' + "0" * 5000 + "]}")  # int() digit limit
    _raises(lambda: read_coco_detection(digits, tmp_path), digits, "malformed JSON")
    _raises(lambda: read_coco_detection(tmp_path, tmp_path), tmp_path, "cannot be read")  # a folder


def test_vqa2_truncated_json_and_invalid_utf8(tmp_path):
    q, a = _vqa_files(tmp_path)
    cut = _raw_json(tmp_path / "cut.json", q.read_text()[:-5])
    _raises(lambda: read_vqa2(cut, a, tmp_path), f"{cut}:1: malformed JSON")
    latin = tmp_path / "latin.json"
    latin.write_bytes(a.read_bytes().replace(b'"no"', b'"n\xe9"'))
    _raises(lambda: read_vqa2(q, latin, tmp_path), "latin.json:1:", "UTF-8")
    vocab = tmp_path / "answers.txt"
    vocab.write_bytes(b"yes\nno\n\xff\xfe\n")
    _raises(lambda: load_answer_vocab(vocab), f"{vocab}:3:", "UTF-8")
    _raises(lambda: read_vqa2(q, a, tmp_path, answer_vocab=vocab), f"{vocab}:3:")


def test_snli_ve_truncated_line_and_invalid_utf8(tmp_path, caplog):
    path = tmp_path / "snli_ve_train.jsonl"
    path.write_bytes(
        b"\n".join(
            [
                _snli_line("1.jpg", "ok", "entailment").encode(),
                _snli_line("2.jpg", "cafe", "neutral").encode().replace(b"cafe", b"caf\xe9"),  # Latin-1
                b'{"Flikr30kID": "3.jpg", "sentence2": "x", "gold_label": "neutral", "n": 1'
                + b"0" * 5000  # beyond int()'s digit limit: a ValueError that is no JSONDecodeError
                + b"}",
                _snli_line("4.jpg", "ok", "neutral").encode()[:30],  # truncated last line
            ]
        )
    )
    _raises(lambda: read_snli_ve(path, tmp_path), f"{path}:2:", "UTF-8")
    records, report = _skips(lambda **kw: read_snli_ve(path, tmp_path, **kw), caplog, path, n=3)
    assert [r.image_id for r in records] == ["1"]
    assert [m.split(": ", 1)[0] for m in report.messages] == [f"{path}:{n}" for n in (2, 3, 4)]


def test_glue_invalid_utf8_row_and_header(tmp_path, caplog):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\nfine\t1\nna\xefve\t0\nok\t0\n")
    _raises(lambda: read_glue("sst2", path), f"{path}:3:", "UTF-8")
    records, _ = _skips(lambda **kw: read_glue("sst2", path, **kw), caplog, path)
    assert [r.text_a for r in records] == ["fine", "ok"]
    header = tmp_path / "dev.tsv"
    header.write_bytes(b"sent\xffence\tlabel\nfine\t1\n")
    _raises(lambda: read_glue("sst2", header), f"{header}:1:", "UTF-8")
    _tsv(tmp_path / "bom.tsv", [["\ufeffsentence", "label"], ["x", "1"]])  # a BOM stays tolerated
    assert read_glue("sst2", tmp_path / "bom.tsv")[0].text_a == "x"


# --- VQAv2: pairing of questions and annotations ---------------------------------------------------


def _vqa_annotations(tmp_path, anns):
    return _write_json(tmp_path / "a2.json", {"annotations": anns})


def _vqa_ann(qid, image_id, answers=None):
    answers = _answers(("no", 10)) if answers is None else answers
    return {"question_id": qid, "image_id": image_id, "multiple_choice_answer": "no", "answers": answers}


@pytest.mark.parametrize(
    "anns, needles, kept",
    [
        # question 20 is about image 2; its annotation says image 1
        ([_vqa_ann(10, 1), _vqa_ann(20, 1), _vqa_ann(11, 1)],
         ["q.json: question #1 (question_id=20)", "image_id=2", "a2.json has image_id=1"], [10, 11]),
        ([_vqa_ann(10, 1), _vqa_ann(20, 2), _vqa_ann(11, 1), _vqa_ann(20, 2)],
         ["a2.json: annotation #3 (question_id=20): duplicate question_id (first at annotation #1)"],
         [10, 20, 11]),
        ([_vqa_ann(10, 1), _vqa_ann(20, 2, answers=[]), _vqa_ann(11, 1)],
         ["a2.json: annotation #1 (question_id=20): no answers"], None),
        ([_vqa_ann(10, 1), _vqa_ann(2**70, 2), _vqa_ann(11, 1)], ["annotation #1", "64-bit"], None),
        ([_vqa_ann(10, 1), _vqa_ann(20, 2**70), _vqa_ann(11, 1)], ["annotation #1 (question_id=20)"], None),
    ],
)
def test_vqa2_annotation_pairing(tmp_path, caplog, anns, needles, kept):
    q, _ = _vqa_files(tmp_path)
    a = _vqa_annotations(tmp_path, anns)
    _raises(lambda: read_vqa2(q, a, tmp_path, answer_vocab=["no"]), *needles)
    # A bad annotation also leaves its question without one: two skips; a bad pairing, one.
    read = lambda **kw: read_vqa2(q, a, tmp_path, answer_vocab=["no"], **kw)  # noqa: E731
    (records, _), _ = _skips(read, caplog, tmp_path, n=1 if kept else 2)  # messages name q.json or a2.json
    assert [r.question_id for r in records] == (kept or [10, 11])


def test_vqa2_duplicate_and_overflowing_question_ids(tmp_path, caplog):
    q, a = _vqa_files(tmp_path)
    questions = json.loads(q.read_text())
    questions["questions"].append({"image_id": 2, "question": "Again?", "question_id": 20})
    questions["questions"].append({"image_id": 2**70, "question": "Big?", "question_id": 21})
    q2 = _write_json(tmp_path / "q2.json", questions)
    _raises(lambda: read_vqa2(q2, None, tmp_path, answer_vocab=["no"]),
            q2, "question #3 (question_id=20): duplicate question_id")
    read = lambda **kw: read_vqa2(q2, None, tmp_path, answer_vocab=["no"], **kw)  # noqa: E731
    (records, _), report = _skips(read, caplog, q2, n=2)
    assert [r.question_id for r in records] == [10, 20, 11]
    assert "question #4 (question_id=21): image_id must be a 64-bit" in report.messages[1]


# --- image file names that leave the image folder --------------------------------------------------


@pytest.mark.parametrize("name", ["/etc/passwd", "../secret.jpg", "a/../../secret.jpg", "x\0.jpg", ".."])
def test_coco_file_name_escaping_the_image_folder(tmp_path, caplog, name):
    images = [{"id": 1, "file_name": "a.jpg", "width": 9, "height": 9},
              {"id": 2, "file_name": name, "width": 9, "height": 9}]
    path = _write_json(tmp_path / "esc.json", _coco([_ann(1, 2, [0, 0, 5, 5])], images))
    needle = "NUL" if "\0" in name else "refused"
    _raises(lambda: read_coco_detection(path, tmp_path / "imgs"), path, "image #1 (id=2): file_name", needle)
    records, report = _skips(lambda **kw: read_coco_detection(path, tmp_path / "imgs", **kw), caplog, path)
    assert [r.image_id for r in records] == [1] and report.dropped["of_skipped_image"] == 1


def test_file_names_that_stay_inside_are_kept(tmp_path):
    images = [{"id": i, "file_name": n, "width": 9, "height": 9}
              for i, n in enumerate(["sub/../a.jpg", "..b.jpg", "c..jpg", "d/e.jpg"], 1)]
    path = _write_json(tmp_path / "ok.json", _coco([], images))
    paths = [r.image_path for r in read_coco_detection(path, tmp_path)]
    assert paths == [os.path.join(tmp_path, im["file_name"]) for im in images]


@pytest.mark.parametrize("name", ["/abs/1.jpg", "../1.jpg", "imgs/../../1.jpg"])
def test_snli_ve_flikr30kid_escaping_the_image_folder(tmp_path, caplog, name):
    path = tmp_path / "snli_ve_dev.jsonl"
    path.write_text(_snli_line("1.jpg", "ok", "neutral") + "\n" + _snli_line(name, "bad", "neutral") + "\n")
    _raises(lambda: read_snli_ve(path, tmp_path), f"{path}:2: Flikr30kID", "refused")
    records, _ = _skips(lambda **kw: read_snli_ve(path, tmp_path, **kw), caplog, path)
    assert [r.image_id for r in records] == ["1"]


def test_vqa2_image_name_escaping_the_folder_is_never_stat_ed(tmp_path, caplog, monkeypatch):
    q, a = _vqa_files(tmp_path)
    questions = json.loads(q.read_text())
    questions["data_subtype"] = "x/../../../outside"  # COCO_x/../../../outside_...: leaves it
    q2 = _write_json(tmp_path / "q2.json", questions)
    stat_ed = []
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: stat_ed.append(str(p)) or real_exists(p))
    _raises(lambda: read_vqa2(q2, a, tmp_path / "imgs"), q2, "question #0 (question_id=10): image file name",
            "leaves the image folder")
    assert not any("outside" in p for p in stat_ed), stat_ed
    # COCO-2017 names do not use the split: they are safe, and the first one is what exists.
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "000000000001.jpg").touch()
    records, _ = read_vqa2(q2, a, tmp_path / "imgs")
    assert records[0].image_path == os.path.join(tmp_path, "imgs", "000000000001.jpg")
    assert not any("outside" in p for p in stat_ed), stat_ed
    read = lambda **kw: read_vqa2(q2, a, tmp_path, file_pattern="/abs/{image_id}.jpg", **kw)  # noqa: E731
    (records, _), _ = _skips(read, caplog, q2, n=3)
    assert records == []
