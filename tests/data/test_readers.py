"""Readers on small fixtures written here in the real file formats.

No image is opened by the readers (COCO, SNLI-VE and GLUE tests create no image files at all);
only the VQAv2 reader looks whether one file exists, to pick the file-name pattern.
"""

import gc
import json
import os

import numpy as np
import pytest
import torch

from unit_fast.data.readers import (
    ReadReport,
    build_answer_vocab,
    load_answer_vocab,
    normalize_answer,
    read_coco_detection,
    read_glue,
    read_snli_ve,
    read_vqa2,
    vqa_accuracy,
)
from unit_fast.data.readers.vqa2 import soft_score
from unit_fast.data.records import DetectionRecord, EntailmentRecord, TextRecord, VQARecord
from unit_fast.data.text import SPECIAL_TOKENS, encode, load_tokenizer, write_vocab


def _write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


# --- COCO / Visual Genome detection ---------------------------------------------------------


def _coco(annotations, images=None):
    images = images or [
        {"id": 1, "file_name": "000000000001.jpg", "width": 640, "height": 480},
        {"id": 2, "file_name": "000000000002.jpg", "width": 100, "height": 50},
        {"id": 3, "file_name": "000000000003.jpg", "width": 30, "height": 30},  # no annotations
    ]
    cats = [{"id": i, "name": f"c{i}", "supercategory": "s"} for i in (1, 18, 90)]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": cats}


def _ann(id, image_id, bbox, category_id=18, iscrowd=0, **extra):
    return {
        "id": id,
        "image_id": image_id,
        "bbox": bbox,
        "category_id": category_id,
        "iscrowd": iscrowd,
        "area": bbox[2] * bbox[3] if isinstance(bbox, list) and len(bbox) == 4 else 1.0,
        **extra,
    }


COCO_ANNS = [
    _ann(10, 1, [10.0, 20.0, 30.0, 40.0], category_id=90),  # -> xyxy (10, 20, 40, 60), raw id 90
    _ann(11, 1, [0.0, 0.0, 640.0, 480.0], iscrowd=1),  # crowd: removed
    _ann(12, 2, [90.0, 40.0, 20.0, 20.0], category_id=1),  # sticks out: clipped to (90, 40, 100, 50)
    _ann(13, 2, [5.0, 5.0, 0.0, 10.0]),  # zero width: degenerate
    _ann(14, 2, [120.0, 10.0, 5.0, 5.0]),  # right of the image: zero width after clipping
    _ann(15, 1, [1.0, 2.0, 3.0, 4.0], category_id=1),  # second box of image 1, after id 10
]


def test_coco_boxes_labels_crowd_and_empty_images(tmp_path):
    path = _write_json(tmp_path / "instances_val2017.json", _coco(COCO_ANNS))
    report = ReadReport()
    records = read_coco_detection(path, tmp_path / "val2017", report=report)

    assert [r.image_id for r in records] == [1, 2, 3]
    assert all(isinstance(r, DetectionRecord) for r in records)
    r1, r2, r3 = records
    assert r1.image_path == os.path.join(tmp_path / "val2017", "000000000001.jpg")
    assert (r1.width, r1.height, r2.width, r2.height) == (640, 480, 100, 50)
    np.testing.assert_array_equal(r1.boxes, [[10, 20, 40, 60], [1, 2, 4, 6]])
    np.testing.assert_array_equal(r1.labels, [90, 1])
    np.testing.assert_array_equal(r1.area, [1200, 12])
    np.testing.assert_array_equal(r2.boxes, [[90, 40, 100, 50]])
    np.testing.assert_array_equal(r2.area, [400])  # as annotated, not re-computed after clipping
    assert r1.attributes is None
    for r in records:
        assert r.boxes.dtype == np.float32 and r.boxes.shape == (len(r.labels), 4)
        assert r.labels.dtype == np.int64 and r.area.dtype == np.float32
    assert r3.boxes.shape == (0, 4) and r3.labels.shape == (0,) and r3.area.shape == (0,)
    assert report.dropped == {"crowd": 1, "degenerate": 2} and report.skipped == 0


