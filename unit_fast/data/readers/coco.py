"""COCO-format detection JSON (COCO ``instances_{train,val}2017.json``; Visual Genome in MMF's
COCO-style form, whose annotations carry ``attribute_ids``) -> ``DetectionRecord`` per image.

Box handling follows DETR's ``ConvertCocoPolysToMask`` (``datasets/coco.py``): crowd annotations
(``iscrowd=1``) removed, ``xywh`` -> ``xyxy``, clipped to the image, boxes with no area after
clipping dropped.  Category ids stay raw (COCO: 1..90 with gaps, so ``num_classes`` 91).
"""

import math
import os

import numpy as np

from ..records import MAX_ATTRIBUTES, DetectionRecord
from . import INT64_MAX, finish_report, gc_paused, is_int64, load_json, name_problem, short, start_report

# Exact JSON number types (bool, an int subclass, is no number here).  Exact type checks keep the
# per-annotation pass cheap; finiteness (JSON's NaN/Infinity) is checked vectorised afterwards.
_NUMBER = frozenset((int, float))
_INT = frozenset((int,))
_MAX_SIDE = 2**31 - 1  # an image side beyond int32 is no image


def _is_int(v):
    return type(v) is int


def _positive_side(v):
    """``v`` is a positive integral JSON number (``640`` or ``640.0``) of at most ``_MAX_SIDE``.
    (No ``math.isfinite``/``float`` on an int: a huge one raises OverflowError.)"""
    t = type(v)
    return (t is int or (t is float and v.is_integer())) and 0 < v <= _MAX_SIDE


def _image_problem(img, known):
    """Why an ``images`` entry is unusable, or None."""
    if not isinstance(img, dict):
        return "not a JSON object"
    if not is_int64(img.get("id")):
        return f"id must be a 64-bit integer, got {short(img.get('id'))}"
    if img["id"] in known:
        return "duplicate image id"
    name = img.get("file_name")
    if not isinstance(name, str) or not name:
        return "missing file_name"
    problem = name_problem(name)
    if problem:
        return f"file_name {short(name)} {problem}"
    for key in ("width", "height"):
        if not _positive_side(img.get(key)):
            return f"{key} must be a positive integer, got {short(img.get(key))}"
    return None


def _annotation_problem(ann, with_attributes, category_ids):
    """Why an annotation is unusable (image lookup aside), or None.  ``category_ids``: the file's
    category ids (a set), or None when it has no ``categories``."""
    bbox = ann.get("bbox")
    if type(bbox) is not list or len(bbox) != 4 or not _NUMBER.issuperset(map(type, bbox)):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {short(bbox)}"
    cat = ann.get("category_id")
    if type(cat) is not int:
        return f"category_id must be an integer, got {short(cat)}"
    if not 0 <= cat <= INT64_MAX:
        return f"category_id must be a non-negative 64-bit integer, got {short(cat)}"
    if category_ids is not None and cat not in category_ids:
        return f"category_id {cat} is not among the file's categories"
    if "area" in ann and type(ann["area"]) not in _NUMBER:
        return f"area must be a number, got {short(ann['area'])}"
    if with_attributes:
        attrs = ann.get("attribute_ids")
        if attrs is not None and (type(attrs) is not list or not _INT.issuperset(map(type, attrs))):
            return f"attribute_ids must be a list of integers, got {short(attrs)}"
        if attrs and not (0 <= min(attrs) and max(attrs) <= INT64_MAX):  # -1 is the padding
            return f"attribute_ids must be non-negative 64-bit integers, got {short(attrs)}"
    return None


def _category_ids(path, data, require):
    """The set of the file's category ids, or None when it has no ``categories`` and ``require``
    is False.  A malformed ``categories`` list is a file error (it is the label space)."""
    cats = data.get("categories")
    if cats is None or cats == []:
        if require:
            raise ValueError(f"{path}: no 'categories' (required: the class count comes from the data)")
        return None if cats is None else set()
    if type(cats) is not list:
        raise ValueError(f"{path}: 'categories' must be a list, got {short(cats)}")
    ids = set()
    for i, cat in enumerate(cats):
        cid = cat.get("id") if type(cat) is dict else None
        if type(cid) is not int or not 0 <= cid <= INT64_MAX:
            raise ValueError(f"{path}: categories[{i}]: id must be a non-negative 64-bit integer, "
                             f"got {short(cid)}")
        ids.add(cid)
    return ids


