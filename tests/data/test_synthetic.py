"""The embedded synthetic dataset: deterministic, in the real formats, and self-consistent.

Everything is checked from the written files alone (the generator's scene model stays private):
boxes against the decoded JPEG pixels, VQA answers against the COCO annotations and the pixels,
the vocabulary against a BertTokenizerFast built from it.
"""

import csv
import inspect
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unit_fast.data.synthetic import CATEGORIES, COLORS, NUM_CLASSES, _vqa_accuracy, generate

SMALL = dict(num_train=10, num_val=4, image_size=96)
# Shape pixels are strongly saturated, backgrounds near-grey (see COLORS in synthetic.py).
SATURATED = 70
# JPEG (quality 90, 4:4:4) blurs a colour edge by about a pixel.
EDGE_TOL = 2


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path):
    return json.loads(Path(path).read_text())


def _tsv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), seed=0, num_train=40, num_val=12, image_size=128)


@pytest.fixture(scope="module")
def coco(data):
    out = {}
    for split in ("train", "val"):
        d = _load(data["files"]["coco"][f"{split}_annotations"])
        anns = {}
        for a in d["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        out[split] = (d, anns)
    return out


def _pixels(data, split, image):
    path = Path(data["files"]["coco"][f"{split}_images"]) / image["file_name"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)  # (H, W, 3)


def _saturation(rgb):
    return rgb.max(-1) - rgb.min(-1)


def _color_at_center(rgb, bbox) -> str:
    x, y, w, h = bbox
    cx, cy = int(x + w / 2), int(y + h / 2)
    patch = rgb[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
    return min(COLORS, key=lambda c: np.abs(patch - np.asarray(COLORS[c])).sum())


def test_deterministic(tmp_path):
    a = generate(tmp_path / "a", seed=3, **SMALL)
    b = generate(tmp_path / "b", seed=3, **SMALL)
    c = generate(tmp_path / "c", seed=4, **SMALL)
    ta, tb, tc = _tree(Path(a["root"])), _tree(Path(b["root"])), _tree(Path(c["root"]))
    assert ta.keys() == tb.keys()
    assert [k for k in ta if ta[k] != tb[k]] == []
    assert a["summary"] == b["summary"]
    changed = [k for k in ta if k in tc and ta[k] != tc[k]]
    assert "coco/annotations/instances_train2017.json" in changed
    assert "glue/SST-2/train.tsv" in changed
    jpegs = [{v for k, v in t.items() if k.endswith(".jpg")} for t in (ta, tc)]
    assert not jpegs[0] & jpegs[1]  # other image ids too, so compare contents, not names


def test_regenerate_removes_stale_images(tmp_path):
    generate(tmp_path, seed=0, **SMALL)
    generate(tmp_path, seed=0, num_train=5, num_val=2, image_size=96)
    coco = _load(tmp_path / "coco/annotations/instances_train2017.json")
    assert sorted(p.name for p in (tmp_path / "coco/train2017").glob("*.jpg")) == sorted(
        i["file_name"] for i in coco["images"]
    )
    assert len(list((tmp_path / "snli_ve/images").glob("*.jpg"))) == 7


def test_layout(data):
    root = Path(data["root"])
    for rel in (
        "coco/annotations/instances_train2017.json",
        "coco/annotations/instances_val2017.json",
        "vqa2/v2_OpenEnded_mscoco_train2014_questions.json",
        "vqa2/v2_OpenEnded_mscoco_val2014_questions.json",
        "vqa2/v2_mscoco_train2014_annotations.json",
        "vqa2/v2_mscoco_val2014_annotations.json",
        "snli_ve/snli_ve_train.jsonl",
        "snli_ve/snli_ve_dev.jsonl",
        "glue/SST-2/train.tsv",
        "glue/SST-2/dev.tsv",
        "glue/QNLI/train.tsv",
        "glue/QNLI/dev.tsv",
        "vocab.txt",
        "README.md",
        "summary.json",
    ):
        assert (root / rel).is_file(), rel
    assert len(list((root / "coco/train2017").glob("*.jpg"))) == 40
    assert len(list((root / "coco/val2017").glob("*.jpg"))) == 12
    assert _load(root / "summary.json") == json.loads(json.dumps(data["summary"]))
    readme = (root / "README.md").read_text()
    assert "chance" in readme and "num_classes = 7" in readme


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs numpy 2
def test_coco_schema(data, coco):
    from pycocotools.coco import COCO

    ids = {}
    for split in ("train", "val"):
        d, anns = coco[split]
        api = COCO(data["files"]["coco"][f"{split}_annotations"])
        assert sorted(api.getCatIds()) == sorted(CATEGORIES) == [1, 3, 6]
        assert NUM_CLASSES == 7
        ids[split] = set(api.getImgIds())
        for im in d["images"]:
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            with Image.open(Path(data["files"]["coco"][f"{split}_images"]) / im["file_name"]) as f:
                assert f.format == "JPEG" and f.size == (im["width"], im["height"])
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            im = api.imgs[a["image_id"]]
            assert all(isinstance(v, float) for v in a["bbox"]) and w > 0 and h > 0
            assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
            assert a["category_id"] in CATEGORIES and a["iscrowd"] in (0, 1)
            if a["iscrowd"]:  # uncompressed RLE of the whole box
                assert api.annToMask(a).sum() == a["area"] == w * h
            else:
                assert 0 < a["area"] <= w * h
        assert sum(a["iscrowd"] for a in d["annotations"]) >= 1  # crowd removal gets exercised
        assert any(not anns.get(im["id"]) for im in d["images"]) or split == "val"  # an empty image
    assert not ids["train"] & ids["val"]
    ann_ids = [a["id"] for s in coco.values() for a in s[0]["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))


def test_boxes_tight(data, coco):
    """Each box is the extent of the saturated (shape) pixels around it, within JPEG tolerance;
    crowd regions and everything outside the boxes are background."""
    for split in ("train", "val"):
        d, anns = coco[split]
        for im in d["images"]:
            rgb = _pixels(data, split, im)
            shape_px = _saturation(rgb) > SATURATED  # (H, W)
            covered = np.zeros_like(shape_px)
            for a in anns.get(im["id"], []):
                x, y, w, h = (int(v) for v in a["bbox"])
                if a["iscrowd"]:
                    assert not shape_px[y : y + h, x : x + w].any()
                    continue
                m = EDGE_TOL + 1  # shapes are >= 5 px apart, so this window holds one shape
                y0, x0 = max(0, y - m), max(0, x - m)
                ys, xs = np.nonzero(shape_px[y0 : y + h + m, x0 : x + w + m])
                found = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
                assert np.abs(np.subtract(found, (x, y, x + w, y + h))).max() <= EDGE_TOL, (im, a, found)
                # The shape fills its box: the inner part of each drawn shape is saturated.
                assert shape_px[y + h // 2, x + w // 2]
                t = EDGE_TOL
                covered[max(0, y - t) : y + h + t, max(0, x - t) : x + w + t] = True
            assert not (shape_px & ~covered).any(), im


def test_vqa_format_and_consistency(data, coco):
    summary = data["summary"]["vqa2"]
    for split in ("train", "val"):
        qs = _load(data["files"]["vqa2"][f"{split}_questions"])
        an = _load(data["files"]["vqa2"][f"{split}_annotations"])
        assert qs["task_type"] == "Open-Ended" and qs["data_subtype"] == f"{split}2014"
        assert an["data_subtype"] == f"{split}2014"
        d, anns = coco[split]
        images = {im["id"]: im for im in d["images"]}
        by_qid = {a["question_id"]: a for a in an["annotations"]}
        assert len(by_qid) == len(qs["questions"]) == len(an["annotations"])
        kinds = Counter()
        for q in qs["questions"]:
            a = by_qid[q["question_id"]]
            assert a["image_id"] == q["image_id"] and q["image_id"] in images
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            votes = Counter(x["answer"] for x in a["answers"])
            answer = a["multiple_choice_answer"]
            assert votes.most_common(1)[0][0] == answer and votes[answer] >= 7
            assert set(votes) <= set(summary["answers"])
            assert a["answer_type"] in ("yes/no", "number", "other")
            assert _vqa_accuracy([x["answer"] for x in a["answers"]], answer) == 1.0

            shapes = [x for x in anns.get(q["image_id"], []) if not x["iscrowd"]]
            names = [CATEGORIES[x["category_id"]] for x in shapes]
            rgb = _pixels(data, split, images[q["image_id"]])
            colors = [_color_at_center(rgb, x["bbox"]) for x in shapes]
            text = q["question"]
            words = text.rstrip("?").lower().split()
            if text.startswith("How many shapes"):  # How many shapes are in the picture?
                kind, expect = "count", str(len(shapes))
            elif text.startswith("How many") and words[3] == "shapes":  # How many red shapes ...?
                kind, expect = "count", str(colors.count(words[2]))
            elif text.startswith("How many"):  # How many circles are there?
                kind, expect = "count", str(names.count(words[2].removesuffix("s")))
            elif text.startswith("What color is the shape"):
                side = words[-1]
                kind, expect = "position", colors[_extreme(shapes, side)]
            elif text.startswith("What color is the"):
                (i,) = [k for k, n in enumerate(names) if n == words[-1]]
                kind, expect = "color", colors[i]
            elif text.startswith("Which shape is"):
                (i,) = [k for k, c in enumerate(colors) if c == words[-1]]
                kind, expect = "shape", names[i]
            elif text.startswith("What shape is"):
                kind, expect = "position", names[_extreme(shapes, words[-1])]
            elif text.startswith("Is there a"):
                kind = "yes/no"
                expect = "yes" if (words[3], words[4]) in set(zip(colors, names, strict=True)) else "no"
            elif text.startswith("Are there any"):
                kind, expect = "yes/no", "yes" if words[3][:-1] in names else "no"
            else:
                raise AssertionError(f"unknown question {text!r}")
            kinds[kind] += 1
            assert answer == expect, (q, a["answers"], names, colors)
        assert kinds["count"] and kinds["yes/no"]
    assert summary["chance"]["majority_answer_accuracy"] < 0.35
    assert summary["chance"]["oracle_accuracy"] > 0.95


def _extreme(shapes, side):
    """Index of the shape beyond every other on ``side`` (the generator asks only then)."""
    edge = {
        "left": lambda b: (b[0], b[0] + b[2]),
        "right": lambda b: (-(b[0] + b[2]), -b[0]),
        "top": lambda b: (b[1], b[1] + b[3]),
        "bottom": lambda b: (-(b[1] + b[3]), -b[1]),
    }[side]
    order = sorted(range(len(shapes)), key=lambda k: edge(shapes[k]["bbox"])[0])
    first = order[0]
    assert all(edge(shapes[first]["bbox"])[1] <= edge(shapes[k]["bbox"])[0] for k in order[1:])
    return first


def test_vqa_accuracy_rule():
    assert _vqa_accuracy(["2"] * 10, "2") == 1.0
    assert _vqa_accuracy(["2"] * 10, "3") == 0.0
    # One annotator said "3": 9 leave-one-out subsets hold it once (1/3), one holds it never.
    assert _vqa_accuracy(["2"] * 9 + ["3"], "3") == pytest.approx(0.3)
    assert _vqa_accuracy(["2"] * 7 + ["3"] * 3, "3") == pytest.approx(0.9)


def test_real_readers_read_it_back(data, coco):
    """The project's readers take the files as they are: crowd boxes dropped, answers as written."""
    from unit_fast.data.readers import ReadReport
    from unit_fast.data.readers.coco import read_coco_detection
    from unit_fast.data.readers.glue import read_glue
    from unit_fast.data.readers.snli_ve import read_snli_ve
    from unit_fast.data.readers.vqa2 import read_vqa2

    files, summary = data["files"], data["summary"]
    report = ReadReport()
    recs = read_coco_detection(
        files["coco"]["train_annotations"], files["coco"]["train_images"], report=report
    )
    anns = coco["train"][0]["annotations"]
    assert len(recs) == 40 and report.dropped["crowd"] == sum(a["iscrowd"] for a in anns) >= 1
    assert sum(len(r.labels) for r in recs) == summary["detection_coco"]["train_boxes"]
    assert all(Path(r.image_path).is_file() and set(r.labels.tolist()) <= {1, 3, 6} for r in recs)

    vqa, vocab = read_vqa2(
        files["vqa2"]["train_questions"], files["vqa2"]["train_annotations"], files["vqa2"]["train_images"]
    )
    assert set(vocab) <= set(summary["vqa2"]["answers"]) and len(vqa) == summary["vqa2"]["questions"]["train"]
    assert all(Path(r.image_path).is_file() and r.scores.max() == 1.0 for r in vqa)

    ve = read_snli_ve(files["snli_ve"]["dev"], files["snli_ve"]["images"])
    assert len(ve) == summary["snli_ve"]["pairs"]["dev"] and all(Path(r.image_path).is_file() for r in ve)
    assert Counter(r.label for r in ve) == {0: len(ve) // 3, 1: len(ve) // 3, 2: len(ve) // 3}

    for task, key in (("SST-2", "sst2"), ("QNLI", "qnli")):
        rows = read_glue(task, files["glue"][key]["dev"])
        assert len(rows) == summary[f"glue_{key}"]["examples"]["dev"]
        assert Counter(r.label for r in rows) == {0: len(rows) // 2, 1: len(rows) // 2}


def test_snli_ve(data):
    root = Path(data["root"])
    coco_files = {p.name for p in root.glob("coco/*2017/*.jpg")}
    for split in ("train", "dev"):
        rows = [json.loads(line) for line in Path(data["files"]["snli_ve"][split]).read_text().splitlines()]
        assert rows
        for r in rows:
            assert set(r) >= {"Flikr30kID", "sentence1", "sentence2", "gold_label", "pairID", "captionID"}
            assert r["gold_label"] in ("entailment", "neutral", "contradiction")
            assert r["pairID"] == f"{r['captionID']}r1{r['gold_label'][0]}"
            assert r["Flikr30kID"] in coco_files
            assert (root / "snli_ve/images" / r["Flikr30kID"]).is_file()
        counts = Counter(r["gold_label"] for r in rows)
        assert counts["entailment"] == counts["neutral"] == counts["contradiction"] == len(rows) // 3
        # One hypothesis of each label per caption.
        per_caption = Counter((r["captionID"], r["gold_label"]) for r in rows)
        assert set(per_caption.values()) == {1}
        # Entailed and contradicted hypotheses are worded alike: the same first words.
        starts = {
            g: Counter(" ".join(r["sentence2"].split()[:2]) for r in rows if r["gold_label"] == g)
            for g in ("entailment", "contradiction")
        }
        assert len(set(starts["entailment"]) & set(starts["contradiction"])) >= 3


def test_snli_ve_hypotheses_match_images(data, coco):
    """Count and existence hypotheses are true exactly when labelled entailment."""
    number = {w: i for i, w in enumerate(("no", "one", "two", "three", "four", "five", "six"))}
    checked = 0
    for split, ve_split in (("train", "train"), ("val", "dev")):
        d, anns = coco[split]
        by_name = {im["file_name"]: im for im in d["images"]}
        for line in Path(data["files"]["snli_ve"][ve_split]).read_text().splitlines():
            r = json.loads(line)
            im = by_name[r["Flikr30kID"]]
            shapes = [x for x in anns.get(im["id"], []) if not x["iscrowd"]]
            names = [CATEGORIES[x["category_id"]] for x in shapes]
            w = r["sentence2"].rstrip(".").lower().split()
            if len(w) == 4 and w[:2] in (["there", "is"], ["there", "are"]) and w[2] in number:
                # "There are two circles." (not "There is no red circle.")
                true = names.count(w[3].removesuffix("s")) == number[w[2]]
            elif w[:5] == ["the", "picture", "is", "made", "of"]:
                true = len(shapes) == number[w[5]]
            else:
                continue
            assert true == (r["gold_label"] == "entailment"), (r, names)
            checked += 1
    assert checked > 10


def test_glue(data):
    for task, header, labels in (
        ("sst2", ["sentence", "label"], {"0", "1"}),
        ("qnli", ["index", "question", "sentence", "label"], {"entailment", "not_entailment"}),
    ):
        for split in ("train", "dev"):
            path = data["files"]["glue"][task][split]
            text = Path(path).read_text()
            assert '"' not in text and text.endswith("\n")
            rows = _tsv(path)
            assert rows[0] == header
            assert all(len(r) == len(header) for r in rows[1:])
            counts = Counter(r[-1] for r in rows[1:])
            n = len(rows) - 1
            assert set(counts) == labels and max(counts.values()) == (n + 1) // 2  # balanced
            if task == "qnli":
                assert [r[0] for r in rows[1:]] == [str(i) for i in range(n)]
        # No example is in both splits (QNLI compared without its index column).
        train, dev = (
            {tuple(r[-3:] if task == "qnli" else r) for r in _tsv(data["files"]["glue"][task][s])[1:]}
            for s in ("train", "dev")
        )
        assert not train & dev


def _bert_tokenizer(vocab_file):
    from transformers import BertTokenizerFast

    # transformers 5 takes the file as ``vocab`` and silently ignores ``vocab_file`` (a tokenizer
    # of the 5 special tokens only, everything else [UNK]); 4.x takes ``vocab_file``.
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    key = "vocab" if "vocab" in params else "vocab_file"
    return BertTokenizerFast(**{key: str(vocab_file)}, do_lower_case=True)


def test_vocab_covers_every_text(data):
    vocab_file = data["files"]["vocab"]
    vocab = Path(vocab_file).read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocab) == len(set(vocab)) == data["summary"]["vocab_size"]
    tok = _bert_tokenizer(vocab_file)
    assert tok.vocab_size == len(vocab)
    unk = tok.convert_tokens_to_ids("[UNK]")
    assert unk == 1

    texts = {"vqa2": [], "snli_ve": [], "pair": [], "single": []}
    for split in ("train", "val"):
        texts["vqa2"] += [
            q["question"] for q in _load(data["files"]["vqa2"][f"{split}_questions"])["questions"]
        ]
    for split in ("train", "dev"):
        for line in Path(data["files"]["snli_ve"][split]).read_text().splitlines():
            r = json.loads(line)
            texts["snli_ve"].append(r["sentence2"])
            texts["single"].append(r["sentence1"])
        texts["single"] += [r[0] for r in _tsv(data["files"]["glue"]["sst2"][split])[1:]]
        texts["pair"] += [(r[1], r[2]) for r in _tsv(data["files"]["glue"]["qnli"][split])[1:]]
    texts["single"] += data["summary"]["vqa2"]["answers"]
    for kind, items in texts.items():
        assert items
        if kind == "pair":
            enc = tok([a for a, _ in items], [b for _, b in items])
        else:
            enc = tok(items)
        for ids, text in zip(enc["input_ids"], items, strict=True):
            assert unk not in ids, text
            if kind in ("vqa2", "snli_ve"):  # MMF's max_seq_length 25 for these tasks
                assert len(ids) <= 25, text
    # Every word is one whole token (no word-piece splits for words the generator wrote).
    assert all(not t.startswith("##") for t in tok.tokenize(" ".join(texts["vqa2"] + texts["snli_ve"])))


def test_summary_chance_levels(data):
    s = data["summary"]
    assert s["detection_coco"]["num_classes"] == 7
    assert s["detection_coco"]["chance"]["AP50"] == 0.0
    assert s["snli_ve"]["chance"]["majority_accuracy"] == pytest.approx(1 / 3, abs=1e-3)
    assert s["glue_sst2"]["chance"]["majority_accuracy"] == 0.5
    assert s["glue_qnli"]["chance"]["majority_accuracy"] == 0.5
    assert 0 < s["vqa2"]["chance"]["majority_answer_accuracy"] < s["vqa2"]["chance"]["oracle_accuracy"]


def test_cli_matches_function(tmp_path):
    args = ["--seed", "1", "--num-train", "6", "--num-val", "3", "--image-size", "96"]
    res = subprocess.run(
        [sys.executable, "-m", "unit_fast.data.synthetic", "--out", str(tmp_path / "cli"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "chance" in res.stdout
    generate(tmp_path / "fn", seed=1, num_train=6, num_val=3, image_size=96)
    assert _tree(tmp_path / "cli") == _tree(tmp_path / "fn")


def test_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError):
        generate(tmp_path, num_train=0)
