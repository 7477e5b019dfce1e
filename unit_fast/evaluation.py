"""Metric accumulators for the evaluation loop: COCO detection mAP, VQA accuracy, accuracy.

Each evaluator is fed one batch at a time (``update``) and gives its metrics at the end
(``compute``).  For distributed evaluation every rank keeps its own evaluator; ``state()`` is a
picklable snapshot (python lists, dicts, floats and numpy arrays; no tensors, so no device) that
``torch.distributed.gather_object`` can send to rank 0, where ``merge(state)`` adds it to rank 0's
evaluator::

    states = [None] * world_size if rank == 0 else None
    torch.distributed.gather_object(evaluator.state(), states, dst=0)
    if rank == 0:
        for s in states[1:]:
            evaluator.merge(s)
        metrics = evaluator.compute()

``DistributedSampler`` pads the last shard by repeating samples.  Samples that carry an id (the
detection ``image_id``; a VQA ``question_id``; the optional ``ids`` of ``update``) count once:
the first copy seen is kept, as DETR's ``CocoEvaluator`` keeps one evaluation per image id.

Detection follows MMF's ``DetectionMeanAP`` (``shared/reference/unit_mmf_detr.md`` section 1.7):
``PostProcess`` with the *original* image sizes, all Q queries kept (no threshold, no top-k), and
pycocotools ``COCOeval(iouType="bbox")``.  VQA uses the official soft accuracy of
``unit_fast.data.readers.vqa2``.  Metrics are fractions in [0, 1]; ``nan`` means undefined
(nothing to score), never a failure.
"""

import abc
import contextlib
import io
import math
import os
from collections.abc import Mapping

import numpy as np
import torch

from unit_fast.data.readers.vqa2 import normalize_answer, soft_score
from unit_fast.postprocess import PostProcess

NAN = float("nan")


class _Evaluator(abc.ABC):
    """Common interface: ``update(...)``, ``compute() -> dict``, ``reset()``, ``state()``,
    ``merge(state)``."""

    @abc.abstractmethod
    def reset(self): ...

    @abc.abstractmethod
    def state(self): ...

    @abc.abstractmethod
    def merge(self, other_state): ...


def _to_numpy(x):
    """Tensor (any device) or array-like -> numpy array on the host (a sync for CUDA tensors)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()  # host sync
    return np.asarray(x)


def _ids_list(ids, n):
    if ids is None:
        return [None] * n
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = _to_numpy(ids).tolist()
    else:
        ids = [i.item() if isinstance(i, (torch.Tensor, np.generic)) else i for i in ids]  # hashable values
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} samples")
    return ids


def _first_per_id(ids, values):
    """``values`` with later repeats of a non-None id dropped (DistributedSampler padding)."""
    seen, kept = set(), []
    for i, v in zip(ids, values, strict=True):
        if i is not None:
            if i in seen:
                continue
            seen.add(i)
        kept.append(v)
    return kept


# --- detection -----------------------------------------------------------------------------


def _gt_from_records(records, label_map):
    """COCO ground-truth dataset dict from ``DetectionRecord``s (absolute xyxy -> xywh, iscrowd 0;
    the records' crowd boxes were removed by the reader, so no ignore regions)."""
    images, annotations, categories = [], [], set()
    for r in records:
        images.append({"id": int(r.image_id), "width": int(r.width), "height": int(r.height)})
        boxes = np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4)  # (N, 4) xyxy
        labels = label_map(np.asarray(r.labels).reshape(-1))  # (N,) category ids
        area = np.asarray(r.area, dtype=np.float64).reshape(-1)  # (N,)
        for (x0, y0, x1, y1), cat, a in zip(boxes.tolist(), labels.tolist(), area.tolist(), strict=True):
            annotations.append({
                "id": len(annotations) + 1,  # COCOeval's matching treats id 0 as "unmatched"
                "image_id": int(r.image_id), "category_id": int(cat),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": a, "iscrowd": 0,
            })
            categories.add(int(cat))
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in sorted(categories)]}


