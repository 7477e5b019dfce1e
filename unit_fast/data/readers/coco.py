"""COCO-format detection JSON (COCO ``instances_{train,val}2017.json``; Visual Genome in MMF's
COCO-style form, whose annotations carry ``attribute_ids``) -> ``DetectionRecord`` per image.

Box handling follows DETR's ``ConvertCocoPolysToMask`` (``datasets/coco.py``): crowd annotations
(``iscrowd=1``) removed, ``xywh`` -> ``xyxy``, clipped to the image, boxes with no area after
clipping dropped.  Category ids stay raw (COCO: 1..90 with gaps, so ``num_classes`` 91).
"""

import json
import math
import os

import numpy as np

from ..records import MAX_ATTRIBUTES, DetectionRecord
from . import finish_report, gc_paused, start_report

# Exact JSON number types (bool, an int subclass, is no number here).  Exact type checks keep the
# per-annotation pass cheap; finiteness (JSON's NaN/Infinity) is checked vectorised afterwards.
_NUMBER = frozenset((int, float))
_INT = frozenset((int,))


def _is_int(v):
    return type(v) is int


def _image_problem(img, known):
    """Why an ``images`` entry is unusable, or None."""
    if not isinstance(img, dict):
        return "not a JSON object"
    if not _is_int(img.get("id")):
        return f"id must be an integer, got {img.get('id')!r}"
    if img["id"] in known:
        return "duplicate image id"
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        return "missing file_name"
    for key in ("width", "height"):
        v = img.get(key)
        if not (type(v) in _NUMBER and math.isfinite(v) and v > 0 and float(v).is_integer()):
            return f"{key} must be a positive integer, got {v!r}"
    return None


def _annotation_problem(ann, with_attributes):
    """Why an annotation is unusable (image lookup aside), or None."""
    bbox = ann.get("bbox")
    if type(bbox) is not list or len(bbox) != 4 or not _NUMBER.issuperset(map(type, bbox)):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    if type(ann.get("category_id")) is not int:
        return f"category_id must be an integer, got {ann.get('category_id')!r}"
    if "area" in ann and type(ann["area"]) not in _NUMBER:
        return f"area must be a number, got {ann['area']!r}"
    if with_attributes:
        attrs = ann.get("attribute_ids")
        if attrs is not None and (type(attrs) is not list or not _INT.issuperset(map(type, attrs))):
            return f"attribute_ids must be a list of integers, got {attrs!r}"
    return None


def _name(path, ann):
    return f"{path}: annotation id={ann.get('id')!r} (image_id={ann.get('image_id')!r})"