def test_coco_agrees_with_pycocotools(tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco")
    path = _write_json(tmp_path / "instances_val2017.json", _coco(COCO_ANNS))
    api = coco_api.COCO(str(path))
    for r in read_coco_detection(path, tmp_path):
        ids = [i for i in api.getAnnIds(imgIds=r.image_id, iscrowd=False) if i not in (13, 14)]  # degenerate
        assert r.labels.tolist() == [a["category_id"] for a in api.loadAnns(ids)]


def test_visual_genome_attributes(tmp_path):
    anns = [
        _ann(1, 1, [0, 0, 5, 5], attribute_ids=[3, 7]),
        _ann(2, 1, [0, 0, 5, 5], attribute_ids=list(range(20))),  # truncated to 16
        _ann(3, 1, [0, 0, 5, 5]),  # no attributes
    ]
    path = _write_json(tmp_path / "vg.json", _coco(anns))
    records = read_coco_detection(path, tmp_path, with_attributes=True)
    attrs = records[0].attributes
    assert attrs.dtype == np.int64 and attrs.shape == (3, 16)
    np.testing.assert_array_equal(attrs[0], [3, 7] + [-1] * 14)
    np.testing.assert_array_equal(attrs[1], np.arange(16))
    np.testing.assert_array_equal(attrs[2], [-1] * 16)
    assert records[2].attributes.shape == (0, 16)


@pytest.mark.parametrize(
    "anns, images, needle",
    [
        ([{"id": 7, "image_id": 1, "category_id": 1}], None, "annotation id=7"),  # no bbox
        ([_ann(8, 1, [1, 2, 3])], None, "annotation id=8"),  # 3 numbers
        ([_ann(9, 1, [1, 2, "3", 4])], None, "annotation id=9"),
        ([_ann(5, 42, [1, 2, 3, 4])], None, "annotation id=5 (image_id=42): refers to an unknown image"),
        (
            [_ann(6, 1, [float("inf"), 0, 1, 1])],
            None,
            "annotation id=6 (image_id=1): bbox and area must be finite",
        ),
        ([], [{"id": 4, "width": 10, "height": 10}], "image #0 (id=4): missing file_name"),
        ([], [{"id": 6, "file_name": "x.jpg", "height": 10}], "image #0 (id=6): width"),
    ],
)
def test_coco_malformed_names_file_and_record(tmp_path, anns, images, needle):
    path = _write_json(tmp_path / "bad.json", _coco(anns, images))
    with pytest.raises(ValueError) as exc:
        read_coco_detection(path, tmp_path)
    assert str(path) in str(exc.value) and needle in str(exc.value)


def test_coco_skip_and_count(tmp_path):
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 10, "height": 10},
        {"id": 2, "width": 10, "height": 10},  # no file_name: skipped, with its annotation
    ]
    anns = [_ann(1, 1, [0, 0, 2, 2]), _ann(2, 1, [0, 0]), _ann(3, 2, [0, 0, 2, 2]), _ann(4, 9, [0, 0, 2, 2])]
    path = _write_json(tmp_path / "bad.json", _coco(anns, images))
    report = ReadReport()
    records = read_coco_detection(path, tmp_path, on_error="skip", report=report)
    assert [r.image_id for r in records] == [1] and len(records[0].labels) == 1
    assert report.skipped == 3  # image 2, annotation 2 (bbox), annotation 4 (unknown image)
    assert report.dropped["of_skipped_image"] == 1
    assert all(str(path) in m for m in report.messages)
    assert gc.isenabled()  # the readers pause the collector only while they run
    with pytest.raises(ValueError, match="on_error"):
        read_coco_detection(path, tmp_path, on_error="ignore")


# --- VQAv2 ------------------------------------------------------------------------------------


def _answers(*pairs):
    """_answers(("yes", 2), ("no", 8)) -> the official list of 10 answer dicts."""
    flat = [a for a, k in pairs for _ in range(k)]
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(flat)]


