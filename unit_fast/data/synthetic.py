"""The embedded default dataset: a small synthetic multitask dataset, written in the real formats.

``python -m unit_fast.data.synthetic --out DIR [--seed 0] [--num-train 600] [--num-val 150]
[--image-size 160]`` or ``generate(out_dir, ...)`` writes, deterministically by seed (same seed and
sizes -> byte-identical files, whatever ``DIR`` is)::

    DIR/coco/annotations/instances_{train,val}2017.json   COCO detection JSON
    DIR/coco/{train,val}2017/{image_id:012d}.jpg          JPEG images of coloured shapes
    DIR/visual_genome/annotations/instances_{train,val}.json   VG detection (COCO-style + attribute_ids)
    DIR/visual_genome/images/{image_id}.jpg              its own JPEG scenes (half as many as COCO)
    DIR/vqa2/v2_OpenEnded_mscoco_{train,val}2014_questions.json
    DIR/vqa2/v2_mscoco_{train,val}2014_annotations.json    VQAv2, about the COCO images above
    DIR/snli_ve/snli_ve_{train,dev}.jsonl                  SNLI-VE pairs
    DIR/snli_ve/images/{image_id:012d}.jpg                 the same JPEG bytes as the COCO files
    DIR/glue/SST-2/{train,dev}.tsv, DIR/glue/QNLI/{train,dev}.tsv, DIR/glue/QQP/{train,dev}.tsv
    DIR/glue/MNLI/{train,dev_matched,dev_mismatched}.tsv
    DIR/vocab.txt                                          BERT WordPiece vocabulary (no [UNK] needed)
    DIR/README.md, DIR/summary.json                        tasks, counts, chance levels, settings

Readers are meant to read it as they read the real datasets; what they must be told:

- **Detection.** Categories use raw, non-contiguous ids ``1 circle, 3 square, 6 triangle``
  (``CATEGORIES``), so ``num_classes = 7`` (max id + 1, as COCO's 90 -> 91). Boxes are the tight
  ``xywh`` box of the drawn pixels; ``area`` is the drawn pixel count. Every tenth image (index
  ``% 10 == 5``) also carries one ``iscrowd = 1`` annotation (uncompressed RLE, category circle) over
  an *empty* background rectangle: a correct reader drops it, and since nothing is drawn there it
  costs learning nothing; COCOeval treats it as an ignore region. Shapes never overlap (a gap of
  ``GAP`` px), so every box is exactly the extent of one shape.
- **Visual Genome.** MMF's COCO-style VG detection JSON: contiguous ids ``1 square, 2 circle,
  3 triangle, 4 diamond, 5 cross`` (``VG_CATEGORIES``; ``num_classes = 6``); each annotation has
  ``attribute_ids``, 0 to 3 ids of ``VG_ATTRIBUTES`` (a colour, a fill, and "small"/"large" unless
  medium-sized; ``[]`` for a tenth of the boxes), listed with their names in the file's top-level
  ``attributes``. Ids start at 1 (MMF keeps 0 for "no attribute"): ``attribute_class_num = 12``.
  No crowd boxes; every image has a shape. Read with ``read_coco_detection(...,
  with_attributes=True)``.
- **VQAv2.** ``image_id`` are the COCO ids; the images are the COCO-2017-named files: train questions
  against ``coco/train2017``, val questions against ``coco/val2017``, file ``{image_id:012d}.jpg``
  (not the 2014 ``COCO_train2014_...`` names). Answers are a closed set (``summary.json``:
  ``vqa2.answers``); the answer vocabulary is built from the training annotations.
- **SNLI-VE.** ``Flikr30kID`` (sic, as the real files) is the file name in ``snli_ve/images``.
  Each caption has one hypothesis of each label, so labels are exactly balanced.
- **MNLI.** GLUE's MNLI columns (parses included; train has ``label1``, dev files ``label1..5``);
  dev files hold a few rows whose ``gold_label`` is ``-`` (no annotator majority), which readers
  drop. ``dev_matched`` uses the train genres, ``dev_mismatched`` five others. Each premise has
  one hypothesis of each label: labels exactly balanced once the ``-`` rows are dropped.
- **QQP.** GLUE's QQP columns; 40 % duplicates; ``qid``s are shared across the two files.
- **Text.** A lower-casing BERT WordPiece tokenizer of ``DIR/vocab.txt`` covers every text with
  whole-word tokens: ``BertTokenizerFast(vocab=...)`` (transformers 5, which silently ignores
  ``vocab_file=``), ``BertTokenizerFast(vocab_file=...)`` (4.x) or ``from_pretrained(DIR)``.
  ``summary.json`` has the vocabulary size and the longest text per task. The words that only
  MNLI, QQP and VG bring come last (after the ``##`` pieces), so the older tasks' token ids are
  those of the vocabulary written before those datasets existed.

The generator needs numpy and Pillow only. Its scene model (which shapes, colours, positions) is
private; tests recover everything from the written files.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = {1: "circle", 3: "square", 6: "triangle"}  # raw ids, non-contiguous like COCO's
NUM_CLASSES = max(CATEGORIES) + 1  # 7: the detection head's num_classes, as COCO's 91
SHAPE_IDS = {name: cid for cid, name in CATEGORIES.items()}
SHAPES = tuple(CATEGORIES.values())
# Nominal RGB of each colour. All are strongly saturated (max - min channel >= 120) while the
# backgrounds are near-grey (saturation < 50 with noise), so "saturation > 70" separates shape
# pixels from background pixels even after JPEG: the tests rely on it.
COLORS = {"red": (215, 45, 45), "green": (45, 165, 70), "blue": (45, 85, 215), "yellow": (225, 200, 45)}
COLOR_NAMES = tuple(COLORS)
MAX_SHAPES = 5  # per image; count answers are "0".."5"
GAP = 5  # min pixels between two shapes' boxes (and the crowd region)
CROWD_EVERY = 10  # image index % CROWD_EVERY == CROWD_EVERY // 2 gets a crowd annotation
EMPTY_FRACTION = 0.06  # images with no shape at all
JPEG_QUALITY = 90  # fixed quality and 4:4:4 chroma: deterministic bytes, crisp colour edges
QUESTIONS_PER_IMAGE = 5
CAPTIONS_PER_IMAGE = 2  # SNLI-VE: each caption gets one entailed, one neutral, one contradicted hypothesis
TEXT_PER_IMAGE = 4  # GLUE examples per image of the split (SST-2 and QNLI each)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")
ENTAILMENT_LABELS = ("entailment", "neutral", "contradiction")

# Visual Genome detection (MMF's COCO-style JSON whose annotations carry ``attribute_ids``): scenes
# of its own, drawn with shapes, colours, fills and sizes that the attributes name.
VG_CATEGORIES = {1: "square", 2: "circle", 3: "triangle", 4: "diamond", 5: "cross"}  # contiguous, as VG's
VG_NUM_CLASSES = max(VG_CATEGORIES) + 1  # 6: the VG head's num_classes (VG: 1601)
VG_SHAPE_IDS = {name: cid for cid, name in VG_CATEGORIES.items()}
VG_COLORS = {  # saturated like COLORS (max - min channel >= 140), two hues more
    "red": (215, 45, 45),
    "orange": (235, 135, 35),
    "yellow": (225, 200, 45),
    "green": (45, 165, 70),
    "blue": (45, 85, 215),
    "purple": (150, 60, 205),
}
VG_FILLS = ("solid", "striped", "hollow")  # striped: colour and white rows; hollow: an outline only
VG_SIZES = ("small", "medium", "large")  # of the shape against the image; "medium" has no attribute
# Attribute ids start at 1: MMF's VG attribute vocabulary keeps 0 for its background class
# ("__no_attribute__"), which no box is labelled with; so attribute_class_num = max id + 1.
VG_ATTRIBUTES = dict(enumerate((*VG_COLORS, *VG_FILLS, "small", "large"), start=1))
VG_ATTRIBUTE_IDS = {name: aid for aid, name in VG_ATTRIBUTES.items()}
VG_ATTRIBUTE_CLASS_NUM = max(VG_ATTRIBUTES) + 1  # 12: the attribute head's attribute_class_num (VG: 401)
VG_IMAGE_SHARE = 2  # VG gets ceil(1/2) as many images as COCO: images are most of generate()'s time
VG_MAX_SHAPES = 6  # per image, at least 1 (VG images always hold objects)
VG_PLACE_TRIES = 20  # random placements tried per shape; failing them ends the scene (a full image)
VG_NO_ATTRIBUTES = 0.1  # fraction of boxes annotated with no attribute at all, as many VG boxes are
VG_WHITE = 245  # the stripes' white, brighter than any background (<= ~215 with tint and noise)



# The layout the generator writes; a cache folder is named by it (training/data.py), so a folder
# written by an older generator (without Visual Genome, MNLI, QQP: version 1) is not reused.
FORMAT_VERSION = 2

def _dump_json(obj, path: Path) -> None:
    # Sorted keys and fixed separators: byte-identical output for the same content.
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Scenes and images
# ----------------------------------------------------------------------------------------------


@dataclass
class _Shape:
    shape: str
    color: str
    box: tuple  # tight (x0, y0, x1, y1) of the drawn pixels, x1/y1 exclusive
    area: int  # drawn pixel count
    polygon: list  # COCO polygon [x, y, x, y, ...] (approximate for circles)

    @property
    def desc(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class _Scene:
    image_id: int
    width: int
    height: int
    shapes: list
    crowd: tuple | None  # (x0, y0, x1, y1) of the empty crowd region, or None
    jpeg: bytes = b""

    @property
    def file_name(self) -> str:
        return f"{self.image_id:012d}.jpg"


def _intersects(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _draw_shape(rng, shape: str, x0: int, y0: int, d: int, h: int, W: int, H: int):
    """Rasterise one shape into a boolean (H, W) mask; returns (mask, polygon)."""
    mask = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = x0 + d - 1, y0 + h - 1  # inclusive pixel extents handed to PIL
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
        cx, cy, r = x0 + d / 2, y0 + h / 2, d / 2
        ang = np.arange(24) * (2 * math.pi / 24)
        polygon = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1).ravel().tolist()
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
        polygon = [x0, y0, x1 + 1, y0, x1 + 1, y1 + 1, x0, y1 + 1]
    else:  # triangle, pointing up or down
        mid = (x0 + x1) / 2
        pts = [(x0, y1), (x1, y1), (mid, y0)] if rng.random() < 0.5 else [(x0, y0), (x1, y0), (mid, y1)]
        draw.polygon(pts, fill=255)
        polygon = [c + 0.5 for p in pts for c in p]
    return np.asarray(mask) > 0, [round(float(v), 2) for v in polygon]


def _make_scene(rng, index: int, image_id: int, image_size: int) -> _Scene:
    S = image_size
    W, H = [(S, S), (S, round(0.75 * S)), (round(0.75 * S), S)][rng.choice(3, p=[0.4, 0.3, 0.3])]
    occupied = []
    crowd = None
    if index % CROWD_EVERY == CROWD_EVERY // 2:  # placed first, so shapes can always avoid it
        cw, ch = int(rng.integers(W // 4, W * 2 // 5 + 1)), int(rng.integers(H // 4, H * 2 // 5 + 1))
        cx0, cy0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
        crowd = (cx0, cy0, cx0 + cw, cy0 + ch)
        occupied.append(crowd)
    n = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_SHAPES + 1))

    # Background: a near-grey level with a slight tint, a linear gradient and pixel noise.
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    theta, amp = rng.uniform(0, 2 * math.pi), rng.uniform(0, 30)
    grad = amp * ((xx / W - 0.5) * math.cos(theta) + (yy / H - 0.5) * math.sin(theta))  # (H, W)
    base = rng.uniform(70, 185) + rng.uniform(-8, 8, 3)  # (3,)
    img = base[None, None, :] + grad[..., None] + rng.normal(0, rng.uniform(1.5, 4), (H, W, 3))

    m = min(W, H)
    lo, hi = max(8, round(0.14 * m)), max(10, round(0.32 * m))
    shapes = []
    for _ in range(n):
        shape, color = SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLORS))]
        for _try in range(50):
            d = int(rng.integers(lo, hi + 1))
            h = d if shape != "triangle" else max(6, round(d * rng.uniform(0.8, 1.0)))
            x0, y0 = int(rng.integers(2, W - d - 1)), int(rng.integers(2, H - h - 1))
            cand = (x0, y0, x0 + d, y0 + h)
            if not any(_intersects(cand, o, GAP) for o in occupied):
                break
        else:  # no room left: fewer shapes than drawn for, still deterministic
            break
        mask, polygon = _draw_shape(rng, shape, x0, y0, d, h, W, H)
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        occupied.append(box)
        rgb = np.asarray(COLORS[color], np.float64) + rng.uniform(-12, 12, 3)
        img[mask] = rgb[None, :] + rng.normal(0, 3, (len(ys), 3))
        shapes.append(_Shape(shape, color, box, int(len(ys)), polygon))

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=JPEG_QUALITY, subsampling=0
    )
    return _Scene(image_id, W, H, shapes, crowd, buf.getvalue())


def _rle(box, W: int, H: int) -> dict:
    """Uncompressed COCO RLE of a filled rectangle: column-major run lengths, zeros first."""
    mask = np.zeros((H, W), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 1
    flat = mask.ravel(order="F")  # (H * W,) column-major, as pycocotools
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [H, W]}


def _coco_json(scenes, subset: str, ann_id: int) -> tuple[dict, int]:
    images, anns = [], []
    for sc in scenes:
        images.append(
            {
                "id": sc.image_id,
                "file_name": sc.file_name,
                "width": sc.width,
                "height": sc.height,
                "license": 1,
            }
        )
        for s in sc.shapes:
            x0, y0, x1, y1 = s.box
            anns.append(
                {
                    "id": ann_id,
                    "image_id": sc.image_id,
                    "category_id": SHAPE_IDS[s.shape],
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(s.area),
                    "iscrowd": 0,
                    "segmentation": [s.polygon],
                }
            )
            ann_id += 1
        if sc.crowd is not None:
            x0, y0, x1, y1 = sc.crowd
            anns.append(
                {
                    "id": ann_id,
                    "image_id": sc.image_id,
                    "category_id": SHAPE_IDS["circle"],
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float((x1 - x0) * (y1 - y0)),
                    "iscrowd": 1,
                    "segmentation": _rle(sc.crowd, sc.width, sc.height),
                }
            )
            ann_id += 1
    info = {
        "description": f"unit_fast synthetic shapes {subset}",
        "version": "1.0",
        "year": 2017,
        "contributor": "unit_fast.data.synthetic",
        "date_created": "2017/01/01",
        "url": "",
    }
    licenses = [{"id": 1, "name": "CC0 (synthetic)", "url": ""}]
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in CATEGORIES.items()]
    return {
        "info": info,
        "licenses": licenses,
        "images": images,
        "annotations": anns,
        "categories": categories,
    }, ann_id


# ----------------------------------------------------------------------------------------------
# Visual Genome scenes: their own shapes, fills, sizes and background; boxes carry attribute ids
# ----------------------------------------------------------------------------------------------


@dataclass
class _VGShape:
    shape: str
    box: tuple  # tight (x0, y0, x1, y1) of the shape's region, x1/y1 exclusive
    area: int  # pixel count of the shape's region (the outline's inside included, as its polygon)
    polygon: list  # COCO polygon of the region, [x, y, x, y, ...]
    attributes: list  # attribute ids (VG_ATTRIBUTES), in no particular order; [] = none annotated


@functools.lru_cache(maxsize=4096)
def _vg_region(shape: str, d: int, h: int, up: bool):
    """``shape`` filled in its own ``(h, d)`` box: a read-only boolean (h, d) mask and its polygon
    (box coords, a tuple). Cached: rasterising is most of a scene's cost, and sizes repeat."""
    im = Image.new("L", (d, h), 0)
    draw = ImageDraw.Draw(im)
    x1, y1 = d - 1, h - 1
    if shape == "circle":
        draw.ellipse([0, 0, x1, y1], fill=255)
        ang = np.arange(24) * (2 * math.pi / 24)
        polygon = np.stack([d / 2 + d / 2 * np.cos(ang), h / 2 + h / 2 * np.sin(ang)], 1).ravel().tolist()
    elif shape == "square":
        draw.rectangle([0, 0, x1, y1], fill=255)
        polygon = [0, 0, d, 0, d, h, 0, h]
    elif shape == "triangle":
        pts = [(0, y1), (x1, y1), (x1 / 2, 0)] if up else [(0, 0), (x1, 0), (x1 / 2, y1)]
        draw.polygon(pts, fill=255)
        polygon = [c + 0.5 for p in pts for c in p]
    elif shape == "diamond":
        pts = [(x1 / 2, 0), (x1, y1 / 2), (x1 / 2, y1), (0, y1 / 2)]
        draw.polygon(pts, fill=255)
        polygon = [c + 0.5 for p in pts for c in p]
    else:  # cross: two bars of width t, wide enough that a hollow cross still has an inside
        t = max(4, round(0.42 * min(d, h)))
        a, b = (d - t) // 2, (h - t) // 2
        draw.rectangle([a, 0, a + t - 1, y1], fill=255)
        draw.rectangle([0, b, x1, b + t - 1], fill=255)
        polygon = [a, 0, a + t, 0, a + t, b, d, b, d, b + t, a + t, b + t,
                   a + t, h, a, h, a, b + t, 0, b + t, 0, b, a, b]  # fmt: skip
    mask = np.asarray(im) > 0
    mask.flags.writeable = False
    return mask, tuple(polygon)