@gc_paused()
def read_coco_detection(annotation_json, image_dir, *, with_attributes=False, on_error="raise", report=None):
    """Read a COCO-format detection annotation file.

    Args:
        annotation_json: path of e.g. ``annotations/instances_val2017.json``.
        image_dir: folder holding the images (``val2017/``); ``image_path`` = ``image_dir/file_name``.
            Images are neither opened nor checked for existence.
        with_attributes: fill ``attributes`` from each annotation's ``attribute_ids`` (Visual
            Genome): the first ``MAX_ATTRIBUTES`` (16) ids, then -1.  A missing ``attribute_ids``
            means none.  Without it ``attributes`` is None.
        on_error, report: see ``unit_fast.data.readers`` (``ReadReport``).  A skipped image entry
            takes its annotations with it (counted in ``report.dropped["of_skipped_image"]``).

    Returns:
        ``list[DetectionRecord]`` in the order of the file's ``images``, one per image, images
        without annotations included (empty arrays).  Per record: ``boxes (N, 4)`` float32
        absolute ``xyxy`` clipped to ``[0, width] x [0, height]``; ``labels (N,)`` int64 raw
        category ids; ``area (N,)`` float32 as annotated (box ``w*h`` when the file has no
        ``area``); ``attributes (N, 16)`` int64 or None.  Crowd and degenerate boxes are counted
        in ``report.dropped["crowd"]`` / ``["degenerate"]``.

    Raises:
        ValueError: malformed file, or malformed record under ``on_error="raise"``; the message
            names the file and the image id / annotation id.
    """
    path, image_dir = os.fspath(annotation_json), os.fspath(image_dir)
    report, skipped_before = start_report(report, on_error)
    with open(path, "rb") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a COCO detection file (no 'images' list)")
    annotations = data.get("annotations") or []  # image_info_test files have no annotations

    # 1. Images: id -> position in `images`.
    images, index, bad_image_ids = [], {}, set()
    for i, img in enumerate(data["images"]):
        problem = _image_problem(img, index)
        if problem:
            image_id = img.get("id") if isinstance(img, dict) else None
            report.bad(on_error, f"{path}: image #{i} (id={image_id!r}): {problem}")
            if _is_int(image_id):
                bad_image_ids.add(image_id)
            continue
        index[img["id"]] = len(images)
        images.append(img)

    # 2. Annotations, validated in one pass into flat lists (vectorised below: COCO train has 860k).
    kept, owner, xywh, labels, areas, attrs = [], [], [], [], [], []
    for ann in annotations:
        if type(ann) is not dict:
            report.bad(on_error, f"{path}: annotation {ann!r}: not a JSON object")
            continue
        image_id = ann.get("image_id")
        if not _is_int(image_id) or image_id not in index:
            if _is_int(image_id) and image_id in bad_image_ids:
                report.dropped["of_skipped_image"] += 1
            else:
                report.bad(on_error, f"{_name(path, ann)}: refers to an unknown image")
            continue
        problem = _annotation_problem(ann, with_attributes)
        if problem:
            report.bad(on_error, f"{_name(path, ann)}: {problem}")
            continue
        if ann.get("iscrowd", 0):
            report.dropped["crowd"] += 1
            continue
        bbox = ann["bbox"]
        kept.append(ann)
        owner.append(index[image_id])
        xywh.append(bbox)
        labels.append(ann["category_id"])
        areas.append(ann.get("area", bbox[2] * bbox[3]))
        if with_attributes:
            a = (ann.get("attribute_ids") or [])[:MAX_ATTRIBUTES]
            attrs.append(a + [-1] * (MAX_ATTRIBUTES - len(a)))

    # 3. xywh -> xyxy, clip, drop degenerate: DETR's arithmetic, in float32 as DETR does it.
    n = len(owner)
    owner = np.asarray(owner, dtype=np.int64)
    boxes = np.asarray(xywh, dtype=np.float32).reshape(n, 4)  # (n, 4)
    areas = np.asarray(areas, dtype=np.float32)
    finite = np.isfinite(boxes).all(1) & np.isfinite(areas)  # before clipping turns inf finite
    for j in np.flatnonzero(~finite):  # NaN / Infinity, which Python's json accepts
        report.bad(on_error, f"{_name(path, kept[j])}: bbox and area must be finite")
    boxes[:, 2:] += boxes[:, :2]
    size = np.asarray([(img["width"], img["height"]) for img in images], dtype=np.float32).reshape(-1, 2)
    wh = size[owner]  # (n, 2)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, wh[:, :1])
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, wh[:, 1:])
    keep = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    report.dropped["degenerate"] += int(finite.sum() - keep.sum())

    # 4. Group by image, keeping file order within an image (stable sort).
    order = np.flatnonzero(keep)[np.argsort(owner[keep], kind="stable")]
    boxes = boxes[order]
    labels = np.asarray(labels, dtype=np.int64)[order]
    areas = areas[order]
    attrs = np.asarray(attrs, dtype=np.int64).reshape(n, MAX_ATTRIBUTES)[order] if with_attributes else None
    bounds = np.concatenate([[0], np.cumsum(np.bincount(owner[order], minlength=len(images)))])

    records = []
    for i, img in enumerate(images):
        s, e = bounds[i], bounds[i + 1]
        records.append(
            DetectionRecord(
                image_path=os.path.join(image_dir, img["file_name"]),
                image_id=img["id"],
                width=int(img["width"]),
                height=int(img["height"]),
                boxes=boxes[s:e],
                labels=labels[s:e],
                area=areas[s:e],
                attributes=None if attrs is None else attrs[s:e],
            )
        )
    finish_report(report, skipped_before, path)
    return records