def _vqa_files(tmp_path, split="train2014"):
    questions = {
        "data_subtype": split,
        "questions": [
            {"image_id": 1, "question": "Is it raining?", "question_id": 10},
            {"image_id": 2, "question": "How many dogs?", "question_id": 20},
            {"image_id": 1, "question": "Any cats?", "question_id": 11},
        ],
    }
    annotations = {
        "annotations": [
            {
                "question_id": 10,
                "image_id": 1,
                "answer_type": "yes/no",
                "multiple_choice_answer": "no",
                "answers": _answers(("yes", 2), ("no", 8)),
            },
            {
                "question_id": 20,
                "image_id": 2,
                "answer_type": "number",
                "multiple_choice_answer": "2",
                "answers": _answers(("Two", 3), ("2", 1), ("the dog", 1), ("3", 5)),
            },
            {
                "question_id": 11,
                "image_id": 1,
                "answer_type": "yes/no",
                "multiple_choice_answer": "No.",
                "answers": _answers(("no", 10)),
            },
        ]
    }
    return _write_json(tmp_path / "q.json", questions), _write_json(tmp_path / "a.json", annotations)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("The Dog.", "dog"),
        ("a man's hat?", "man's hat"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("yes!", "yes"),
        ("3.5", "3.5"),
        ("1,000", "1000"),  # a digit,digit comma: every punctuation mark is dropped, not spaced
        ("hot-dog", "hot dog"),
        ("hot - dog", "hot dog"),
        ("  Yes\n", "yes"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_soft_score_leave_one_out():
    # 2 of 10 humans said it.  Leaving out one of those 2 leaves 1 match: min(1, 1/3) = 1/3 (twice);
    # leaving out one of the other 8 leaves 2 matches: 2/3 (8 times).  Mean: (2/3 + 16/3) / 10 = 0.6.
    assert soft_score(2) == pytest.approx(0.6)
    assert [round(soft_score(k), 6) for k in (0, 1, 3, 4, 10)] == [0, 0.3, 0.9, 1, 1]
    for k in range(11):  # closed form == the literal rule
        humans = [1] * k + [0] * (10 - k)
        loo = [min(1, sum(humans[:i] + humans[i + 1 :]) / 3) for i in range(10)]
        assert soft_score(k) == pytest.approx(sum(loo) / 10)


def test_vqa2_records_scores_and_built_vocab(tmp_path):
    q, a = _vqa_files(tmp_path)
    (tmp_path / "COCO_train2014_000000000001.jpg").touch()
    records, vocab = read_vqa2(q, a, tmp_path)
    # multiple_choice_answer counts after normalisation: "no" 2 ("no", "No."), "2" 1; ties alphabetical
    assert vocab == ["no", "2"]
    assert [r.question_id for r in records] == [10, 20, 11] and all(isinstance(r, VQARecord) for r in records)
    r10, r20, r11 = records
    assert r10.image_path == os.path.join(tmp_path, "COCO_train2014_000000000001.jpg")
    assert r20.image_path == os.path.join(tmp_path, "COCO_train2014_000000000002.jpg")
    assert r10.question == "Is it raining?" and len(r10.answers) == 10
    assert r10.scores.dtype == np.float32 and r10.scores.shape == (2,)
    # q10: "no" said by 8 -> 1.0 ("yes", 2 humans -> 0.6, is not in the vocabulary)
    np.testing.assert_allclose(r10.scores, [1.0, 0.0])
    # q20: "Two" x3 and "2" x1 normalise to "2": 4 matches -> 1.0; "no" absent -> 0
    np.testing.assert_allclose(r20.scores, [0.0, 1.0])
    np.testing.assert_allclose(r11.scores, [1.0, 0.0])

    assert build_answer_vocab(["b", "x", "b", "c", "X.", "d"], size=2) == ["b", "x"]


def test_vqa2_given_vocab_file_pattern_and_accuracy(tmp_path):
    q, a = _vqa_files(tmp_path)
    vocab_file = tmp_path / "answers_vqa.txt"
    vocab_file.write_text("yes\nno\n2\n3\n\n")
    (tmp_path / "000000000001.jpg").touch()  # COCO-2017 names only: detected
    records, vocab = read_vqa2(q, a, tmp_path, answer_vocab=vocab_file)
    assert vocab == ["yes", "no", "2", "3"] and load_answer_vocab(["x", "y"]) == ["x", "y"]
    assert records[0].image_path == os.path.join(tmp_path, "000000000001.jpg")
    np.testing.assert_allclose(records[0].scores, [0.6, 1.0, 0, 0])
    # q20: "2" 4 humans -> 1.0; "3" 5 humans -> 1.0; "dog" 1 human -> 0.3 but not in vocab
    np.testing.assert_allclose(records[1].scores, [0, 0, 1.0, 1.0])

    records, _ = read_vqa2(q, a, tmp_path, vocab, file_pattern="img_{split}_{image_id}.png")
    assert records[1].image_path == os.path.join(tmp_path, "img_train2014_2.png")

    # q10 "Yes" -> 0.6; q20 "two" -> "2": 1.0; q11 "yes" -> 0 (all ten said no)
    preds = {10: "Yes", 20: "two", 11: "yes"}
    assert vqa_accuracy(preds, records) == pytest.approx((0.6 + 1.0 + 0.0) / 3)
    assert vqa_accuracy(["no", "3", "no"], records) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no prediction"):
        vqa_accuracy({10: "yes"}, records)
    with pytest.raises(ValueError, match="load_answer|duplicates"):
        load_answer_vocab(["a", "a"])


def test_vqa2_test_split_without_annotations(tmp_path):
    q, _ = _vqa_files(tmp_path, split="test2015")
    records, vocab = read_vqa2(q, None, tmp_path, answer_vocab=["yes", "no"])
    assert vocab == ["yes", "no"] and all(r.answers == [] and r.scores is None for r in records)
    assert records[0].image_path == os.path.join(tmp_path, "COCO_test2015_000000000001.jpg")  # default
    with pytest.raises(ValueError, match="answer_vocab"):
        read_vqa2(q, None, tmp_path)


def test_vqa2_malformed(tmp_path):
    q, _ = _vqa_files(tmp_path)
    a = _write_json(
        tmp_path / "a_bad.json",
        {
            "annotations": [
                {"question_id": 10, "multiple_choice_answer": "no", "answers": _answers(("no", 10))},
                {"question_id": 20, "multiple_choice_answer": "2", "answers": [{"answer_id": 1}]},
            ]
        },
    )
    with pytest.raises(ValueError, match=r"a_bad\.json: annotation #1 \(question_id=20\)"):
        read_vqa2(q, a, tmp_path)
    report = ReadReport()
    records, _ = read_vqa2(q, a, tmp_path, on_error="skip", report=report)
    # annotation 20 malformed; then questions 20 and 11 have no annotation
    assert [r.question_id for r in records] == [10] and report.skipped == 3
    assert any("q.json: question #2 (question_id=11): no annotation" in m for m in report.messages)


# --- SNLI-VE ----------------------------------------------------------------------------------


def _snli_line(image, hypothesis, label):
    return json.dumps(
        {
            "Flikr30kID": image,
            "sentence1": "A caption.",
            "sentence2": hypothesis,
            "gold_label": label,
            "pairID": "x",
            "captionID": "y",
        }
    )


def test_snli_ve(tmp_path):
    lines = [
        _snli_line("2248275918.jpg", "Two people are outside.", "entailment"),
        _snli_line("2248275918.jpg", "They are friends.", "neutral"),
        "",
        _snli_line("1000092795.jpg", "Nobody is there.", "contradiction"),
        _snli_line("1000092795.jpg", "Who knows.", "-"),  # no majority label: left out
    ]
    path = tmp_path / "snli_ve_dev.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = ReadReport()
    records = read_snli_ve(path, tmp_path / "flickr30k_images", report=report)
    assert all(isinstance(r, EntailmentRecord) for r in records)
    assert [r.label for r in records] == [0, 1, 2]  # entailment, neutral, contradiction
    assert records[0].image_id == "2248275918" and records[0].hypothesis == "Two people are outside."
    assert records[0].image_path == os.path.join(tmp_path / "flickr30k_images", "2248275918.jpg")
    assert report.dropped["no_gold_label"] == 1 and report.skipped == 0


def test_snli_ve_malformed(tmp_path):
    path = tmp_path / "snli_ve_train.jsonl"
    path.write_text(
        "\n".join(
            [
                _snli_line("1.jpg", "ok", "entailment"),
                json.dumps({"Flikr30kID": "2.jpg", "gold_label": "neutral"}),  # no sentence2
                '{"Flikr30kID": "3.jpg", "sentence2": "cut off',
            ]
        )
        + "\n"
    )
    with pytest.raises(ValueError, match=r"snli_ve_train\.jsonl:2: .*sentence2"):
        read_snli_ve(path, tmp_path)
    report = ReadReport()
    assert len(read_snli_ve(path, tmp_path, on_error="skip", report=report)) == 1
    assert report.skipped == 2 and "snli_ve_train.jsonl:3: malformed JSON" in report.messages[1]


# --- GLUE -------------------------------------------------------------------------------------


def _tsv(path, rows):
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


def test_glue_sst2_train_and_test(tmp_path):
    train = _tsv(tmp_path / "train.tsv", [["sentence", "label"], ["a gorgeous film ", "1"], ["dull", "0"]])
    records = read_glue("SST-2", train)
    assert records == [TextRecord("a gorgeous film ", None, 1, "0"), TextRecord("dull", None, 0, "1")]
    test = _tsv(tmp_path / "test.tsv", [["index", "sentence"], ["0", "uneasy mishmash"], ["1", "fine"]])
    assert read_glue("sst2", test) == [
        TextRecord("uneasy mishmash", None, -1, "0"),
        TextRecord("fine", None, -1, "1"),
    ]


def test_glue_qnli_quotes_are_plain_text(tmp_path):
    path = _tsv(
        tmp_path / "dev.tsv",
        [
            ["index", "question", "sentence", "label"],
            ["0", 'What is "Jazz?', "It is music.", "entailment"],  # an unbalanced quote must not span rows
            ["1", "Who?", 'Nobody said "so".', "not_entailment"],
        ],
    )
    records = read_glue("glue_qnli", path)
    assert [(r.text_a, r.text_b, r.label, r.index) for r in records] == [
        ('What is "Jazz?', "It is music.", 0, "0"),
        ("Who?", 'Nobody said "so".', 1, "1"),
    ]


def test_glue_qqp_malformed_rows(tmp_path):
    path = _tsv(
        tmp_path / "train.tsv",
        [
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            ["0", "1", "2", "How do I learn?", "How to learn?", "1"],
            ["1", "3", "4", "A question split by a newline"],  # as in the real file: too few columns
            ["2", "5", "6", "Why?", "Why not?", "0"],
        ],
    )
    with pytest.raises(ValueError, match=r"train\.tsv:3: 4 columns, header has 6"):
        read_glue("qqp", path)
    report = ReadReport()
    records = read_glue("qqp", path, on_error="skip", report=report)
    assert [(r.text_a, r.text_b, r.label, r.index) for r in records] == [
        ("How do I learn?", "How to learn?", 1, "0"),
        ("Why?", "Why not?", 0, "2"),
    ]
    assert report.skipped == 1
    test = _tsv(tmp_path / "test.tsv", [["id", "question1", "question2"], ["7", "q1", "q2"]])
    assert read_glue("qqp", test) == [TextRecord("q1", "q2", -1, "7")]


def test_glue_mnli_columns_and_labels(tmp_path):
    header = [
        "index",
        "promptID",
        "pairID",
        "genre",
        "sentence1_binary_parse",
        "sentence2_binary_parse",
        "sentence1_parse",
        "sentence2_parse",
        "sentence1",
        "sentence2",
        "label1",
        "label2",
        "label3",
        "label4",
        "label5",
        "gold_label",
    ]

    def row(i, s1, s2, gold):
        return [str(i), "p", "q", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2] + [gold] * 6

    path = _tsv(
        tmp_path / "dev_mismatched.tsv",
        [
            header,
            row(0, "P0", "H0", "contradiction"),
            row(1, "P1", "H1", "entailment"),
            row(2, "P2", "H2", "neutral"),
            row(3, "P3", "H3", "-"),
        ],
    )
    report = ReadReport()
    records = read_glue("mnli_mismatched", path, report=report)
    # MMF / HF datasets order: entailment 0, neutral 1, contradiction 2
    assert [(r.text_a, r.text_b, r.label) for r in records] == [
        ("P0", "H0", 2),
        ("P1", "H1", 0),
        ("P2", "H2", 1),
    ]
    assert report.dropped["no_gold_label"] == 1
    test = _tsv(tmp_path / "test_matched.tsv", [header[:10], row(9, "P", "H", "x")[:10]])
    assert read_glue("mnli", test) == [TextRecord("P", "H", -1, "9")]
    bad = _tsv(tmp_path / "bad.tsv", [header, row(0, "P", "H", "maybe")])
    with pytest.raises(ValueError, match=r"bad\.tsv:2: unknown gold_label 'maybe'"):
        read_glue("mnli", bad)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        read_glue("cola", bad)


# --- tokenizer ----------------------------------------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "##s"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_vocab(WORDS, tmp_path_factory.mktemp("vocab") / "vocab.txt"))


def test_write_vocab_and_load(tmp_path, tokenizer):
    path = write_vocab(["The", "cat", "cat", "[PAD]"], tmp_path / "vocab.txt")
    assert path.read_text().split("\n") == [*SPECIAL_TOKENS, "the", "cat", ""]
    assert (
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.mask_token_id,
    ) == (0, 1, 2, 3, 4)
    assert tokenizer.encode("The CATS", add_special_tokens=False) == [5, 6, 12]  # lower-cased, ##s
    tokenizer.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode("Dog ran") == tokenizer.encode("Dog ran")
    for missing in (tmp_path / "nope" / "vocab.txt", "no-such-model-in-the-cache"):
        with pytest.raises(FileNotFoundError, match=str(missing).split("/")[-1]):
            load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither"):
        load_tokenizer(tmp_path / "empty")


def test_encode_single_and_pair(tokenizer):
    out = encode(tokenizer, "The cat sat", max_length=8)
    assert set(out) == {"input_ids", "input_mask", "segment_ids"}
    assert all(t.dtype == torch.int64 and t.shape == (8,) for t in out.values())
    assert out["input_ids"].tolist() == [2, 5, 6, 7, 3, 0, 0, 0]  # [CLS] the cat sat [SEP] [PAD]...
    assert out["input_mask"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert out["segment_ids"].tolist() == [0] * 8

    out = encode(tokenizer, "the cat", "a dog", max_length=9)  # "a" is not in the vocabulary
    assert out["input_ids"].tolist() == [2, 5, 6, 3, 1, 10, 3, 0, 0]
    assert out["input_mask"].tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert out["segment_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0]


def test_encode_truncation(tokenizer):
    # single: keep max_length - 2 tokens
    assert encode(tokenizer, "the cat sat on mat", max_length=4)["input_ids"].tolist() == [2, 5, 6, 3]
    # pair, 5 + 2 tokens into 7 - 3 = 4: pop from the longer (a) until 2 + 2
    out = encode(tokenizer, "the cat sat on mat", "dog ran", max_length=7)
    assert out["input_ids"].tolist() == [2, 5, 6, 3, 10, 11, 3]
    # pair, 3 + 3 into 4: tie pops b first -> 3 + 2, then a -> 2 + 2
    out = encode(tokenizer, "the cat sat", "on mat dog", max_length=7)
    assert out["input_ids"].tolist() == [2, 5, 6, 3, 8, 9, 3]
    assert out["segment_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="no room"):
        encode(tokenizer, "the", "cat", max_length=2)