def _erode(mask, t: int):
    """``mask`` (bool 2-D) eroded ``t`` times by the 4-neighbourhood (outside counts as empty)."""
    for _ in range(t):
        p = np.pad(mask, 1)
        mask = mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask


def _make_vg_scene(rng, image_id: int, image_size: int) -> _Scene:
    """One VG image: 1 to ``VG_MAX_SHAPES`` shapes, each of a random colour, fill and size class,
    on a two-level near-grey background (a horizon; COCO scenes use a gradient). ``shapes`` holds
    ``_VGShape``s; the file is named by ``_vg_file_name``, not ``_Scene.file_name`` (COCO's)."""
    S = image_size
    W, H = [(S, S), (S, round(0.75 * S)), (round(0.75 * S), S)][rng.choice(3, p=[0.4, 0.3, 0.3])]
    yy = np.arange(H, dtype=np.float32)[:, None, None]  # (H, 1, 1)
    # float32 throughout: the background is most of a scene's time.
    levels = (rng.uniform(80, 165) + np.array([-1.0, 1.0]) * rng.uniform(10, 30)).astype(np.float32)
    base = np.where(yy < rng.uniform(0.3, 0.7) * H, levels[0], levels[1])  # (H, 1, 1); above, below
    base = base + rng.uniform(-8, 8, 3).astype(np.float32)  # (H, 1, 3): a slight tint
    noise = rng.standard_normal((H, W, 3), dtype=np.float32)  # (H, W, 3)
    img = base + np.float32(rng.uniform(1.5, 4)) * noise  # (H, W, 3)

    # Size classes with gaps between them, so "small" / "large" are decidable from the box and
    # the image size; the medium class carries no size attribute.
    m = min(W, H)
    lo, hi = max(10, round(0.16 * m)), max(16, round(0.40 * m))
    span = hi - lo
    sizes = {
        "small": (lo, lo + span // 4),
        "medium": (lo + 3 * span // 8, lo + 5 * span // 8),
        "large": (lo + 3 * span // 4, hi),
    }
    occupied, shapes = [], []
    for _ in range(int(rng.integers(1, VG_MAX_SHAPES + 1))):
        shape = _pick(rng, tuple(VG_CATEGORIES.values()))
        color, fill, size = _pick(rng, tuple(VG_COLORS)), _pick(rng, VG_FILLS), _pick(rng, VG_SIZES)
        for _try in range(VG_PLACE_TRIES):
            d = int(rng.integers(sizes[size][0], sizes[size][1] + 1))
            h = d if shape != "triangle" else max(8, round(d * rng.uniform(0.8, 1.0)))
            x0, y0 = int(rng.integers(2, W - d - 1)), int(rng.integers(2, H - h - 1))
            if not any(_intersects((x0, y0, x0 + d, y0 + h), o, GAP) for o in occupied):
                break
        else:  # no room left: fewer shapes, still deterministic
            break
        region, polygon = _vg_region(shape, d, h, up=rng.random() < 0.5)
        patch = img[y0 : y0 + h, x0 : x0 + d]  # (h, d, 3) view into img
        k = max(2, round(min(d, h) / 6))  # stripe height / outline thickness, px
        if fill == "striped":
            white = region & ((np.arange(h) // k) % 2 == 1)[:, None]
            patch[white] = VG_WHITE + rng.normal(0, 3, (int(white.sum()), 3))
            colored = region & ~white
        elif fill == "hollow":
            colored = region & ~_erode(region, max(1, k - 1))
        else:
            colored = region
        rgb = np.asarray(VG_COLORS[color], np.float64) + rng.uniform(-12, 12, 3)
        patch[colored] = rgb[None, :] + rng.normal(0, 3, (int(colored.sum()), 3))
        ys, xs = np.nonzero(region)
        box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        occupied.append(box)
        names = [color, fill] + ([size] if size != "medium" else [])
        attrs = [VG_ATTRIBUTE_IDS[a] for a in names]
        attrs = [] if rng.random() < VG_NO_ATTRIBUTES else [attrs[i] for i in rng.permutation(len(attrs))]
        polygon = [round(float(v) + (x0 if i % 2 == 0 else y0), 2) for i, v in enumerate(polygon)]
        shapes.append(_VGShape(shape, box, int(region.sum()), polygon, attrs))

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=JPEG_QUALITY, subsampling=0
    )
    return _Scene(image_id, W, H, shapes, None, buf.getvalue())


def _vg_file_name(image_id: int) -> str:
    return f"{image_id}.jpg"  # VG's own naming (VG_100K/2345678.jpg), unpadded


def _vg_json(scenes, split: str, ann_id: int) -> tuple[dict, int]:
    images, anns = [], []
    for sc in scenes:
        name = _vg_file_name(sc.image_id)
        images.append({"id": sc.image_id, "file_name": name, "width": sc.width, "height": sc.height})
        for s in sc.shapes:
            x0, y0, x1, y1 = s.box
            anns.append(
                {
                    "id": ann_id,
                    "image_id": sc.image_id,
                    "category_id": VG_SHAPE_IDS[s.shape],
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(s.area),
                    "iscrowd": 0,
                    "segmentation": [s.polygon],
                    "attribute_ids": s.attributes,
                }
            )
            ann_id += 1
    info = {
        "description": f"unit_fast synthetic Visual Genome shapes {split}",
        "version": "1.4",
        "year": 2017,
        "contributor": "unit_fast.data.synthetic",
        "date_created": "2017/01/01",
        "url": "",
    }
    return {
        "info": info,
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": n, "supercategory": "shape"} for c, n in VG_CATEGORIES.items()],
        "attributes": [{"id": a, "name": n} for a, n in VG_ATTRIBUTES.items()],
    }, ann_id


# ----------------------------------------------------------------------------------------------
# Scene relations shared by the VQA and SNLI-VE templates
# ----------------------------------------------------------------------------------------------


def _count(sc: _Scene, shape=None, color=None) -> int:
    return sum((shape is None or s.shape == shape) and (color is None or s.color == color) for s in sc.shapes)


def _unique_descs(sc: _Scene) -> list:
    """Shapes whose "colour shape" description names exactly one object."""
    c = Counter(s.desc for s in sc.shapes)
    return [s for s in sc.shapes if c[s.desc] == 1]


def _extreme(sc: _Scene, side: str):
    """The shape lying wholly beyond every other one on ``side``, else None (also for < 2 shapes)."""
    if len(sc.shapes) < 2:
        return None
    key = {
        "left": lambda s: s.box[0],
        "right": lambda s: -s.box[2],
        "top": lambda s: s.box[1],
        "bottom": lambda s: -s.box[3],
    }[side]
    first, *rest = sorted(sc.shapes, key=key)
    ok = {  # clear of every other shape by GAP px along that axis
        "left": all(first.box[2] + GAP <= o.box[0] for o in rest),
        "right": all(first.box[0] >= o.box[2] + GAP for o in rest),
        "top": all(first.box[3] + GAP <= o.box[1] for o in rest),
        "bottom": all(first.box[1] >= o.box[3] + GAP for o in rest),
    }[side]
    return first if ok else None


def _pairs(sc: _Scene, relation: str) -> list:
    """Ordered pairs (a, b) of uniquely described shapes with ``a relation b`` clearly true."""
    u = _unique_descs(sc)
    test = {
        "left": lambda a, b: a.box[2] + GAP <= b.box[0],
        "above": lambda a, b: a.box[3] + GAP <= b.box[1],
        "bigger": lambda a, b: a.area >= 2 * b.area,
    }[relation]
    return [(a, b) for a in u for b in u if a is not b and test(a, b)]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _plural(n: int, noun: str) -> str:
    return f"{NUMBER_WORDS[n]} {noun}" + ("" if n == 1 else "s")


# ----------------------------------------------------------------------------------------------
# VQAv2
# ----------------------------------------------------------------------------------------------
# Each template returns (question, answer, question_type, answer_type) or None when the image
# cannot answer it unambiguously. Question types are VQAv2's own prefixes.


def _q_count_shape(sc, rng):
    s = _pick(rng, SHAPES)
    return f"How many {s}s are there?", str(_count(sc, shape=s)), "how many", "number"


def _q_count_color(sc, rng):
    c = _pick(rng, COLOR_NAMES)
    return f"How many {c} shapes are there?", str(_count(sc, color=c)), "how many", "number"


def _q_count_all(sc, rng):
    return "How many shapes are in the picture?", str(len(sc.shapes)), "how many", "number"


def _q_color_of(sc, rng):
    once = [s for s in sc.shapes if _count(sc, shape=s.shape) == 1]
    if not once:
        return None
    s = _pick(rng, once)
    return f"What color is the {s.shape}?", s.color, "what color is the", "other"


def _q_shape_of_color(sc, rng):
    once = [s for s in sc.shapes if _count(sc, color=s.color) == 1]
    if not once:
        return None
    s = _pick(rng, once)
    return f"Which shape is {s.color}?", s.shape, "which", "other"


def _q_exists(sc, rng):
    present = sorted({(s.color, s.shape) for s in sc.shapes})
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    yes = bool(present) and rng.random() < 0.5
    c, s = _pick(rng, present if yes else absent)
    return f"Is there a {c} {s}?", "yes" if yes else "no", "is there a", "yes/no"


def _q_any_shape(sc, rng):
    s = _pick(rng, SHAPES)
    return f"Are there any {s}s?", "yes" if _count(sc, shape=s) else "no", "are there", "yes/no"


def _q_shape_at(sc, rng):
    side = _pick(rng, ("left", "right", "top", "bottom"))
    s = _extreme(sc, side)
    if s is None:
        return None
    where = f"on the {side}" if side in ("left", "right") else f"at the {side}"
    return f"What shape is {where}?", s.shape, "what", "other"


def _q_color_at(sc, rng):
    side = _pick(rng, ("left", "right", "top", "bottom"))
    s = _extreme(sc, side)
    if s is None:
        return None
    where = f"on the {side}" if side in ("left", "right") else f"at the {side}"
    return f"What color is the shape {where}?", s.color, "what color is the", "other"


_VQA_TEMPLATES = (
    _q_count_shape,
    _q_count_color,
    _q_count_all,
    _q_color_of,
    _q_shape_of_color,
    _q_exists,
    _q_any_shape,
    _q_shape_at,
    _q_color_at,
)


def _wrong_answer(rng, answer: str, answer_type: str) -> str:
    """A plausible human mistake: a count off by one, the other yes/no, another colour or shape."""
    if answer_type == "number":
        n = int(answer)
        return str(_pick(rng, [m for m in (n - 1, n + 1) if 0 <= m <= MAX_SHAPES]))
    if answer_type == "yes/no":
        return "no" if answer == "yes" else "yes"
    pool = COLOR_NAMES if answer in COLORS else SHAPES
    return _pick(rng, [a for a in pool if a != answer])


def _vqa(scenes, rng, subtype: str):
    questions, annotations = [], []
    for sc in scenes:
        seen = set()
        for tmpl in rng.permutation(len(_VQA_TEMPLATES)):
            if len(seen) == QUESTIONS_PER_IMAGE:
                break
            got = _VQA_TEMPLATES[tmpl](sc, rng)
            if got is None or got[0] in seen:
                continue
            question, answer, qtype, atype = got
            qid = sc.image_id * 1000 + len(seen)  # VQAv2's own question-id scheme
            seen.add(question)
            # 10 human answers, 0-3 of them wrong: soft scores are not all 1, while the right
            # answer always keeps the majority (>= 7 of 10), so it is the multiple-choice answer.
            n_wrong = min(3, int(rng.binomial(10, _pick(rng, (0.0, 0.05, 0.1, 0.2, 0.3)))))
            wrong_at = set(rng.choice(10, n_wrong, replace=False).tolist())
            answers = []
            for k in range(10):
                a, conf = (_wrong_answer(rng, answer, atype), "maybe") if k in wrong_at else (answer, "yes")
                answers.append({"answer": a, "answer_confidence": conf, "answer_id": k + 1})
            questions.append({"image_id": sc.image_id, "question": question, "question_id": qid})
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": sc.image_id,
                    "question_type": qtype,
                    "answer_type": atype,
                    "multiple_choice_answer": answer,
                    "answers": answers,
                }
            )
    info = {
        "description": "unit_fast synthetic VQA",
        "version": "2.0",
        "year": 2017,
        "contributor": "unit_fast.data.synthetic",
        "date_created": "2017-01-01 00:00:00",
        "url": "",
    }
    lic = {"name": "CC0 (synthetic)", "url": ""}
    q_json = {
        "info": info,
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": lic,
        "data_subtype": subtype,
        "questions": questions,
    }
    a_json = {
        "info": info,
        "license": lic,
        "data_type": "mscoco",
        "data_subtype": subtype,
        "annotations": annotations,
    }
    return q_json, a_json


def _vqa_accuracy(human_answers: list, predicted: str) -> float:
    """The standard VQA accuracy of one prediction: ``min(1, matches / 3)`` averaged over the 10
    leave-one-annotator-out subsets of the human answers. Used here only for the chance levels;
    the readers own the rule for training targets and evaluation (answers here need no
    normalisation: lower-case words and digits)."""
    matches = [a == predicted for a in human_answers]
    total = sum(matches)
    accs = [min(1.0, (total - m) / 3) for m in matches]
    return sum(accs) / len(accs)


def _vqa_baselines(train_ann: dict, val_ann: dict) -> dict:
    """Chance levels on val: the majority train answer, the per-question-type prior, the oracle."""
    train = train_ann["annotations"]
    majority = Counter(a["multiple_choice_answer"] for a in train).most_common(1)[0][0]
    per_type = {}
    for a in train:
        per_type.setdefault(a["question_type"], Counter())[a["multiple_choice_answer"]] += 1
    prior = {t: c.most_common(1)[0][0] for t, c in per_type.items()}
    val = val_ann["annotations"]

    def mean_acc(pred):
        if not val:
            return 0.0
        return round(
            sum(_vqa_accuracy([x["answer"] for x in a["answers"]], pred(a)) for a in val) / len(val), 4
        )

    return {
        "majority_answer": majority,
        "majority_answer_accuracy": mean_acc(lambda a: majority),
        "question_type_prior_accuracy": mean_acc(lambda a: prior.get(a["question_type"], majority)),
        "oracle_accuracy": mean_acc(lambda a: a["multiple_choice_answer"]),
    }


# ----------------------------------------------------------------------------------------------
# SNLI-VE
# ----------------------------------------------------------------------------------------------
# Verifiable templates: (applicable(scene), make(scene, rng, truth) -> hypothesis). A template is
# used only where it can be made both true and false, and the entailed and the contradicted
# hypothesis of a caption pick templates from the same distribution: the wording alone does not
# tell entailment from contradiction; the image does.


def _h_exists(sc, rng, truth):
    present = sorted({(s.color, s.shape) for s in sc.shapes})
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    c, s = _pick(rng, present if truth else absent)
    return f"There is a {c} {s}."


def _h_not_exists(sc, rng, truth):
    present = sorted({(s.color, s.shape) for s in sc.shapes})
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    c, s = _pick(rng, absent if truth else present)
    return f"There is no {c} {s}."


def _h_shape_color(sc, rng, truth):
    s = _pick(rng, [s for s in sc.shapes if _count(sc, shape=s.shape) == 1])
    c = s.color if truth else _pick(rng, [c for c in COLOR_NAMES if c != s.color])
    return f"The {s.shape} is {c}."


def _h_count(sc, rng, truth):
    s = _pick(rng, SHAPES)
    n = _count(sc, shape=s)
    if not truth:  # off by one, within the possible counts (a "six" would give itself away)
        n = _pick(rng, [m for m in (n - 1, n + 1) if 0 <= m <= MAX_SHAPES])
    return f"There {'is' if n == 1 else 'are'} {_plural(n, s)}."


def _h_total(sc, rng, truth):
    n = len(sc.shapes)
    if not truth:
        n = _pick(rng, [m for m in (n - 1, n + 1) if 0 <= m <= MAX_SHAPES])
    return f"The picture is made of {_plural(n, 'shape')}."


def _h_relation(relation: str, phrase: str):
    def make(sc, rng, truth):
        a, b = _pick(rng, _pairs(sc, relation))
        a, b = (a, b) if truth else (b, a)
        return f"The {a.desc} is {phrase} the {b.desc}."

    return (lambda sc: bool(_pairs(sc, relation))), make


_VE_VERIFIABLE = (
    (lambda sc: bool(sc.shapes), _h_exists),
    (lambda sc: bool(sc.shapes), _h_not_exists),
    (lambda sc: any(_count(sc, shape=s.shape) == 1 for s in sc.shapes), _h_shape_color),
    (lambda sc: True, _h_count),
    (lambda sc: True, _h_total),
    _h_relation("left", "to the left of"),
    _h_relation("above", "above"),
    _h_relation("bigger", "bigger than"),
)

# Neutral: about a shape that is there (so it reads as grounded), with a predicate no picture can
# settle. They share words with the verifiable ones ("the picture is made", "than the", "drawn"),
# and no single word marks them all.
_NEUTRAL_ONE = (
    "The {a} was drawn by a child.",
    "The {a} is made of {material}.",
    "The {a} is the favorite shape of the artist.",
    "Someone drew the {a} in the {time}.",
    "The {a} was drawn first.",
)
_NEUTRAL_TWO = ("The {a} is {comparative} than the {b}.", "The {a} was drawn before the {b}.")
_NEUTRAL_PICTURE = (
    "The picture was made for a {lesson} class.",
    "The picture was drawn by a {person}.",
    "The picture was printed on a {day}.",
)
_NEUTRAL_WORDS = {
    "material": ("paper", "wood", "glass", "plastic"),
    "time": ("morning", "evening"),
    "comparative": ("heavier", "older", "newer", "lighter"),
    "lesson": ("math", "art"),
    "person": ("child", "student", "teacher"),
    "day": ("monday", "friday"),
}


def _h_neutral(sc, rng):
    fill = {k: _pick(rng, v) for k, v in _NEUTRAL_WORDS.items()}
    pool = list(_NEUTRAL_PICTURE)
    if sc.shapes:
        pool += list(_NEUTRAL_ONE) * 2
    if len(sc.shapes) >= 2:
        pool += list(_NEUTRAL_TWO) * 2
    objs = _unique_descs(sc) or sc.shapes
    if len(objs) >= 2:
        i, j = rng.choice(len(objs), 2, replace=False)
        fill["a"], fill["b"] = objs[i].desc, objs[j].desc
    elif objs:
        fill["a"] = fill["b"] = objs[0].desc
        pool = [t for t in pool if "{b}" not in t]
    return _pick(rng, pool).format(**fill)


def _caption(sc: _Scene, k: int) -> str:
    groups = Counter((s.color, s.shape) for s in sc.shapes)
    parts = [
        f"a {c} {s}" if n == 1 else f"{NUMBER_WORDS[n]} {c} {s}s" for (c, s), n in sorted(groups.items())
    ]
    if len(parts) <= 1:
        listing = "".join(parts)
    else:
        listing = ", ".join(parts[:-1]) + " and " + parts[-1]
    if k % 2 == 0:
        return f"A picture of {listing}." if parts else "An empty picture with a plain background."
    return (
        f"{listing[0].upper()}{listing[1:]} on a plain background."
        if parts
        else "A plain background with no shapes."
    )


def _snli_ve(scenes, rng) -> list:
    rows = []
    for sc in scenes:
        verifiable = [make for ok, make in _VE_VERIFIABLE if ok(sc)]
        used = set()
        for k in range(CAPTIONS_PER_IMAGE):
            pair_rows = []
            for label in rng.permutation(3):  # a random order of e/n/c within the caption
                for _try in range(20):
                    if label == 1:
                        hyp = _h_neutral(sc, rng)
                    else:
                        hyp = _pick(rng, verifiable)(sc, rng, label == 0)
                    if hyp not in used:
                        break
                used.add(hyp)
                gold = ENTAILMENT_LABELS[label]
                cap_id = f"{sc.file_name}#{k}"
                pair_rows.append(
                    {
                        "Flikr30kID": sc.file_name,
                        "captionID": cap_id,
                        "pairID": f"{cap_id}r1{gold[0]}",
                        "sentence1": _caption(sc, k),
                        "sentence2": hyp,
                        "gold_label": gold,
                        "annotator_labels": [gold],
                    }
                )
            rows += pair_rows
    return rows


# ----------------------------------------------------------------------------------------------
# GLUE: SST-2 (sentiment with negation and contrast) and QNLI (does the sentence answer it?)
# ----------------------------------------------------------------------------------------------

_POSITIVE = (
    "good",
    "great",
    "charming",
    "funny",
    "moving",
    "clever",
    "beautiful",
    "delightful",
    "smart",
    "fresh",
    "engaging",
    "wonderful",
)
_NEGATIVE = (
    "bad",
    "dull",
    "boring",
    "awful",
    "silly",
    "tedious",
    "weak",
    "messy",
    "bland",
    "clumsy",
    "predictable",
    "terrible",
)
_POS_VERBS = ("works", "delivers", "succeeds", "shines")
_NEG_VERBS = ("drags", "fails", "disappoints", "falls apart")
_SUBJECTS = (
    "the movie",
    "the film",
    "the story",
    "the plot",
    "the acting",
    "the script",
    "the ending",
    "the dialogue",
    "the soundtrack",
    "the cast",
    "this picture",
    "the direction",
)
_NOUNS = ("film", "movie", "comedy", "drama", "thriller", "story")
_ADVERBS = ("", "", "very ", "really ", "quite ", "truly ", "rather ", "so ")
_LINKS = ("is", "was", "feels", "seems")


def _clause(rng, pol: int) -> str:
    """A clause of polarity ``pol`` (+1/-1); negation ("not", "never") flips its word's polarity."""
    negated = rng.random() < 0.35
    word_pol = -pol if negated else pol
    adj = _pick(rng, _POSITIVE if word_pol > 0 else _NEGATIVE)
    form = rng.integers(3)
    if form == 0:
        link = f"{_pick(rng, _LINKS)} {'not ' if negated else ''}"
        return f"{_pick(rng, _SUBJECTS)} {link}{_pick(rng, _ADVERBS)}{adj}"
    if form == 1:
        return f"it is {'not ' if negated else ''}a {_pick(rng, _ADVERBS)}{adj} {_pick(rng, _NOUNS)}"
    verb = _pick(rng, _POS_VERBS if word_pol > 0 else _NEG_VERBS)
    return f"{_pick(rng, _SUBJECTS)} {'never ' if negated else ''}{verb}"


def _sst2_sentence(rng, label: int) -> str:
    pol = 1 if label == 1 else -1
    form = rng.choice(4, p=[0.45, 0.25, 0.15, 0.15])
    if form == 0:
        return _clause(rng, pol)
    if form == 1:  # the clause after "but" carries the sentiment
        first = -pol if rng.random() < 0.8 else pol
        return f"{_clause(rng, first)} , but {_clause(rng, pol)}"
    if form == 2:
        return f"{_clause(rng, pol)} and {_clause(rng, pol)}"
    return f"although {_clause(rng, -pol)} , {_clause(rng, pol)}"


_PLACES = (
    "bridge",
    "tower",
    "library",
    "museum",
    "school",
    "church",
    "station",
    "market",
    "castle",
    "theater",
)
_PLACE_ADJ = ("old", "new", "blue", "red", "tall", "small", "north", "south", "white", "green")
_PEOPLE = ("anna", "ben", "clara", "david", "emma", "felix", "grace", "hugo", "iris", "jonas")
_CITIES = ("paris", "berlin", "rome", "madrid", "vienna", "lisbon", "oslo", "prague")
_FACTS = {  # relation: (question forms, predicate), with {e} the entity and {v} the value
    "built_by": (("who built {e} ?", "who designed and built {e} ?"), "was built by {v}"),
    "built_in": (("when was {e} built ?", "in what year was {e} built ?"), "was built in {v}"),
    "painted_by": (("who painted {e} ?",), "was painted by {v}"),
    "located": (("where is {e} ?", "in which city is {e} ?"), "is located in {v}"),
    "height": (("how tall is {e} ?",), "is {v} meters tall"),
    "rooms": (("how many rooms does {e} have ?",), "has {v} rooms"),
}
_PREFIXES = ("", "", "according to the guide , ", "as the locals say , ", "in the town records , ")


def _fact_value(rng, relation: str) -> str:
    if relation in ("built_by", "painted_by"):
        return _pick(rng, _PEOPLE)
    # Numbers from small sets, so each is one whole-word token of a small vocabulary.
    if relation == "built_in":
        return str(10 * int(rng.integers(160, 200)))
    if relation == "located":
        return _pick(rng, _CITIES)
    return str(int(rng.integers(2, 60)))


def _qnli_pair(rng, label: int) -> tuple[str, str]:
    """label 0 = entailment: the sentence states the asked fact about the asked entity.

    Two forms, half each. Easy: one fact about the asked entity, the asked relation or another
    one (often sharing words: "who built" vs "was built in"). Hard: two facts about two entities
    that differ in one word (the asked one and a look-alike), always including the asked relation,
    bound to the asked entity for entailment and to the look-alike otherwise; there the bag of
    words is the same for both labels and only the binding decides.
    """
    relations = list(_FACTS)
    adj, place = _pick(rng, _PLACE_ADJ), _pick(rng, _PLACES)
    entity = f"the {adj} {place}"
    asked = _pick(rng, relations)
    question = _pick(rng, _FACTS[asked][0]).format(e=entity)
    second = _pick(rng, [r for r in relations if r != asked])
    if rng.random() < 0.5:
        facts = [(entity, asked if label == 0 else second)]
    else:
        if rng.random() < 0.5:
            other = f"the {_pick(rng, [a for a in _PLACE_ADJ if a != adj])} {place}"
        else:
            other = f"the {adj} {_pick(rng, [p for p in _PLACES if p != place])}"
        facts = [(entity, asked), (other, second)] if label == 0 else [(entity, second), (other, asked)]
        if rng.random() < 0.5:
            facts.reverse()
    clauses = [f"{e} {_FACTS[r][1].format(v=_fact_value(rng, r))}" for e, r in facts]
    joint = _pick(rng, (" and ", " , while ", " , but "))
    return question, f"{_pick(rng, _PREFIXES)}{joint.join(clauses)} ."


def _unique_rows(rng, n: int, make, taken: set) -> list:
    """``n`` rows from ``make(rng, label)`` with balanced labels, none already in ``taken``."""
    rows = []
    for i in range(n):
        label = i % 2
        for _try in range(100):
            row = make(rng, label)
            if row not in taken:
                break
        taken.add(row)
        rows.append(row)
    order = rng.permutation(n)
    return [rows[i] for i in order]


def _write_tsv(path: Path, header: tuple, rows: list) -> None:
    # GLUE files are plain tab-separated with no quoting: no field may hold a tab, newline or quote.
    lines = ["\t".join(header)]
    for row in rows:
        assert not any(ch in str(f) for f in row for ch in '\t\n"'), row
        lines.append("\t".join(str(f) for f in row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# GLUE: MNLI (three-way entailment across genres) and QQP (paraphrase or near miss)
# ----------------------------------------------------------------------------------------------
# MNLI facts are (subject, relation, value) with one value per subject and relation, so another
# value contradicts. A premise states 1-3 facts about distinct subjects; each premise gets one
# hypothesis of each label, all drawn from the same distribution of (subject, relation, value,
# negated?): neither sentence alone tells the label.

_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_SMALL = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_YEARS = tuple(str(y) for y in range(1950, 2011, 5))
_HUNDREDS = ("100", "200", "300", "400", "500", "600", "800")


def _rel(pos: tuple, neg: str, values: tuple) -> tuple:
    return pos, neg, values


def _split(items: str) -> tuple:
    """``"a, b c, d"`` -> ``("a", "b c", "d")``: word lists that ruff would put one item a line."""
    return tuple(items.split(", "))


# genre -> (spoken?, prefixes, subjects, relations (positive phrasings, negated phrasing, values)).
# Matched genres (train, dev_matched) and mismatched ones (dev_mismatched only) share the value sets
# and the sentence shapes, not the subjects or relations, as MNLI's genres share English.
_GENRES = {
    "fiction": (
        False,
        ("", "", "that winter,", "years later,", "in the story,"),
        _split("the old sailor, the young widow, the captain, the stranger, the innkeeper, the blind poet"),
        (
            _rel(
                ("lived in {v}", "had a home in {v}"),
                "never lived in {v}",
                ("the village", "the harbor town", "the old mill", "the forest", "the castle"),
            ),
            _rel(("arrived on {v}", "came on {v}"), "did not arrive on {v}", _DAYS),
            _rel(("owned {v} horses", "kept {v} horses"), "did not own {v} horses", _SMALL),
        ),
    ),
    "government": (
        False,
        ("", "under the new rule,", "according to the report,", "in its annual review,"),
        _split(
            "the agency, the state office, the committee, the new program, the department, the regional board"
        ),
        (
            _rel(("was created in {v}", "was established in {v}"), "was not created in {v}", _YEARS),
            _rel(("employs {v} workers", "has a staff of {v}"), "does not employ {v} workers", _HUNDREDS),
            _rel(
                ("reports to {v}", "answers to {v}"),
                "does not report to {v}",
                ("the governor", "the treasury", "the senate", "the mayor", "the courts"),
            ),
        ),
    ),
    "slate": (
        False,
        ("", "critics agree that", "as one reviewer put it,"),
        ("the new album", "the novel", "the play", "the magazine", "the film", "the memoir"),
        (
            _rel(("was released in {v}", "came out in {v}"), "was not released in {v}", _YEARS),
            _rel(
                ("was made in {v}", "was produced in {v}"),
                "was not made in {v}",
                ("london", "new york", "chicago", "paris", "boston"),
            ),
            _rel(("costs {v} dollars", "sells for {v} dollars"), "does not cost {v} dollars", _SMALL),
        ),
    ),
    "telephone": (
        True,
        ("well,", "uh,", "you know,", "yeah,", "i mean,"),
        ("my brother", "our neighbor", "my wife", "my boss", "my uncle", "our daughter"),
        (
            _rel(
                ("lives in {v}", "lives out in {v}"),
                "does not live in {v}",
                ("texas", "ohio", "dallas", "maine", "denver"),
            ),
            _rel(
                ("drives a {v} truck", "has a {v} truck"),
                "does not drive a {v} truck",
                ("red", "blue", "white", "black", "green"),
            ),
            _rel(("has {v} dogs", "keeps {v} dogs"), "does not have {v} dogs", _SMALL),
        ),
    ),
    "travel": (
        False,
        ("", "for visitors,", "in the old town,", "from the harbor,"),
        ("the museum", "the old fort", "the ferry", "the market", "the cathedral", "the beach"),
        (
            _rel(
                ("opens at {v}", "opens its doors at {v}"),
                "does not open at {v}",
                ("seven", "eight", "nine", "ten", "eleven", "noon"),
            ),
            _rel(
                ("is {v} miles from the port", "lies {v} miles from the port"),
                "is not {v} miles from the port",
                _SMALL,
            ),
            _rel(
                ("dates from the {v} century", "was built in the {v} century"),
                "does not date from the {v} century",
                ("twelfth", "fourteenth", "sixteenth", "eighteenth"),
            ),
        ),
    ),
    "letters": (
        False,
        ("dear friend,", "as a member,", "thanks to you,", ""),
        ("your gift", "our school", "the library fund", "the new wing", "the scholarship", "our chapter"),
        (
            _rel(("raised {v} dollars", "brought in {v} dollars"), "did not raise {v} dollars", _HUNDREDS),
            _rel(
                ("opens in {v}", "will open in {v}"),
                "does not open in {v}",
                ("june", "july", "march", "april", "october"),
            ),
            _rel(
                ("was founded by {v}", "was started by {v}"),
                "was not founded by {v}",
                ("a teacher", "two parents", "the mayor", "a nurse", "local farmers"),
            ),
        ),
    ),
    "oup": (
        False,
        ("", "in this volume,", "as noted above,", "historically,"),
        ("the author", "the first chapter", "the study", "the survey", "the early edition", "the theory"),
        (
            _rel(("was published in {v}", "appeared in {v}"), "was not published in {v}", _YEARS),
            _rel(("covers {v} cases", "deals with {v} cases"), "does not cover {v} cases", _HUNDREDS),
            _rel(
                ("was based in {v}", "was centered in {v}"),
                "was not based in {v}",
                ("oxford", "dublin", "glasgow", "leeds", "york"),
            ),
        ),
    ),
    "verbatim": (
        False,
        ("", "in english,", "strictly speaking,", "as every editor knows,"),
        ("the word", "this phrase", "the term", "the old saying", "the spelling", "the slang word"),
        (
            _rel(
                ("comes from {v}", "derives from {v}"),
                "does not come from {v}",
                ("latin", "french", "greek", "dutch", "german"),
            ),
            _rel(("has {v} letters", "is spelled with {v} letters"), "does not have {v} letters", _SMALL),
            _rel(
                ("first appeared in {v}", "was first recorded in {v}"), "did not first appear in {v}", _YEARS
            ),
        ),
    ),
    "facetoface": (
        True,
        ("so,", "okay,", "like,", "and um,"),
        ("my roommate", "the professor", "our class", "the coach", "my cousin", "the team"),
        (
            _rel(("meets on {v}", "gets together on {v}"), "does not meet on {v}", _DAYS),
            _rel(
                ("moved to {v}", "moved out to {v}"),
                "did not move to {v}",
                ("chicago", "boston", "seattle", "miami", "denver"),
            ),
            _rel(("has {v} cars", "owns {v} cars"), "does not have {v} cars", _SMALL),
        ),
    ),
    "nineeleven": (
        False,
        ("", "according to the commission,", "that morning,", "records show that"),
        ("the first flight", "the second flight", "the rescue team", "the officer", "the pilot", "the crew"),
        (
            _rel(
                ("left from {v}", "departed from {v}"),
                "did not leave from {v}",
                ("boston", "newark", "dulles", "denver"),
            ),
            _rel(
                ("was called at {v}", "got the call at {v}"),
                "was not called at {v}",
                ("eight", "nine", "ten", "eleven"),
            ),
            _rel(("carried {v} people", "had {v} people on board"), "did not carry {v} people", _SMALL),
        ),
    ),
}
MNLI_MATCHED_GENRES = ("fiction", "government", "slate", "telephone", "travel")  # MNLI's own split
MNLI_MISMATCHED_GENRES = ("letters", "oup", "verbatim", "facetoface", "nineeleven")
MNLI_NO_GOLD_EVERY = 50  # dev files: one extra row without annotator consensus (gold "-") per 50
_MNLI_TRAIN_HEADER = (  # then gold_label; dev files put label2..label5 before it
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
)
_MNLI_JOINTS = (" and ", ", while ", ", but ", ". ")


def _clause_text(subject: str, rel: tuple, value: str, negated: bool, rng) -> str:
    pos, neg, _ = rel
    return f"{subject} {(neg if negated else _pick(rng, pos)).format(v=value)}"


def _sentence(text: str, spoken: bool) -> str:
    """Written genres: capitalised, with a full stop; spoken ones: a lower-case transcript."""
    if spoken:
        return text.replace(".", "").lower()
    text = re.sub(r"\. (\w)", lambda mt: ". " + mt.group(1).upper(), text)
    return f"{text[0].upper()}{text[1:]}."


def _mnli_prompt(rng, genre: str, taken: set):
    """A premise and its three hypotheses ``{label: hypothesis}`` for ``genre``."""
    spoken, prefixes, subjects, rels = _GENRES[genre]
    for _try in range(50):
        n = int(rng.choice(3, p=[0.3, 0.5, 0.2])) + 1
        facts = [
            (subjects[i], int(rng.integers(len(rels))), None)
            for i in rng.choice(len(subjects), n, replace=False)
        ]
        facts = [(s, r, _pick(rng, rels[r][2])) for s, r, _ in facts]
        clauses = [_clause_text(s, rels[r], v, False, rng) for s, r, v in facts]
        body = clauses[0]
        for k, c in enumerate(clauses[1:]):  # three facts: "a, b and c"-like, the last joint drawn
            body += (", " if k < n - 2 else _pick(rng, _MNLI_JOINTS)) + c
        prefix = _pick(rng, prefixes)
        premise = _sentence(f"{prefix} {body}" if prefix else body, spoken)
        if premise not in taken:
            break
    taken.add(premise)

    def other(values, v):
        return _pick(rng, [x for x in values if x != v])

    hyps = {}
    s, r, v = facts[int(rng.integers(n))]  # entailment: a stated fact, or another value denied
    neg = rng.random() < 0.25
    hyps["entailment"] = _clause_text(s, rels[r], other(rels[r][2], v) if neg else v, neg, rng)
    s, r, v = facts[int(rng.integers(n))]  # contradiction: another value, or the stated fact denied
    neg = rng.random() < 0.25
    hyps["contradiction"] = _clause_text(s, rels[r], v if neg else other(rels[r][2], v), neg, rng)
    s, r, _ = facts[int(rng.integers(n))]  # neutral: a relation the premise leaves open for s
    r2 = _pick(rng, [x for x in range(len(rels)) if x != r])
    stated = [fv for _, fr, fv in facts if fr == r2]  # often a value the premise binds to another subject
    value = _pick(rng, stated) if stated and rng.random() < 0.5 else _pick(rng, rels[r2][2])
    hyps["neutral"] = _clause_text(s, rels[r2], value, rng.random() < 0.25, rng)
    return premise, {k: _sentence(h, False) for k, h in hyps.items()}


_PARSE_TOKEN = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")
_DETERMINERS = frozenset(("the", "a", "an", "this", "our", "my", "your", "his", "her", "its"))


def _parses(text: str) -> tuple[str, str]:
    """MNLI's ``binary_parse`` and ``parse`` columns: a right-branching binary bracketing and a flat
    Penn-style tree with coarse tags. Well-formed, not linguistic: readers do not use them."""
    toks = _PARSE_TOKEN.findall(text)
    binary = toks[-1]
    for t in reversed(toks[:-1]):
        binary = f"( {t} {binary} )"

    def tag(t):
        lo = t.lower()
        if lo in _DETERMINERS:
            return "DT"
        if lo.isdigit() or lo in _SMALL:
            return "CD"
        if lo in ("not", "never"):
            return "RB"
        return t if t in ",." else "NN"

    return binary, "(ROOT (S " + " ".join(f"({tag(t)} {t})" for t in toks) + "))"


def _mnli_rows(rng, genres: tuple, n_prompts: int, taken: set, prompt_id: int, dev: bool):
    """Rows of one MNLI file (header order of ``_MNLI_TRAIN_HEADER`` + dev's label2..5 +
    gold_label), shuffled; dev files add ``n_prompts // MNLI_NO_GOLD_EVERY`` (at least one) rows
    whose five annotators split 2-2-1 (gold ``-``). Returns (rows, next prompt id)."""
    entries = []  # (promptID, author's label, genre, premise, hypothesis, votes, gold)
    for k in range(n_prompts):
        genre = genres[k % len(genres)]
        premise, hyps = _mnli_prompt(rng, genre, taken)
        for label in ENTAILMENT_LABELS:
            votes = [label]
            if dev:  # four validators; up to two disagree, so the author's label stays gold
                wrong = set(rng.choice(4, int(rng.choice(3, p=[0.6, 0.3, 0.1])), replace=False).tolist())
                others = [x for x in ENTAILMENT_LABELS if x != label]
                votes += [_pick(rng, others) if j in wrong else label for j in range(4)]
            entries.append((prompt_id, label, genre, premise, hyps[label], votes, label))
        prompt_id += 1
    if dev:
        for k in range(max(1, len(entries) // MNLI_NO_GOLD_EVERY)):
            genre = genres[k % len(genres)]
            premise, hyps = _mnli_prompt(rng, genre, taken)
            a, b, c = (ENTAILMENT_LABELS[i] for i in rng.permutation(3))
            votes = [a] + [[a, b, b, c][i] for i in rng.permutation(4)]  # 2-2-1: no majority of 3
            entries.append((prompt_id, a, genre, premise, hyps[a], votes, "-"))
            prompt_id += 1
    rows = []
    for index, i in enumerate(rng.permutation(len(entries))):
        pid, label, genre, premise, hyp, votes, gold = entries[i]
        (b1, p1), (b2, p2) = _parses(premise), _parses(hyp)
        rows.append((index, pid, f"{pid}{label[0]}", genre, b1, b2, p1, p2, premise, hyp, *votes, gold))
    return rows, prompt_id


# QQP: a question is a frame (what is asked) with a slot value and a qualifier shared by both sides.
# Duplicates are two different phrasings of one frame, value and qualifier; non-duplicates are
# near misses phrased just as differently: another value of the same frame, or the frame's sibling
# (same value, a related question). Every pair uses two different templates, so neither word
# overlap nor template identity decides; the frame and the value do.
_QQP_SLOTS = {
    "skill": (
        _split(
            "python, java, guitar, spanish, chess, piano, "
            "swimming, drawing, german, cooking, photography, french"
        ),
        ("", " as a beginner", " on my own", " at home", " in my free time"),
    ),
    "city": (
        _split("paris, tokyo, london, berlin, rome, dubai, sydney, toronto, madrid, seoul, boston, mumbai"),
        ("", " as a student", " on a budget", " with a family", " alone"),
    ),
    "job": (
        _split(
            "doctor, pilot, lawyer, teacher, nurse, chef, "
            "designer, plumber, banker, writer, dentist, police officer"
        ),
        ("", " in india", " in canada", " in the us", " in germany"),
    ),
    "device": (
        _split(
            "phone, laptop, tablet, printer, smart tv, "
            "router, camera, desktop computer, smartwatch, gaming console"
        ),
        ("", " for work", " for school", " for gaming", " at home"),
    ),
}
_QQP_FRAMES = {  # frame -> (slot, sibling frame, templates with {x} the value and {m} the qualifier)
    "learn": (
        "skill",
        "learn_time",
        (
            "How do I learn {x}{m}?",
            "What is the best way to learn {x}{m}?",
            "How can I start learning {x}{m}?",
            "What are some good ways to learn {x}{m}?",
        ),
    ),
    "learn_time": (
        "skill",
        "learn",
        (
            "How long does it take to learn {x}{m}?",
            "How much time do I need to learn {x}{m}?",
            "How many months does it take to learn {x}{m}?",
            "How fast can I learn {x}{m}?",
        ),
    ),
    "visit": (
        "city",
        "living_cost",
        (
            "What is the best time to visit {x}{m}?",
            "When should I visit {x}{m}?",
            "Which month is best for a trip to {x}{m}?",
            "What is the right season to go to {x}{m}?",
        ),
    ),
    "living_cost": (
        "city",
        "visit",
        (
            "How much does it cost to live in {x}{m}?",
            "What is the cost of living in {x}{m}?",
            "Is it expensive to live in {x}{m}?",
            "How much money do I need to live in {x}{m}?",
        ),
    ),
    "become": (
        "job",
        "salary",
        (
            "How do I become a {x}{m}?",
            "What does it take to become a {x}{m}?",
            "What are the steps to become a {x}{m}?",
            "How can I work as a {x}{m}?",
        ),
    ),
    "salary": (
        "job",
        "become",
        (
            "How much does a {x} earn{m}?",
            "What is the salary of a {x}{m}?",
            "How much money does a {x} make{m}?",
            "What do {x}s get paid{m}?",
        ),
    ),
    "fix": (
        "device",
        "buy",
        (
            "How do I fix a slow {x}{m}?",
            "Why is my {x} so slow{m}?",
            "How can I make my {x} faster{m}?",
            "What can I do about a slow {x}{m}?",
        ),
    ),
    "buy": (
        "device",
        "fix",
        (
            "Which {x} should I buy{m}?",
            "What is the best {x} to buy{m}?",
            "Which {x} is worth buying{m}?",
            "What {x} would you recommend{m}?",
        ),
    ),
}
QQP_DUPLICATE_SHARE = (0, 1, 0, 1, 0)  # labels cycled through: 40 % duplicates (QQP: 37 %)


def _qqp_pair(rng, duplicate: int) -> tuple[str, str]:
    frame = _pick(rng, tuple(_QQP_FRAMES))
    slot, sibling, templates = _QQP_FRAMES[frame]
    values, qualifiers = _QQP_SLOTS[slot]
    x, m = _pick(rng, values), _pick(rng, qualifiers)
    i, j = rng.choice(len(templates), 2, replace=False)
    first = templates[i].format(x=x, m=m)
    if duplicate:
        second = templates[j].format(x=x, m=m)
    elif rng.random() < 0.5:  # near miss: another value
        second = templates[j].format(x=_pick(rng, [v for v in values if v != x]), m=m)
    else:  # near miss: the sibling question about the same value
        second = _pick(rng, _QQP_FRAMES[sibling][2]).format(x=x, m=m)
    return (first, second) if rng.random() < 0.5 else (second, first)


def _qqp_rows(rng, n: int, taken: set, qids: dict, row_id: int):
    """``n`` rows ``(id, qid1, qid2, question1, question2, is_duplicate)``, shuffled, no pair (in
    either order) in ``taken``; ``qids`` (question -> id) is shared by the splits, as in QQP."""
    pairs = []
    for k in range(n):
        label = QQP_DUPLICATE_SHARE[k % len(QQP_DUPLICATE_SHARE)]
        for _try in range(100):
            q1, q2 = _qqp_pair(rng, label)
            if (q1, q2) not in taken:
                break
        taken.update(((q1, q2), (q2, q1)))
        pairs.append((q1, q2, label))
    rows = []
    for i in rng.permutation(n):
        q1, q2, label = pairs[i]
        ids = [qids.setdefault(q, len(qids) + 1) for q in (q1, q2)]
        rows.append((row_id, *ids, q1, q2, label))
        row_id += 1
    return rows, row_id


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")  # BERT's basic split for ASCII text


def _words(text: str) -> list:
    return _WORD.findall(text.lower())


def _vocab(texts) -> list:
    """Specials, then single characters and "##" continuations (so nothing ever maps to [UNK]),
    then every word and punctuation mark of ``texts`` as a whole token."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    words = sorted({w for t in texts for w in _words(t)} - set(chars))
    return list(SPECIAL_TOKENS) + chars + words + [f"##{c}" for c in chars]


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _remove_stale_images(folder: Path, keep: set) -> None:
    # Regenerating into the same DIR with fewer images must not leave old ones behind; only
    # *.jpg files inside the generator's own image folders are ever removed.
    for p in folder.glob("*.jpg"):
        if p.name not in keep:
            p.unlink()


def generate(out_dir, seed: int = 0, num_train: int = 600, num_val: int = 150, image_size: int = 160) -> dict:
    """Write the synthetic multitask dataset under ``out_dir`` (see the module docstring).

    Images are ``image_size`` px on the long side, square or 4:3 either way; each has 0 to
    ``MAX_SHAPES`` non-overlapping shapes. Text tasks get ``TEXT_PER_IMAGE`` examples per image
    of the split; VQA ``QUESTIONS_PER_IMAGE`` questions per image (fewer where templates do not
    apply); SNLI-VE 3 x ``CAPTIONS_PER_IMAGE`` hypotheses per image. Same arguments -> the same
    bytes. Existing files are overwritten.

    Returns ``{"root": str, "files": {...absolute paths...}, "summary": dict}``; the summary
    (also written as ``summary.json``, with paths relative to ``out_dir``) holds the counts,
    ``num_classes``, the VQA answer set, the vocabulary size, the longest text per task in
    word pieces, and each task's chance level under ``chance``.
    """
    if num_train < 1 or num_val < 1 or image_size < 48:
        raise ValueError("need num_train >= 1, num_val >= 1 and image_size >= 48")
    root = Path(out_dir)
    streams = {
        name: np.random.default_rng([seed, i])
        for i, name in enumerate(
            (
                "ids",
                "train_images",
                "val_images",
                "vqa_train",
                "vqa_val",
                "ve_train",
                "ve_val",
                "sst2",
                "qnli",
                # Appended (never inserted): each stream is seeded by its position, so the files of
                # the datasets above keep their bytes.
                "vg_ids",
                "vg_train",
                "vg_val",
                "mnli",
                "qqp",
            )
        )
    }

    # COCO image ids: unique, non-contiguous, shared by every task that looks at the images.
    ids = np.sort(streams["ids"].choice(np.arange(1, 600_000), num_train + num_val, replace=False))
    ids = streams["ids"].permutation(ids)
    train_ids, val_ids = sorted(ids[:num_train].tolist()), sorted(ids[num_train:].tolist())
    splits = {
        "train": [
            _make_scene(streams["train_images"], i, iid, image_size) for i, iid in enumerate(train_ids)
        ],
        "val": [_make_scene(streams["val_images"], i, iid, image_size) for i, iid in enumerate(val_ids)],
    }

    dirs = {
        k: root / k
        for k in (
            "coco/annotations",
            "coco/train2017",
            "coco/val2017",
            "vqa2",
            "snli_ve/images",
            "glue/SST-2",
            "glue/QNLI",
            "glue/MNLI",
            "glue/QQP",
            "visual_genome/annotations",
            "visual_genome/images",
        )
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    files: dict = {
        "coco": {},
        "visual_genome": {},
        "vqa2": {},
        "snli_ve": {},
        "glue": {"sst2": {}, "qnli": {}, "mnli": {}, "qqp": {}},
    }
    summary: dict = {"seed": seed, "image_size": image_size, "images": {"train": num_train, "val": num_val}}

    # Detection (COCO 2017 layout).
    ann_id = 1
    det = {"num_classes": NUM_CLASSES, "categories": {str(k): v for k, v in CATEGORIES.items()}}
    for split, scenes in splits.items():
        img_dir = dirs[f"coco/{split}2017"]
        _remove_stale_images(img_dir, {sc.file_name for sc in scenes})
        for sc in scenes:
            (img_dir / sc.file_name).write_bytes(sc.jpeg)
        coco, ann_id = _coco_json(scenes, f"{split}2017", ann_id)
        path = dirs["coco/annotations"] / f"instances_{split}2017.json"
        _dump_json(coco, path)
        files["coco"][f"{split}_annotations"], files["coco"][f"{split}_images"] = str(path), str(img_dir)
        anns = coco["annotations"]
        det[f"{split}_boxes"] = sum(a["iscrowd"] == 0 for a in anns)
        det[f"{split}_crowd"] = sum(a["iscrowd"] == 1 for a in anns)
        det[f"{split}_empty_images"] = sum(not sc.shapes for sc in scenes)
    det["chance"] = {"AP": 0.0, "AP50": 0.0}
    summary["detection_coco"] = det

    # Visual Genome detection with attributes (MMF's COCO-style layout): scenes of its own.
    summary["detection_visual_genome"] = _write_vg(root, dirs, files, streams, num_train, num_val, image_size)

    # VQAv2 (about the same images; COCO-2017 file naming).
    vqa = {}
    for split in ("train", "val"):
        q_json, a_json = _vqa(splits[split], streams[f"vqa_{split}"], f"{split}2014")
        qp = dirs["vqa2"] / f"v2_OpenEnded_mscoco_{split}2014_questions.json"
        ap = dirs["vqa2"] / f"v2_mscoco_{split}2014_annotations.json"
        _dump_json(q_json, qp)
        _dump_json(a_json, ap)
        files["vqa2"].update(
            {
                f"{split}_questions": str(qp),
                f"{split}_annotations": str(ap),
                f"{split}_images": files["coco"][f"{split}_images"],
            }
        )
        vqa[split] = (q_json, a_json)
    answers = sorted(
        {x["answer"] for _, a in vqa.values() for ann in a["annotations"] for x in ann["answers"]}
    )
    summary["vqa2"] = {
        "questions": {s: len(q["questions"]) for s, (q, _) in vqa.items()},
        "image_dirs": {"train": "coco/train2017", "val": "coco/val2017"},
        "image_file_name": "{image_id:012d}.jpg",
        "answers": answers,
        "num_answers": len(answers),
        "chance": _vqa_baselines(vqa["train"][1], vqa["val"][1]),
    }

    # SNLI-VE (its own image folder: the same JPEG bytes, the real layout's single folder).
    ve_rows = {}
    img_dir = dirs["snli_ve/images"]
    _remove_stale_images(img_dir, {sc.file_name for scenes in splits.values() for sc in scenes})
    for scenes in splits.values():
        for sc in scenes:
            (img_dir / sc.file_name).write_bytes(sc.jpeg)
    for split, ve_split in (("train", "train"), ("val", "dev")):
        rows = _snli_ve(splits[split], streams[f"ve_{split}"])
        path = root / "snli_ve" / f"snli_ve_{ve_split}.jsonl"
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
        files["snli_ve"][ve_split] = str(path)
        ve_rows[ve_split] = rows
    files["snli_ve"]["images"] = str(img_dir)
    summary["snli_ve"] = {
        "pairs": {s: len(r) for s, r in ve_rows.items()},
        "labels": list(ENTAILMENT_LABELS),
        "image_dir": "snli_ve/images",
        # Hypothesis-only: neutral is told by its wording, entailed vs contradicted barely (a
        # bag-of-words classifier measures about 0.70 on dev at the defaults).
        "chance": {"majority_accuracy": round(1 / 3, 4), "hypothesis_only_approx": 0.7},
    }

    # GLUE.
    n_text = {"train": TEXT_PER_IMAGE * num_train, "dev": TEXT_PER_IMAGE * num_val}
    sst2, qnli = {}, {}
    taken_sst2, taken_qnli = set(), set()
    for split in ("train", "dev"):
        sst2[split] = _unique_rows(
            streams["sst2"], n_text[split], lambda rng, y: (_sst2_sentence(rng, y), y), taken_sst2
        )
        qnli[split] = _unique_rows(
            streams["qnli"],
            n_text[split],
            lambda rng, y: (*_qnli_pair(rng, y), ("entailment", "not_entailment")[y]),
            taken_qnli,
        )
        p = dirs["glue/SST-2"] / f"{split}.tsv"
        _write_tsv(p, ("sentence", "label"), sst2[split])
        files["glue"]["sst2"][split] = str(p)
        p = dirs["glue/QNLI"] / f"{split}.tsv"
        _write_tsv(
            p, ("index", "question", "sentence", "label"), [(i, *r) for i, r in enumerate(qnli[split])]
        )
        files["glue"]["qnli"][split] = str(p)

    def majority(rows, col):
        c = Counter(r[col] for r in rows)
        return round(c.most_common(1)[0][1] / len(rows), 4)

    summary["glue_sst2"] = {
        "examples": {s: len(r) for s, r in sst2.items()},
        "chance": {"majority_accuracy": majority(sst2["dev"], 1)},
    }
    summary["glue_qnli"] = {
        "examples": {s: len(r) for s, r in qnli.items()},
        "chance": {"majority_accuracy": majority(qnli["dev"], 2)},
    }
    mnli, summary["glue_mnli"] = _write_mnli(dirs["glue/MNLI"], files, streams["mnli"], n_text)
    qqp, summary["glue_qqp"] = _write_qqp(dirs["glue/QQP"], files, streams["qqp"], n_text)

    # Vocabulary over every text written (and the answers and category names).
    texts = {
        "vqa2": [q["question"] for q, _ in vqa.values() for q in q["questions"]],
        "snli_ve": [r["sentence2"] for rows in ve_rows.values() for r in rows],
        "glue_sst2": [r[0] for rows in sst2.values() for r in rows],
        "glue_qnli": [f"{r[0]} {r[1]}" for rows in qnli.values() for r in rows],
    }
    extra = [r["sentence1"] for rows in ve_rows.values() for r in rows] + answers + list(SHAPES)
    vocab = _vocab([t for ts in texts.values() for t in ts] + extra)
    # The later datasets' words go after it, so the earlier tasks' token ids never move.
    texts["glue_mnli"] = [f"{r[8]} {r[9]}" for rows in mnli.values() for r in rows]
    texts["glue_qqp"] = [f"{r[3]} {r[4]}" for rows in qqp.values() for r in rows]
    later = (
        texts["glue_mnli"] + texts["glue_qqp"] + list(VG_CATEGORIES.values()) + list(VG_ATTRIBUTES.values())
    )
    known = set(vocab)
    vocab += sorted({w for t in later for w in _words(t)} - known)
    vocab_path = root / "vocab.txt"
    vocab_path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    files["vocab"] = str(vocab_path)
    summary["vocab_size"] = len(vocab)
    # Word pieces, without [CLS]/[SEP]; pair tasks count both texts. MMF caps VQA/VE at 25.
    summary["max_tokens"] = {k: max(len(_words(t)) for t in ts) for k, ts in texts.items()}

    summary_path = root / "summary.json"
    summary_path.write_text(json.dumps(summary, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    readme_path = root / "README.md"
    readme_path.write_text(_readme(summary), encoding="utf-8")
    files["summary"], files["readme"] = str(summary_path), str(readme_path)
    return {"root": str(root), "files": files, "summary": summary}


def _write_vg(
    root: Path, dirs: dict, files: dict, streams: dict, num_train: int, num_val: int, image_size: int
) -> dict:
    """Write ``visual_genome/`` (images and both annotation files); return its summary entry."""
    num_train, num_val = (-(-k // VG_IMAGE_SHARE) for k in (num_train, num_val))  # ceil: at least 1
    n = {"train": num_train, "val": num_val}
    ids = streams["vg_ids"].choice(
        np.arange(1, 2_400_000), num_train + num_val, replace=False
    )  # VG's id range
    split_ids = {"train": sorted(ids[:num_train].tolist()), "val": sorted(ids[num_train:].tolist())}
    img_dir = dirs["visual_genome/images"]
    scenes = {s: [_make_vg_scene(streams[f"vg_{s}"], i, image_size) for i in split_ids[s]] for s in n}
    _remove_stale_images(img_dir, {_vg_file_name(sc.image_id) for ss in scenes.values() for sc in ss})
    out = {
        "num_classes": VG_NUM_CLASSES,
        "categories": {str(k): v for k, v in VG_CATEGORIES.items()},
        "attribute_class_num": VG_ATTRIBUTE_CLASS_NUM,
        "attributes": {str(k): v for k, v in VG_ATTRIBUTES.items()},
        "images": n,
        "image_dir": "visual_genome/images",
        "image_file_name": "{image_id}.jpg",
    }
    ann_id, boxes = 1, {}
    for split, ss in scenes.items():
        for sc in ss:
            (img_dir / _vg_file_name(sc.image_id)).write_bytes(sc.jpeg)
        vg, ann_id = _vg_json(ss, split, ann_id)
        path = dirs["visual_genome/annotations"] / f"instances_{split}.json"
        _dump_json(vg, path)
        files["visual_genome"][f"{split}_annotations"], files["visual_genome"][f"{split}_images"] = (
            str(path),
            str(img_dir),
        )
        boxes[split] = [a["attribute_ids"] for a in vg["annotations"]]
        out[f"{split}_boxes"] = len(boxes[split])
        out[f"{split}_boxes_without_attributes"] = sum(not a for a in boxes[split])
    out["annotations"] = {s: f"visual_genome/annotations/instances_{s}.json" for s in n}
    # Attribute chance: always naming the most frequent train attribute, scored top-1 (is it among
    # the box's attributes?) over the val boxes that have attributes.
    top = Counter(a for attrs in boxes["train"] for a in attrs).most_common(1)[0][0]
    val = [attrs for attrs in boxes["val"] if attrs]
    out["chance"] = {
        "AP": 0.0,
        "AP50": 0.0,
        "attribute_majority": VG_ATTRIBUTES[top],
        "attribute_majority_top1": round(sum(top in a for a in val) / max(1, len(val)), 4),
    }
    return out


def _write_mnli(folder: Path, files: dict, rng, n_text: dict) -> tuple[dict, dict]:
    """Write ``glue/MNLI/{train,dev_matched,dev_mismatched}.tsv``; return (rows per file, summary)."""
    rows, taken, prompt_id = {}, set(), 1
    plan = (
        ("train", MNLI_MATCHED_GENRES, n_text["train"]),
        ("dev_matched", MNLI_MATCHED_GENRES, n_text["dev"]),
        ("dev_mismatched", MNLI_MISMATCHED_GENRES, n_text["dev"]),
    )
    for name, genres, n in plan:
        dev = name != "train"
        rows[name], prompt_id = _mnli_rows(rng, genres, max(1, n // 3), taken, prompt_id, dev)
        labels = ("label1", "label2", "label3", "label4", "label5") if dev else ("label1",)
        path = folder / f"{name}.tsv"
        _write_tsv(path, (*_MNLI_TRAIN_HEADER[:-1], *labels, "gold_label"), rows[name])
        files["glue"]["mnli"][name] = str(path)

    def gold(name):
        return [r[-1] for r in rows[name] if r[-1] != "-"]

    def majority(name):
        return round(Counter(gold(name)).most_common(1)[0][1] / len(gold(name)), 4)

    return rows, {
        "examples": {name: len(gold(name)) for name in rows},
        "no_gold_label": {name: sum(r[-1] == "-" for r in rows[name]) for name in rows},
        "genres": {name: list(genres) for name, genres, _ in plan},
        "labels": list(ENTAILMENT_LABELS),
        # UniT validates MNLI on dev_mismatched (glue_mnli_mismatched): that file's majority first.
        "chance": {
            "majority_accuracy": majority("dev_mismatched"),
            "majority_accuracy_matched": majority("dev_matched"),
            "majority_accuracy_mismatched": majority("dev_mismatched"),
        },
    }


def _write_qqp(folder: Path, files: dict, rng, n_text: dict) -> tuple[dict, dict]:
    """Write ``glue/QQP/{train,dev}.tsv``; return (rows per file, summary)."""
    rows, taken, qids, row_id = {}, set(), {}, 0
    for split in ("train", "dev"):
        rows[split], row_id = _qqp_rows(rng, n_text[split], taken, qids, row_id)
        path = folder / f"{split}.tsv"
        _write_tsv(path, ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), rows[split])
        files["glue"]["qqp"][split] = str(path)
    dup = {s: sum(r[-1] for r in rs) for s, rs in rows.items()}
    p = dup["dev"] / len(rows["dev"])
    return rows, {
        "examples": {s: len(r) for s, r in rows.items()},
        "duplicates": dup,
        "questions": len(qids),
        # QQP reports accuracy and F1 (duplicate = positive): majority class, and F1 of "always duplicate".
        "chance": {
            "majority_accuracy": round(max(p, 1 - p), 4),
            "all_duplicate_f1": round(2 * p / (1 + p), 4),
        },
    }


_README = """# unit_fast synthetic multitask dataset

Written by `python -m unit_fast.data.synthetic` (seed {seed}, images {image_size} px on the long
side, {n_train} train / {n_val} val images). Every file is in its real dataset's format;
regenerating with the same arguments gives the same bytes.

{table}

## Detection
JPEG images of coloured shapes (red, green, blue, yellow) on a near-grey, noisy, gradient
background: 0 to {max_shapes} shapes per image that never overlap; {empty} images have none.
Categories ({cats}) keep raw, non-contiguous ids: configure `num_classes = {num_classes}`. Boxes
are the tight `xywh` box of the drawn pixels. Every tenth image carries one `iscrowd: 1`
annotation over an empty background rectangle ({crowd}): readers drop crowd boxes, and
COCOeval ignores detections there. Image sizes vary (square, landscape, portrait).

## Visual Genome detection (with attributes)
Images of their own in `visual_genome/images/` (`{{image_id}}.jpg`, VG's naming; {vg_images}
images, half as many as COCO's): 1 to {vg_max_shapes} non-overlapping shapes on a two-level grey
background. Annotations are MMF's COCO-style VG detection JSON: categories {vg_cats} (configure
`num_classes = {vg_num_classes}`), and per box `attribute_ids`, the ids of its colour, its fill
(solid, striped with white, or hollow: an outline only) and, unless medium-sized, its size
("small" / "large" against the image, with a gap between the size classes), in no fixed order;
{vg_no_attr} boxes have none (`[]`). The top-level `attributes` lists the {vg_attr_count}
attribute names: {vg_attrs}. Ids start at 1, since MMF keeps attribute 0 for "no attribute":
configure `attribute_class_num = {vg_attr_class_num}`. Boxes are the tight box of the shape
(stripes and outline included), `area` the pixel count of the shape's inside, `iscrowd` 0.

## VQAv2
Questions about colour, count, shape and position, e.g. "How many circles are there?", "What
color is the square?", "Is there a red triangle?", "What shape is on the left?". Images:
`coco/train2017` (train) and `coco/val2017` (val), named `{{image_id:012d}}.jpg` (COCO 2017
naming, not the 2014 `COCO_train2014_...` names). 10 human answers per question, 0-3 of them
wrong (off-by-one counts, another colour ...), so soft scores are not all 1; the right answer
keeps the majority and is the `multiple_choice_answer`. {num_answers} distinct answers:
{answers}.

## SNLI-VE
`Flikr30kID` (sic) names a file in `snli_ve/images/` (the same JPEGs). Each caption has one
entailed (a true statement), one contradicted (a false one about colours, counts, sizes or
positions) and one neutral hypothesis (unverifiable: who drew it, what it is made of ...).
Entailed and contradicted hypotheses use the same templates, so only the image separates them;
neutral ones are recognisable from their wording: a hypothesis-only bag-of-words classifier gets
about 0.70, against 1/3 chance.

## GLUE
SST-2: sentiment composed of positive/negative words with negation ("not", "never") and contrast
("but", "although": the last clause decides), label 1 = positive. QNLI: does the sentence state
the asked fact about the asked entity? Half the sentences state one fact about the asked entity
(the asked one or another); half state two facts about two entities differing in one word, always
including the asked relation, so that only its binding to the right entity decides.

MNLI: premises state one to three facts (subject, relation, value; one value per subject and
relation, so another value contradicts) in the style of a genre; each premise has one entailed
hypothesis (a stated fact, or another value denied), one contradicted (another value, or a
stated fact denied) and one neutral (a relation the premise leaves open for a subject it names,
often with a value the premise gives another subject). Hypotheses of all three labels come from
the same distribution, so neither sentence alone decides (a hypothesis-only bag of words: about
1/3). Genres differ in subjects, relations and style (telephone and face-to-face are lower-case
transcripts): train and `dev_matched` are {mnli_matched}; `dev_mismatched` is {mnli_mismatched}.
Dev files carry five annotator labels and {mnli_no_gold} rows with gold label `-` (readers drop
them). QQP: duplicates are two phrasings of one question (frame, value and qualifier); the
non-duplicates are near misses phrased just as differently (another value, or a related
question about the same value); every pair uses two different templates. Headers and quoting are
GLUE's (tab-separated, no quotes).

## Text
`vocab.txt` is a BERT WordPiece vocabulary ({vocab_size} tokens, specials first) covering every
word: a lower-casing BERT tokenizer of it gives no `[UNK]` (`BertTokenizerFast(vocab=...)` in
transformers 5, which silently ignores `vocab_file=`; `vocab_file=` in 4.x; or
`from_pretrained(DIR)`). Longest text in word pieces (no [CLS]/[SEP]): {max_tokens}.
"""


def _readme(s: dict) -> str:
    det, vqa, ve = s["detection_coco"], s["vqa2"], s["snli_ve"]
    sst2, qnli, vc = s["glue_sst2"], s["glue_qnli"], s["vqa2"]["chance"]
    vg, mnli, qqp = s["detection_visual_genome"], s["glue_mnli"], s["glue_qqp"]
    vqa_chance = (
        f'majority answer "{vc["majority_answer"]}": {vc["majority_answer_accuracy"]:.4f} VQA accuracy; '
        f"per-question-type prior {vc['question_type_prior_accuracy']:.4f}; "
        f"oracle {vc['oracle_accuracy']:.4f}"
    )
    rows = [
        ("task", "files", "size (train / val)", "chance level"),
        ("---",) * 4,
        (
            "detection (COCO)",
            "`coco/annotations/instances_{train,val}2017.json`, `coco/{train,val}2017/`",
            f"{det['train_boxes']} / {det['val_boxes']} boxes",
            "AP ~ 0, AP50 ~ 0",
        ),
        (
            "detection (Visual Genome, attributes)",
            "`visual_genome/annotations/instances_{train,val}.json`, `visual_genome/images/`",
            f"{vg['train_boxes']} / {vg['val_boxes']} boxes",
            f'AP ~ 0, AP50 ~ 0; attribute "{vg["chance"]["attribute_majority"]}" always: '
            f"{vg['chance']['attribute_majority_top1']:.4f} top-1",
        ),
        (
            "VQAv2",
            "`vqa2/v2_OpenEnded_mscoco_{train,val}2014_questions.json`, "
            "`vqa2/v2_mscoco_{train,val}2014_annotations.json`",
            f"{vqa['questions']['train']} / {vqa['questions']['val']} questions",
            vqa_chance,
        ),
        (
            "SNLI-VE",
            "`snli_ve/snli_ve_{train,dev}.jsonl`, `snli_ve/images/`",
            f"{ve['pairs']['train']} / {ve['pairs']['dev']} pairs",
            "1/3 (exactly balanced); hypothesis only ~0.7",
        ),
        (
            "SST-2",
            "`glue/SST-2/{train,dev}.tsv`",
            f"{sst2['examples']['train']} / {sst2['examples']['dev']}",
            f"{sst2['chance']['majority_accuracy']:.4f} (balanced)",
        ),
        (
            "QNLI",
            "`glue/QNLI/{train,dev}.tsv`",
            f"{qnli['examples']['train']} / {qnli['examples']['dev']}",
            f"{qnli['chance']['majority_accuracy']:.4f} (balanced)",
        ),
        (
            "MNLI",
            "`glue/MNLI/{train,dev_matched,dev_mismatched}.tsv`",
            f"{mnli['examples']['train']} / {mnli['examples']['dev_matched']} matched + "
            f"{mnli['examples']['dev_mismatched']} mismatched",
            f"{mnli['chance']['majority_accuracy']:.4f} (balanced)",
        ),
        (
            "QQP",
            "`glue/QQP/{train,dev}.tsv`",
            f"{qqp['examples']['train']} / {qqp['examples']['dev']}",
            f"{qqp['chance']['majority_accuracy']:.4f} (not duplicate); F1 of always duplicate "
            f"{qqp['chance']['all_duplicate_f1']:.4f}",
        ),
    ]
    return _README.format(
        seed=s["seed"],
        image_size=s["image_size"],
        n_train=s["images"]["train"],
        n_val=s["images"]["val"],
        table="\n".join("| " + " | ".join(r) + " |" for r in rows),
        max_shapes=MAX_SHAPES,
        empty=f"{det['train_empty_images']} train / {det['val_empty_images']} val",
        cats=", ".join(f"{k} {v}" for k, v in det["categories"].items()),
        num_classes=det["num_classes"],
        crowd=f"{det['train_crowd']} train / {det['val_crowd']} val",
        vg_images=f"{vg['images']['train']} train / {vg['images']['val']} val",
        vg_max_shapes=VG_MAX_SHAPES,
        vg_cats=", ".join(f"{k} {v}" for k, v in vg["categories"].items()),
        vg_num_classes=vg["num_classes"],
        vg_no_attr=f"{vg['train_boxes_without_attributes']} train / {vg['val_boxes_without_attributes']} val",
        vg_attr_count=len(vg["attributes"]),
        vg_attrs=", ".join(f"{k} {v}" for k, v in vg["attributes"].items()),
        vg_attr_class_num=vg["attribute_class_num"],
        mnli_matched=", ".join(mnli["genres"]["dev_matched"]),
        mnli_mismatched=", ".join(mnli["genres"]["dev_mismatched"]),
        mnli_no_gold=" and ".join(
            f"{mnli['no_gold_label'][k]} ({k})" for k in ("dev_matched", "dev_mismatched")
        ),
        num_answers=vqa["num_answers"],
        answers=", ".join(vqa["answers"]),
        vocab_size=s["vocab_size"],
        max_tokens=", ".join(f"{k} {v}" for k, v in s["max_tokens"].items()),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m unit_fast.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (created; files overwritten)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=600, help="training images")
    p.add_argument("--num-val", type=int, default=150, help="validation images")
    p.add_argument("--image-size", type=int, default=160, help="long side of each image, px")
    a = p.parse_args(argv)
    res = generate(a.out, seed=a.seed, num_train=a.num_train, num_val=a.num_val, image_size=a.image_size)
    print(f"wrote {res['root']} (see README.md there)")
    for task, info in res["summary"].items():
        if isinstance(info, dict) and "chance" in info:
            print(f"  {task}: chance {info['chance']}")


if __name__ == "__main__":
    main()