def _label_mapper(label_to_category_id):
    """A function mapping an int array of labels to category ids (identity for None)."""
    if label_to_category_id is None:
        return lambda labels: np.asarray(labels, dtype=np.int64)
    items = (label_to_category_id.items() if isinstance(label_to_category_id, Mapping)
             else enumerate(label_to_category_id))
    table = {int(k): int(v) for k, v in items}
    lookup = np.full(max(table, default=-1) + 1, -1, dtype=np.int64)
    lookup[list(table)] = list(table.values())

    def mapper(labels):
        labels = np.asarray(labels, dtype=np.int64)
        bad = (labels < 0) | (labels >= len(lookup))
        bad[~bad] = lookup[labels[~bad]] < 0
        if bad.any():
            missing = sorted(set(labels[bad].tolist()))[:10]
            raise ValueError(f"label_to_category_id has no entry for label(s) {missing}")
        return lookup[labels]

    return mapper


def _pycocotools(module):
    """``pycocotools.<module>``, imported where the COCO evaluation needs it (not at import:
    unit_fast and its kernels work without it); a clear error when it is missing."""
    import importlib

    try:
        return importlib.import_module(f"pycocotools.{module}")
    except ImportError as e:
        raise ImportError("DetectionEvaluator needs pycocotools (pip install pycocotools); "
                          "the rest of unit_fast works without it") from e


