"""The synthetic dataset's later datasets: Visual Genome detection with attributes, MNLI and QQP.

Checked from the written files and the project's readers, as in ``test_synthetic.py``; the MNLI
label check alone uses the generator's genre tables (``_GENRES``), to re-derive every gold label
from the premise.
"""

import csv
import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unit_fast.data import synthetic
from unit_fast.data.readers import ReadReport, read_coco_detection, read_glue
from unit_fast.data.records import MAX_ATTRIBUTES
from unit_fast.data.synthetic import (
    CATEGORIES,
    VG_ATTRIBUTES,
    VG_CATEGORIES,
    VG_COLORS,
    generate,
)

SMALL = dict(num_train=10, num_val=4, image_size=96)
SATURATED = 70  # shape colours are saturated, backgrounds and white stripes are not
WHITE = 228  # min channel above this: a white stripe (backgrounds stay below ~215)
MNLI_TRAIN_HEADER = [
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
    "gold_label",
]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
LABELS = ("entailment", "neutral", "contradiction")


def _tsv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _load(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(
        tmp_path_factory.mktemp("synthetic_more"), seed=0, num_train=40, num_val=12, image_size=128
    )


@pytest.fixture(scope="module")
def vg(data):
    """split -> (parsed JSON, {image_id: [annotations]}, DetectionRecords, ReadReport)."""
    out = {}
    for split in ("train", "val"):
        files = data["files"]["visual_genome"]
        d = _load(files[f"{split}_annotations"])
        anns = defaultdict(list)
        for a in d["annotations"]:
            anns[a["image_id"]].append(a)
        report = ReadReport()
        recs = read_coco_detection(
            files[f"{split}_annotations"],
            files[f"{split}_images"],
            with_attributes=True,
            labelled=True,
            require_categories=True,
            on_error="skip",
            report=report,
        )
        out[split] = (d, anns, recs, report)
    return out


def _mnli(data, name):
    rows = _tsv(data["files"]["glue"]["mnli"][name])
    return rows[0], [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]


# ----------------------------------------------------------------------------------------------
# Layout, summary, determinism
# ----------------------------------------------------------------------------------------------


def test_layout_and_summary(data):
    root = Path(data["root"])
    for rel in (
        "visual_genome/annotations/instances_train.json",
        "visual_genome/annotations/instances_val.json",
        "glue/MNLI/train.tsv",
        "glue/MNLI/dev_matched.tsv",
        "glue/MNLI/dev_mismatched.tsv",
        "glue/QQP/train.tsv",
        "glue/QQP/dev.tsv",
    ):
        assert (root / rel).is_file(), rel
    s = _load(root / "summary.json")
    vg = s["detection_visual_genome"]
    assert vg["images"] == {"train": 20, "val": 6}  # half of COCO's 40 / 12, rounded up
    assert len(list((root / "visual_genome/images").glob("*.jpg"))) == 26
    assert vg["num_classes"] == max(map(int, vg["categories"])) + 1 == 6
    assert vg["attribute_class_num"] == max(map(int, vg["attributes"])) + 1 == 12
    assert vg["chance"]["AP50"] == vg["chance"]["AP"] == 0.0
    assert 0 < vg["chance"]["attribute_majority_top1"] < 0.6
    mnli, qqp = s["glue_mnli"], s["glue_qqp"]
    for key in ("majority_accuracy", "majority_accuracy_matched", "majority_accuracy_mismatched"):
        assert mnli["chance"][key] == pytest.approx(1 / 3, abs=1e-3)
    assert mnli["chance"]["majority_accuracy"] == mnli["chance"]["majority_accuracy_mismatched"]
    dev_dup = sum(r[-1] == "1" for r in _tsv(data["files"]["glue"]["qqp"]["dev"])[1:])
    p = dev_dup / qqp["examples"]["dev"]
    assert qqp["chance"]["majority_accuracy"] == round(1 - p, 4) and 0.55 <= 1 - p <= 0.65
    assert qqp["chance"]["all_duplicate_f1"] == round(2 * p / (1 + p), 4)
    assert set(s["max_tokens"]) >= {"glue_mnli", "glue_qqp"}
    readme = (root / "README.md").read_text()
    assert "attribute_class_num = 12" in readme and "num_classes = 6" in readme
    assert "dev_mismatched" in readme and "QQP" in readme


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def test_new_files_deterministic_by_seed(tmp_path):
    new = ("visual_genome", "glue/MNLI", "glue/QQP")

    def tree(root):
        return {
            p.relative_to(root).as_posix(): _digest(p)
            for d in new
            for p in sorted((root / d).rglob("*"))
            if p.is_file()
        }

    a, b, c = (
        Path(generate(tmp_path / k, seed=s, **SMALL)["root"]) for k, s in (("a", 5), ("b", 5), ("c", 6))
    )
    ta, tb, tc = tree(a), tree(b), tree(c)
    assert ta == tb
    for rel in (
        "visual_genome/annotations/instances_train.json",
        "glue/MNLI/train.tsv",
        "glue/MNLI/dev_mismatched.tsv",
        "glue/QQP/dev.tsv",
    ):
        assert ta[rel] != tc[rel], rel


# Digests of files that depend on numpy's Generator only (no Pillow rasterising or JPEG coding),
# for seed 0 at SMALL. Each stream is seeded by its position in generate()'s list, so a stream
# inserted before the old ones, or an old generator drawing differently, changes these bytes,
# which other tests and the default run's targets rely on. An intended change of those
# datasets updates the digests here.
OLD_TEXT_DIGESTS = {  # from the generator before VG, MNLI and QQP were added
    "glue/SST-2/train.tsv": "ac34ba084036be6a",
    "glue/SST-2/dev.tsv": "33f82c9fce590d0e",
    "glue/QNLI/train.tsv": "c284145916226b8d",
    "glue/QNLI/dev.tsv": "02a880fd2d767f36",
}


def test_old_text_files_unchanged(tmp_path):
    root = Path(generate(tmp_path, seed=0, **SMALL)["root"])
    assert {rel: _digest(root / rel) for rel in OLD_TEXT_DIGESTS} == OLD_TEXT_DIGESTS


# ----------------------------------------------------------------------------------------------
# Visual Genome
# ----------------------------------------------------------------------------------------------


def test_vg_reads_with_attributes(data, vg):
    summary = data["summary"]["detection_visual_genome"]
    image_names = set()
    for split in ("train", "val"):
        d, anns, recs, report = vg[split]
        assert report.skipped == 0 and sum(report.dropped.values()) == 0
        assert len(recs) == len(d["images"]) == summary["images"][split]
        assert sum(len(r.labels) for r in recs) == summary[f"{split}_boxes"]
        assert all(Path(r.image_path).is_file() and len(r.labels) >= 1 for r in recs)  # no empty VG image
        labels = np.concatenate([r.labels for r in recs])
        assert set(labels.tolist()) == set(VG_CATEGORIES) or split == "val"
        attrs = np.concatenate([r.attributes for r in recs])  # (N, 16), -1 = padding
        assert attrs.shape == (len(labels), MAX_ATTRIBUTES)
        valid = attrs >= 0
        # Valid ids first, then padding; ids 1..A-1 (0 is MMF's background attribute, never a label).
        assert (np.sort(~valid, axis=1, kind="stable") == ~valid).all()
        assert attrs[valid].min() >= 1 and attrs[valid].max() < summary["attribute_class_num"]
        assert valid.sum(1).max() <= 3
        no_attributes = (~valid.any(1)).sum()  # boxes that weigh 0 in MMF's attribute loss
        assert no_attributes == summary[f"{split}_boxes_without_attributes"]
        assert no_attributes >= 1 or split == "val"  # a tenth at random: val may have none
        for a in d["annotations"]:  # one colour and one fill, at most one size, never repeated
            names = [VG_ATTRIBUTES[i] for i in a["attribute_ids"]]
            assert len(set(names)) == len(names) and a["iscrowd"] == 0
            if names:
                assert sum(n in VG_COLORS for n in names) == 1
                assert sum(n in ("solid", "striped", "hollow") for n in names) == 1
        assert d["attributes"] == [{"id": int(k), "name": v} for k, v in summary["attributes"].items()]
        assert {c["id"]: c["name"] for c in d["categories"]} == VG_CATEGORIES
        image_names |= {im["file_name"] for im in d["images"]}
        assert all(im["file_name"] == f"{im['id']}.jpg" for im in d["images"])
    train_attrs = {i for a in vg["train"][0]["annotations"] for i in a["attribute_ids"]}
    assert train_attrs == set(VG_ATTRIBUTES)  # every attribute is learnable from train
    assert len(image_names) == summary["images"]["train"] + summary["images"]["val"]  # disjoint splits
    ann_ids = [a["id"] for s in vg.values() for a in s[0]["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))


def test_vg_regenerate_removes_stale_images(tmp_path):
    generate(tmp_path, seed=0, **SMALL)
    generate(tmp_path, seed=0, num_train=5, num_val=2, image_size=96)
    names = {
        im["file_name"]
        for s in ("train", "val")
        for im in _load(tmp_path / f"visual_genome/annotations/instances_{s}.json")["images"]
    }
    assert {p.name for p in (tmp_path / "visual_genome/images").glob("*.jpg")} == names and len(names) == 4


def test_vg_differs_from_coco(data, vg):
    assert VG_CATEGORIES != CATEGORIES
    root = Path(data["root"])
    coco_jpegs = {p.read_bytes() for p in root.glob("coco/*2017/*.jpg")}
    vg_jpegs = {p.read_bytes() for p in (root / "visual_genome/images").glob("*.jpg")}
    assert vg_jpegs and not vg_jpegs & coco_jpegs


def _box_pixels(rgb, bbox):
    x, y, w, h = (int(v) for v in bbox)
    return rgb[y : y + h, x : x + w]  # (h, w, 3)


def test_vg_attributes_match_pixels(data, vg):
    """Each attribute is visible: the colour of the saturated pixels, white stripes exactly for
    "striped", a background-coloured centre exactly for "hollow", and size classes that separate
    by box width within each image size."""
    checked = Counter()
    widths = defaultdict(lambda: defaultdict(list))  # min image side -> size class -> box widths
    for split in ("train", "val"):
        d, anns, _, _ = vg[split]
        for im in d["images"]:
            path = Path(data["files"]["visual_genome"][f"{split}_images"]) / im["file_name"]
            rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)  # (H, W, 3)
            for a in anns[im["id"]]:
                names = {VG_ATTRIBUTES[i] for i in a["attribute_ids"]}
                if not names:
                    continue
                px = _box_pixels(rgb, a["bbox"])
                sat = px.max(-1) - px.min(-1) > SATURATED  # (h, w)
                (color,) = names & set(VG_COLORS)
                mean = px[sat].mean(0)
                assert min(VG_COLORS, key=lambda c: np.abs(mean - VG_COLORS[c]).sum()) == color, (im, a)
                white = (px.min(-1) > WHITE).sum()
                assert (white >= 3) == ("striped" in names), (im, a, white)
                h, w = sat.shape
                if "hollow" in names:  # one pixel: a small hollow triangle's inside is ~3 px wide
                    assert not sat[h // 2, w // 2], (im, a)
                elif "solid" in names:
                    assert sat[h // 2 - 1 : h // 2 + 2, w // 2 - 1 : w // 2 + 2].all(), (im, a)
                size = next((n for n in ("small", "large") if n in names), "medium")
                widths[min(im["width"], im["height"])][size].append(a["bbox"][2])
                checked[size] += 1
    assert min(checked.values()) >= 5
    for m, by_size in widths.items():
        small, medium, large = (by_size.get(k, []) for k in ("small", "medium", "large"))
        if small and medium:
            assert max(small) < min(medium), m
        if medium and large:
            assert max(medium) < min(large), m
        if small and large:
            assert max(small) < min(large), m


# ----------------------------------------------------------------------------------------------
# MNLI
# ----------------------------------------------------------------------------------------------


def test_mnli_format_and_reader(data):
    summary = data["summary"]["glue_mnli"]
    premises = {}
    for name in ("train", "dev_matched", "dev_mismatched"):
        header, rows = _mnli(data, name)
        assert header == (MNLI_TRAIN_HEADER if name == "train" else MNLI_DEV_HEADER)
        text = Path(data["files"]["glue"]["mnli"][name]).read_text()
        assert '"' not in text and text.endswith("\n")
        assert [r["index"] for r in rows] == [str(i) for i in range(len(rows))]
        votes = [c for c in header if c.startswith("label")]
        no_gold = [r for r in rows if r["gold_label"] == "-"]
        assert len(no_gold) == summary["no_gold_label"][name]
        assert (len(no_gold) >= 1) == (name != "train")
        for r in rows:
            assert r["pairID"] == r["promptID"] + r["label1"][0]
            c = Counter(r[v] for v in votes)
            assert set(c) <= set(LABELS)
            if r["gold_label"] == "-":  # no label has 3 of the 5 votes
                assert max(c.values()) < 3
            else:
                assert r["gold_label"] == r["label1"] and c[r["gold_label"]] >= (3 if name != "train" else 1)
            for col in ("sentence1", "sentence2"):  # parses hold the same tokens as the text
                toks = re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", r[col])
                assert r[f"{col}_binary_parse"].replace("(", " ").replace(")", " ").split() == toks
                assert (
                    r[f"{col}_parse"].startswith("(ROOT (S ")
                    and r[f"{col}_parse"].count("(") == len(toks) + 2
                )
        # One hypothesis of each label per premise: the premise alone tells nothing.
        by_prompt = defaultdict(list)
        for r in rows:
            if r["gold_label"] != "-":
                by_prompt[r["promptID"]].append(r)
        assert all(
            sorted(x["gold_label"] for x in g) == sorted(LABELS) and len({x["sentence1"] for x in g}) == 1
            for g in by_prompt.values()
        )
        premises[name] = {r["sentence1"] for r in rows}

        report = ReadReport()
        recs = read_glue("mnli", data["files"]["glue"]["mnli"][name], on_error="skip", report=report)
        assert report.skipped == 0 and report.dropped["no_gold_label"] == len(no_gold)
        assert len(recs) == summary["examples"][name] == len(rows) - len(no_gold)
        n = len(recs) // 3
        assert Counter(r.label for r in recs) == {0: n, 1: n, 2: n}
    assert not premises["train"] & (premises["dev_matched"] | premises["dev_mismatched"])
    assert not premises["dev_matched"] & premises["dev_mismatched"]


def test_mnli_genres(data):
    """Matched dev has the train genres, mismatched dev others; a genre shows in its text."""
    genres = {
        name: {r["genre"] for r in _mnli(data, name)[1]}
        for name in ("train", "dev_matched", "dev_mismatched")
    }
    summary = data["summary"]["glue_mnli"]["genres"]
    assert genres["train"] == genres["dev_matched"] == set(summary["train"]) and len(genres["train"]) == 5
    assert genres["dev_mismatched"] == set(summary["dev_mismatched"]) and len(genres["dev_mismatched"]) == 5
    assert not genres["train"] & genres["dev_mismatched"]

    def words(t):
        return set(re.findall(r"[a-z0-9]+", t.lower()))

    train = _mnli(data, "train")[1]
    by_genre = defaultdict(set)
    for r in train:
        by_genre[r["genre"]] |= words(r["sentence1"])
    shared = {w for w in set().union(*by_genre.values()) if sum(w in g for g in by_genre.values()) > 1}
    own = {g: ws - shared for g, ws in by_genre.items()}  # words only this train genre uses
    matched = _mnli(data, "dev_matched")[1]
    hits = [max(own, key=lambda g: len(words(r["sentence1"]) & own[g])) == r["genre"] for r in matched]
    assert np.mean(hits) >= 0.9
    seen = set().union(*by_genre.values())
    assert all(words(r["sentence1"]) - seen for r in _mnli(data, "dev_mismatched")[1])


def _facts(text, genre):
    """(subject, relation index) -> (value, negated) for every clause of ``text`` (``_GENRES``)."""
    _, _, subjects, rels = synthetic._GENRES[genre]
    text = text.lower()
    out = {}
    for s in subjects:
        for ri, (pos, neg, values) in enumerate(rels):
            alts = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
            for form, negated in [(f, False) for f in pos] + [(neg, True)]:
                pattern = re.escape(f"{s} {form}").replace(re.escape("{v}"), f"(?P<v>{alts})")
                for m in re.finditer(rf"(?<![a-z]){pattern}(?![a-z0-9])", text):
                    assert (s, ri) not in out, (text, s)
                    out[s, ri] = (m.group("v"), negated)
    return out


def test_mnli_labels_follow_from_premise(data):
    """Every gold label re-derived: a hypothesis about a (subject, relation) the premise states is
    entailed when it agrees with the stated value and contradicted otherwise; neutral when the
    premise leaves that relation of that subject open. Negation is balanced across labels."""
    neg_rate = defaultdict(list)
    for name in ("train", "dev_matched", "dev_mismatched"):
        for r in _mnli(data, name)[1]:
            if r["gold_label"] == "-":
                continue
            premise = _facts(r["sentence1"], r["genre"])
            assert premise and not any(n for _, n in premise.values())  # premises state, never deny
            ((key, (value, negated)),) = _facts(r["sentence2"], r["genre"]).items()
            if key not in premise:
                label = "neutral"
            else:
                label = "entailment" if (premise[key][0] == value) != negated else "contradiction"
            assert label == r["gold_label"], r
            neg_rate[label].append(negated)
    rates = {k: np.mean(v) for k, v in neg_rate.items()}
    assert all(0.12 < v < 0.4 for v in rates.values()), rates


# ----------------------------------------------------------------------------------------------
# QQP
# ----------------------------------------------------------------------------------------------


def test_qqp(data):
    summary = data["summary"]["glue_qqp"]
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    text_of, ids, pairs = {}, [], {}
    for split in ("train", "dev"):
        path = data["files"]["glue"]["qqp"][split]
        rows = _tsv(path)
        assert rows[0] == header and all(len(r) == 6 for r in rows[1:])
        assert '"' not in Path(path).read_text()
        for rid, q1, q2, t1, t2, dup in rows[1:]:
            ids.append(int(rid))
            assert t1 != t2 and q1 != q2 and dup in ("0", "1") and t1.endswith("?") and t2.endswith("?")
            for q, t in ((q1, t1), (q2, t2)):
                assert text_of.setdefault(q, t) == t  # a qid names one question, in both files
        pairs[split] = {frozenset((r[3], r[4])) for r in rows[1:]}
        assert len(pairs[split]) == len(rows) - 1
        dups = sum(r[5] == "1" for r in rows[1:])
        assert dups == summary["duplicates"][split] and 0.35 <= dups / (len(rows) - 1) <= 0.45

        report = ReadReport()
        recs = read_glue("qqp", path, on_error="skip", report=report)
        assert report.skipped == 0 and len(recs) == summary["examples"][split] == len(rows) - 1
        assert Counter(r.label for r in recs)[1] == dups
    assert len(ids) == len(set(ids)) and len(set(text_of.values())) == len(text_of) == summary["questions"]
    assert not pairs["train"] & pairs["dev"]
    assert len(text_of) < 2 * len(ids)  # questions recur across pairs, as in QQP


def test_qqp_word_overlap_does_not_decide(data):
    """Duplicates and near misses are phrased alike: the best word-overlap (Jaccard) threshold
    gains little over the majority class."""
    rows = _tsv(data["files"]["glue"]["qqp"]["train"])[1:]

    def words(t):
        return set(re.findall(r"[a-z0-9]+", t.lower()))

    jac = np.array([len(words(a) & words(b)) / len(words(a) | words(b)) for *_, a, b, _ in rows])
    y = np.array([r[5] == "1" for r in rows])
    best = max(((jac >= t) == y).mean() for t in np.unique(jac))
    assert best < (1 - y.mean()) + 0.12


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------


def test_vocab_covers_new_texts_and_keeps_old_ids(data):
    from tests.data.test_synthetic import _bert_tokenizer

    vocab_file = data["files"]["vocab"]
    vocab = Path(vocab_file).read_text().splitlines()
    tok = _bert_tokenizer(vocab_file)
    unk = tok.convert_tokens_to_ids("[UNK]")
    pairs = [
        (r["sentence1"], r["sentence2"])
        for n in ("train", "dev_matched", "dev_mismatched")
        for r in _mnli(data, n)[1]
    ]
    pairs += [(r[3], r[4]) for s in ("train", "dev") for r in _tsv(data["files"]["glue"]["qqp"][s])[1:]]
    enc = tok([a for a, _ in pairs], [b for _, b in pairs])
    assert all(unk not in ids for ids in enc["input_ids"])
    names = list(VG_CATEGORIES.values()) + list(VG_ATTRIBUTES.values())
    assert all(not t.startswith("##") for t in tok.tokenize(" ".join(names + [a for a, _ in pairs[:200]])))
    # The later datasets' words follow the "##" block, so the older tasks' token ids are unchanged.
    last = vocab.index("##9")
    later = vocab[last + 1 :]
    assert later == sorted(later) and later
    old_texts = [r[0] for r in _tsv(data["files"]["glue"]["sst2"]["train"])[1:]]
    old_texts += [q["question"] for q in _load(data["files"]["vqa2"]["train_questions"])["questions"]]
    ids = {t: i for i, t in enumerate(vocab)}
    assert all(ids[w] < last for t in old_texts for w in synthetic._words(t))