def _big_to_inf(v):
    """A (nested list of) JSON number(s) as float(s); an int beyond float64's range -> +-inf."""
    if type(v) is list:
        return [_big_to_inf(x) for x in v]
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _float32(values, shape):
    """``values`` (lists of JSON numbers) -> float32 array of ``shape``.  A number beyond float32's
    range becomes +-inf, so that the vectorised finiteness check names its record: numpy would warn
    (a float) or raise OverflowError (an int beyond float64, e.g. ``10**400``)."""
    with np.errstate(over="ignore"):
        try:
            return np.asarray(values, dtype=np.float32).reshape(shape)
        except OverflowError:  # rare: only then the per-number pass
            return np.asarray(_big_to_inf(values), dtype=np.float32).reshape(shape)


def _name(path, ann):
    return f"{path}: annotation id={short(ann.get('id'))} (image_id={short(ann.get('image_id'))})"


@gc_paused()
def read_coco_detection(
    annotation_json,
    image_dir,
    *,
    with_attributes=False,
    labelled=True,
    require_categories=False,
    on_error="raise",
    report=None,
):
    """Read a COCO-format detection annotation file.

    Args:
        annotation_json: path of e.g. ``annotations/instances_val2017.json``.
        image_dir: folder holding the images (``val2017/``); ``image_path`` = ``image_dir/file_name``.
            Images are neither opened nor checked for existence.
        with_attributes: fill ``attributes`` from each annotation's ``attribute_ids`` (Visual
            Genome): the first ``MAX_ATTRIBUTES`` (16) ids, then -1.  A missing ``attribute_ids``
            means none.  Without it ``attributes`` is None.
        labelled: the split has labels (train, val): a file without an ``annotations`` list is an
            error.  False: the split is declared unlabelled (an ``image_info_test`` file), and a
            missing ``annotations`` means every image has no boxes.
        require_categories: the caller takes the class count from the file's ``categories``, so a
            file without a non-empty ``categories`` list is an error.  False (the class count comes
            from the config): a file without ``categories`` is read, and only negative or
            non-64-bit ``category_id``s are refused.  Either way, when the file has
            ``categories``, an annotation whose ``category_id`` is none of their ids is malformed.
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
        ValueError: malformed file (not UTF-8 or not JSON, no ``images``, no ``annotations`` when
            ``labelled``, malformed ``categories``), or malformed record under
            ``on_error="raise"``; one line naming the file and the image id / annotation id / key.
            Malformed records also include: an image ``file_name`` that is absolute or leaves
            ``image_dir`` (``readers.name_problem``), ids beyond int64, a box beyond float32.
    """
    path, image_dir = os.fspath(annotation_json), os.fspath(image_dir)
    report, skipped_before = start_report(report, on_error)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a COCO detection file (no 'images' list)")
    annotations = data.get("annotations")
    if annotations is None and labelled:
        raise ValueError(f"{path}: no 'annotations' list (pass labelled=False for an unlabelled split)")
    if type(annotations) is not list and annotations is not None:
        raise ValueError(f"{path}: 'annotations' must be a list, got {short(annotations)}")
    annotations = annotations or []
    category_ids = _category_ids(path, data, require_categories)

    # 1. Images: id -> position in `images`.
    images, index, bad_image_ids = [], {}, set()
    for i, img in enumerate(data["images"]):
        problem = _image_problem(img, index)
        if problem:
            image_id = img.get("id") if isinstance(img, dict) else None
            report.bad(on_error, f"{path}: image #{i} (id={short(image_id)}): {problem}")
            if _is_int(image_id):
                bad_image_ids.add(image_id)
            continue
        index[img["id"]] = len(images)
        images.append(img)

    # 2. Annotations, validated in one pass into flat lists (vectorised below: COCO train has 860k).
    kept, owner, xywh, labels, areas, attrs = [], [], [], [], [], []
    for ann in annotations:
        if type(ann) is not dict:
            report.bad(on_error, f"{path}: annotation {short(ann)}: not a JSON object")
            continue
        image_id = ann.get("image_id")
        if not _is_int(image_id) or image_id not in index:
            if _is_int(image_id) and image_id in bad_image_ids:
                report.dropped["of_skipped_image"] += 1
            else:
                report.bad(on_error, f"{_name(path, ann)}: refers to an unknown image")
            continue
        problem = _annotation_problem(ann, with_attributes, category_ids)
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
    boxes = _float32(xywh, (n, 4))  # (n, 4)
    areas = _float32(areas, (n,))
    finite = np.isfinite(boxes).all(1) & np.isfinite(areas)  # before clipping turns inf finite
    for j in np.flatnonzero(~finite):  # NaN / Infinity (which Python's json accepts), 1e400, 1e39
        report.bad(on_error, f"{_name(path, kept[j])}: bbox and area must be finite float32 numbers, "
                             f"got bbox={short(kept[j]['bbox'])} area={short(kept[j].get('area'))}")
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