class DetectionEvaluator(_Evaluator):
    """COCO box mAP of UniT's detection outputs, by pycocotools ``COCOeval(iouType="bbox")``.

    Args:
        records_or_coco_json: the ground truth: a COCO instances json path, a loaded COCO json
            dict, a ``pycocotools.coco.COCO``, or an iterable of ``DetectionRecord`` (boxes
            absolute xyxy; written as COCO xywh with ``iscrowd`` 0, categories = the labels
            present).
        label_to_category_id: mapping (or sequence indexed by label) from the model's label to the
            COCO category id; None: the label is the category id (UniT's COCO labels are the raw
            ids, ``num_classes`` 91).  With ``DetectionRecord`` ground truth it maps the records'
            labels too, since they are the model's training labels.  It must cover every label
            the model can predict (0..C-1), else ``update`` raises.

    ``update(outputs, targets)``:
        outputs: the detection output dict of one batch: ``pred_logits (B, Q, C+1)`` and
            ``pred_boxes (B, Q, 4)`` normalised cxcywh (other keys ignored).
        targets: the batch's B target dicts with ``image_id`` and ``orig_size [h, w]`` (the
            original image, in pixels; boxes are scaled to it).
        Every one of the Q queries becomes a detection (score = best non-"no object"
        probability), as MMF does; COCOeval's ``maxDets=100`` then keeps the 100 best per image
        and category.  An image id seen again (sampler padding) is ignored.  One host sync.

    ``compute() -> {"AP", "AP50", "AP75"}``: AP@[.5:.95], AP@.5, AP@.75 (area "all",
    maxDets 100) over the images passed to ``update``, as python floats.  pycocotools' printout
    is silenced and kept in ``self.summary``.  Edge cases: no detections while those images have
    (non-crowd) ground-truth boxes -> 0.0; no ground-truth boxes in them, or no image evaluated
    -> nan (COCOeval's -1, "undefined").

    ``state()`` is ``{"detections": {image_id: (Q, 6) float64 array [x, y, w, h, score,
    category_id]}}``: every query's COCO json entry (as ``format_for_prediction`` writes it) in
    array form, smaller to hold and to gather than dicts.
    """

    def __init__(self, records_or_coco_json, label_to_category_id=None):
        COCO = _pycocotools("coco").COCO

        self._map = _label_mapper(label_to_category_id)
        gt = records_or_coco_json
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading steps
            if isinstance(gt, COCO):
                self.coco = gt
            elif isinstance(gt, (str, os.PathLike)):
                self.coco = COCO(os.fspath(gt))
            else:
                self.coco = COCO()
                self.coco.dataset = gt if isinstance(gt, Mapping) else _gt_from_records(gt, self._map)
                self.coco.createIndex()
        self._gt_image_ids = set(self.coco.getImgIds())
        self.postprocess = PostProcess()
        self.summary = ""
        self.reset()

    def reset(self):
        self._detections = {}  # image_id -> (Q, 6) float64 [x, y, w, h, score, category_id]

    @torch.no_grad()
    def update(self, outputs, targets):
        if len(targets) == 0:
            return
        image_ids = [int(t["image_id"]) for t in targets]
        unknown = [i for i in image_ids if i not in self._gt_image_ids]
        if unknown:
            raise ValueError(f"image_id(s) {unknown[:10]} are not in the ground truth")
        boxes = outputs["pred_boxes"]
        sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(boxes.device)  # (B, 2)
        results = self.postprocess(outputs, sizes)
        scores = torch.stack([r["scores"] for r in results])  # (B, Q)
        labels = torch.stack([r["labels"] for r in results])  # (B, Q)
        xyxy = torch.stack([r["boxes"] for r in results])  # (B, Q, 4) absolute xyxy
        xyxy, scores, labels = xyxy.float().cpu(), scores.float().cpu(), labels.cpu()  # host sync
        xywh = torch.cat([xyxy[..., :2], xyxy[..., 2:] - xyxy[..., :2]], dim=-1)  # (B, Q, 4)
        rows = torch.cat([xywh, scores[..., None]], dim=-1).double().numpy()  # (B, Q, 5)
        categories = self._map(labels.numpy()).astype(np.float64)  # (B, Q)
        rows = np.concatenate([rows, categories[..., None]], axis=-1)  # (B, Q, 6)
        for image_id, image_rows in zip(image_ids, rows, strict=True):
            self._detections.setdefault(image_id, image_rows)

    def state(self):
        return {"detections": dict(self._detections)}

    def merge(self, other_state):
        for image_id, image_rows in other_state["detections"].items():
            self._detections.setdefault(int(image_id), np.asarray(image_rows, dtype=np.float64))
        return self

    def _num_gt(self, image_ids):
        """Non-crowd, non-ignored ground-truth boxes in ``image_ids`` (what COCOeval scores)."""
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_ids))
        return sum(1 for a in anns if not a.get("iscrowd", 0) and not a.get("ignore", 0))

    def compute(self):
        COCOeval = _pycocotools("cocoeval").COCOeval

        image_ids = sorted(self._detections)
        self.summary = ""
        if not image_ids:
            return {"AP": NAN, "AP50": NAN, "AP75": NAN}
        dets = [
            {"image_id": image_id, "bbox": row[:4], "score": row[4], "category_id": int(row[5])}
            for image_id in image_ids for row in self._detections[image_id].tolist()
        ]
        if not dets:  # loadRes cannot take an empty list
            ap = 0.0 if self._num_gt(image_ids) else NAN
            return {"AP": ap, "AP50": ap, "AP75": ap}
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = self.coco.loadRes(dets)
            coco_eval = COCOeval(self.coco, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self.summary = buf.getvalue()
        ap, ap50, ap75 = (float(s) if s >= 0 else NAN for s in coco_eval.stats[:3])  # -1: undefined
        return {"AP": ap, "AP50": ap50, "AP75": ap75}


# --- classification ------------------------------------------------------------------------


class _PerSample(_Evaluator):
    """Per-sample values with optional ids; the metric is their mean (nan when empty)."""

    def reset(self):
        self._ids, self._values = [], []

    def state(self):
        return {"ids": list(self._ids), "values": list(self._values)}

    def merge(self, other_state):
        self._ids.extend(other_state["ids"])
        self._values.extend(other_state["values"])
        return self

    def _mean(self):
        values = _first_per_id(self._ids, self._values)
        return math.fsum(values) / len(values) if values else NAN


class VQAEvaluator(_PerSample):
    """VQA accuracy: the official soft score of the argmax answer, averaged over questions.

    Args:
        answer_vocab: the ``A`` answers (list of str), in the order of the score columns.

    ``update(scores, targets, ids=None)``:
        scores: ``(B, A)`` answer logits (or probabilities); the prediction is the argmax.
        targets, one of:
            ``VQARecord``s: the official metric on their raw human ``answers`` (prediction and
                answers normalised with ``normalize_answer``); ids default to ``question_id``;
            B lists of raw human answers (str): the same metric;
            ``(B, A)`` soft-score targets (the batch's ``targets``, ``soft_scores`` of the human
                answers): the score of the predicted column.  Equal to the official metric,
                since every prediction is a vocabulary answer.
        ids: optional B sample ids (e.g. question ids): repeats count once.
        One host sync.

    ``compute() -> {"accuracy"}`` in [0, 1], nan when nothing was scored.  ``predictions()``
    gives ``[(id, answer)]`` in update order.
    """

    def __init__(self, answer_vocab):
        self.answer_vocab = list(answer_vocab)
        self.reset()

    def reset(self):
        super().reset()
        self._answers = []

    def state(self):
        return {**super().state(), "answers": list(self._answers)}

    def merge(self, other_state):
        super().merge(other_state)
        self._answers.extend(other_state["answers"])
        return self

    def update(self, scores, targets, ids=None):
        if scores.dim() != 2 or scores.shape[1] != len(self.answer_vocab):
            raise ValueError(f"scores must be (B, {len(self.answer_vocab)}), got {tuple(scores.shape)}")
        pred = _to_numpy(scores.argmax(-1)).tolist()  # host sync; (B,)
        answers = [self.answer_vocab[k] for k in pred]
        if isinstance(targets, (torch.Tensor, np.ndarray)):
            targets = _to_numpy(targets)
            if targets.shape != tuple(scores.shape):
                raise ValueError(f"soft-score targets must be {tuple(scores.shape)}, got {targets.shape}")
            values = targets[np.arange(len(pred)), pred].astype(np.float64).tolist()
        else:
            targets = list(targets)
            if len(targets) != len(pred):
                raise ValueError(f"{len(targets)} targets for {len(pred)} score rows")
            if ids is None and targets and hasattr(targets[0], "question_id"):
                ids = [r.question_id for r in targets]
            values = [self._official(a, getattr(t, "answers", t))  # a VQARecord or its answers
                      for a, t in zip(answers, targets, strict=True)]
        self._ids.extend(_ids_list(ids, len(pred)))
        self._values.extend(values)
        self._answers.extend(answers)

    @staticmethod
    def _official(answer, humans):
        if isinstance(humans, str) or not humans:
            raise ValueError(f"need a list of human answers, got {humans!r}")
        humans = [normalize_answer(h) for h in humans]
        return soft_score(humans.count(normalize_answer(answer)), len(humans))

    def predictions(self):
        return list(zip(self._ids, self._answers, strict=True))

    def compute(self):
        return {"accuracy": self._mean()}


class AccuracyEvaluator(_PerSample):
    """Top-1 accuracy of a classifier.

    ``update(scores, labels, ids=None)``: ``scores (B, C)`` logits (prediction = argmax),
    ``labels (B,)`` int class indices; a label < 0 (GLUE test files: no label) is skipped.
    ``ids``: optional B sample ids, repeats count once.  One host sync.

    ``compute() -> {"accuracy"}`` in [0, 1], nan when nothing was scored.
    """

    def __init__(self):
        self.reset()

    def update(self, scores, labels, ids=None):
        if scores.dim() != 2:
            raise ValueError(f"scores must be (B, C), got {tuple(scores.shape)}")
        pred = _to_numpy(scores.argmax(-1)).tolist()  # host sync; (B,)
        labels = _to_numpy(labels).reshape(-1).tolist()
        if len(labels) != len(pred):
            raise ValueError(f"{len(labels)} labels for {len(pred)} score rows")
        for i, p, y in zip(_ids_list(ids, len(pred)), pred, labels, strict=True):
            if y >= 0:
                self._ids.append(i)
                self._values.append(float(p == y))

    def compute(self):
        return {"accuracy": self._mean()}
