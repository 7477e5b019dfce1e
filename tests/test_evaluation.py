"""Evaluators: COCO mAP on a hand-made ground truth, VQA soft accuracy, accuracy, merge of states."""

import json
import math
import pickle

import numpy as np
import pytest
import torch

from unit_fast.data.readers.vqa2 import soft_scores
from unit_fast.data.records import DetectionRecord, VQARecord
from unit_fast.evaluation import AccuracyEvaluator, DetectionEvaluator, VQAEvaluator

NUM_CLASSES = 7  # raw category ids 1, 3, 6 (non-contiguous): max id + 1
Q = 6  # queries per image, more than any image's boxes

# image id -> (height, width, [(category_id, x, y, w, h)]); image 30 also has a crowd region.
GT = {
    10: (100, 200, [(1, 10, 20, 40, 30), (3, 100, 10, 50, 60)]),
    20: (120, 80, [(6, 5, 5, 30, 40), (1, 40, 60, 30, 50), (3, 10, 70, 20, 20)]),
    30: (90, 90, [(6, 20, 30, 40, 40)]),
}
CROWD = {"id": 99, "image_id": 30, "category_id": 1, "bbox": [70, 5, 15, 15], "area": 225.0, "iscrowd": 1}


def coco_json(gt=GT, crowd=True):
    images, anns = [], []
    for image_id, (h, w, boxes) in gt.items():
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        for cat, x, y, bw, bh in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": [x, y, bw, bh], "area": float(bw * bh), "iscrowd": 0})
    if crowd:
        anns.append(CROWD)
    cats = [{"id": c, "name": n} for c, n in ((1, "circle"), (3, "square"), (6, "triangle"))]
    return {"images": images, "annotations": anns, "categories": cats}


def records(gt=GT):
    out = []
    for image_id, (h, w, boxes) in gt.items():
        xyxy = np.array([[x, y, x + bw, y + bh] for _, x, y, bw, bh in boxes], dtype=np.float32)
        xyxy = xyxy.reshape(-1, 4)  # (N, 4), also for N = 0
        out.append(DetectionRecord(
            image_path=f"{image_id}.jpg", image_id=image_id, width=w, height=h, boxes=xyxy,
            labels=np.array([c for c, *_ in boxes], dtype=np.int64),
            area=np.array([bw * bh for *_, bw, bh in boxes], dtype=np.float32)))
    return out


def batch(image_ids, shift=0.0, num_queries=Q):
    """UniT detection outputs predicting every GT box of ``image_ids`` (confidently, right class),
    each moved right by ``shift`` of its width; spare queries are low-score background guesses."""
    B = len(image_ids)
    logits = torch.full((B, num_queries, NUM_CLASSES + 1), -5.0)
    logits[..., -1] = 5.0  # "no object"
    logits[..., 1] = 0.0  # spare queries: a weak circle
    boxes = torch.full((B, num_queries, 4), 0.5)  # spare queries: the centre half of the image
    targets = []
    for b, image_id in enumerate(image_ids):
        h, w, gt_boxes = GT[image_id]
        for q, (cat, x, y, bw, bh) in enumerate(gt_boxes[:num_queries]):
            logits[b, q, cat] = 10.0
            logits[b, q, -1] = -5.0
            boxes[b, q] = torch.tensor([(x + bw / 2 + shift * bw) / w, (y + bh / 2) / h, bw / w, bh / h])
        targets.append({"image_id": torch.tensor(image_id), "orig_size": torch.tensor([h, w]),
                        "size": torch.tensor([800, 800])})  # size: the resized input, not used
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def evaluate(gt, *batches):
    ev = DetectionEvaluator(gt)
    for outputs, targets in batches:
        ev.update(outputs, targets)
    return ev.compute()


@pytest.fixture
def gt_path(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco_json()))
    return path


def test_perfect_predictions_give_ap_1(gt_path):
    m = evaluate(gt_path, batch([10, 20]), batch([30]))
    assert m == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})


def test_records_ground_truth_matches_json(gt_path):
    # Records have no crowd region: the spare queries' centre boxes never hit it here either.
    assert evaluate(records(), batch([10, 20, 30])) == evaluate(gt_path, batch([10, 20, 30]))
    shifted = batch([10, 20, 30], shift=0.2)
    assert evaluate(records(), shifted) == pytest.approx(evaluate(coco_json(crowd=False), shifted))


def test_shifted_boxes_lower_ap(gt_path):
    perfect = evaluate(gt_path, batch([10, 20, 30]))
    small = evaluate(gt_path, batch([10, 20, 30], shift=0.1))  # IoU 0.82
    large = evaluate(gt_path, batch([10, 20, 30], shift=0.3))  # IoU 0.54
    assert small["AP50"] == pytest.approx(1.0) and small["AP75"] == pytest.approx(1.0)
    assert large["AP50"] == pytest.approx(1.0) and large["AP75"] == 0.0
    assert perfect["AP"] > small["AP"] > large["AP"] > 0.0


def test_boxes_scaled_to_original_size(gt_path):
    """Normalised boxes are scaled by ``orig_size``; a wrong size would miss every box."""
    outputs, targets = batch([10])
    for t in targets:
        t["orig_size"] = t["orig_size"] * 2
    assert evaluate(gt_path, (outputs, targets))["AP50"] == 0.0


def test_empty_predictions_and_empty_ground_truth(gt_path):
    assert evaluate(gt_path, batch([10, 20], num_queries=0)) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    # Nothing evaluated, or no ground-truth box in what was: undefined, nan.
    assert all(math.isnan(v) for v in evaluate(gt_path).values())
    no_gt = coco_json({10: (100, 200, []), 20: (120, 80, [])}, crowd=False)
    assert all(math.isnan(v) for v in evaluate(no_gt, batch([10, 20])).values())
    assert all(math.isnan(v) for v in evaluate(no_gt, batch([10, 20], num_queries=0)).values())
    assert all(math.isnan(v) for v in evaluate([], ({"pred_logits": torch.zeros(0, Q, 8),
                                                      "pred_boxes": torch.zeros(0, Q, 4)}, [])).values())


def test_unknown_image_and_label_mapping(gt_path):
    with pytest.raises(ValueError, match="not in the ground truth"):
        DetectionEvaluator(coco_json({20: GT[20]})).update(*batch([10]))
    # A model with contiguous labels 0, 1, 2 (+ no object) for categories 1, 3, 6.
    outputs, targets = batch([10, 20, 30])
    outputs["pred_logits"] = outputs["pred_logits"][..., [1, 3, 6, NUM_CLASSES]]  # (B, Q, 3 + 1)
    ev = DetectionEvaluator(gt_path, label_to_category_id=[1, 3, 6])
    ev.update(outputs, targets)
    assert ev.compute()["AP"] == pytest.approx(1.0)
    unmapped = DetectionEvaluator(gt_path)
    unmapped.update(outputs, targets)
    assert unmapped.compute()["AP"] < 0.5  # labels 0, 1, 2 taken as category ids
    with pytest.raises(ValueError, match="no entry for label"):
        DetectionEvaluator(gt_path, label_to_category_id={0: 1, 1: 3}).update(outputs, targets)


def test_detection_merge_of_halves_equals_whole(gt_path):
    whole = DetectionEvaluator(gt_path)
    whole.update(*batch([10, 20, 30], shift=0.15))
    first, second = DetectionEvaluator(gt_path), DetectionEvaluator(gt_path)
    first.update(*batch([10, 20], shift=0.15))
    second.update(*batch([30, 10], shift=0.15))  # 10 again: sampler padding, counted once
    first.merge(pickle.loads(pickle.dumps(second.state())))
    assert first.compute() == whole.compute()
    assert whole.compute()["AP"] < 1.0
    whole.reset()
    assert all(math.isnan(v) for v in whole.compute().values())


# --- VQA and accuracy ----------------------------------------------------------------------

VOCAB = ["yes", "no", "2", "red"]
HUMANS = [
    ["yes"] * 3 + ["no"] * 7,  # predicted "yes": 3 of 10 -> 0.9
    ["two", "2"] + ["3"] * 8,  # predicted "2": "two" normalises to "2", 2 of 10 -> 0.6
    ["Red."] + ["blue"] * 9,  # predicted "red": 1 of 10 -> 0.3
    ["no"] * 10,  # predicted "yes": 0
]
PRED = torch.tensor([[5.0, 1, 0, 0], [0, 0, 3, 1], [0, 0, 0, 2], [1, 0, 0, 0]])  # yes, 2, red, yes
EXPECTED = (0.9 + 0.6 + 0.3 + 0.0) / 4


def vqa_records():
    return [VQARecord(image_path="x.jpg", image_id=1, question_id=100 + i, question="?", answers=a)
            for i, a in enumerate(HUMANS)]


def test_vqa_soft_accuracy_hand_computed():
    index = {v: i for i, v in enumerate(VOCAB)}
    soft = torch.tensor(np.stack([soft_scores(a, index) for a in HUMANS]))  # (4, 4) the batch targets
    for targets in (vqa_records(), HUMANS, soft):
        ev = VQAEvaluator(VOCAB)
        ev.update(PRED, targets)
        assert ev.compute()["accuracy"] == pytest.approx(EXPECTED)
    assert [a for _, a in ev.predictions()] == ["yes", "2", "red", "yes"]


def test_vqa_merge_of_halves_equals_whole():
    whole = VQAEvaluator(VOCAB)
    whole.update(PRED, vqa_records())
    first, second = VQAEvaluator(VOCAB), VQAEvaluator(VOCAB)
    first.update(PRED[:2], vqa_records()[:2])
    second.update(PRED[1:], vqa_records()[1:])  # question 101 again: sampler padding, counted once
    first.merge(pickle.loads(pickle.dumps(second.state())))
    assert first.compute()["accuracy"] == pytest.approx(whole.compute()["accuracy"])
    whole.reset()
    assert math.isnan(whole.compute()["accuracy"])
    with pytest.raises(ValueError):
        whole.update(PRED[:, :3], HUMANS)


def test_accuracy_and_merge():
    scores = torch.tensor([[2.0, 1, 0], [0, 3, 1], [0, 1, 2], [5, 0, 0], [0, 0, 1]])  # 0, 1, 2, 0, 2
    labels = torch.tensor([0, 1, 1, 2, -1])  # the last is unlabelled: skipped
    ev = AccuracyEvaluator()
    ev.update(scores, labels)
    assert ev.compute() == {"accuracy": 0.5}
    first, second = AccuracyEvaluator(), AccuracyEvaluator()
    first.update(scores[:3], labels[:3], ids=[0, 1, 2])
    second.update(scores[2:], labels[2:], ids=torch.arange(2, 5))  # id 2 again: counted once
    first.merge(pickle.loads(pickle.dumps(second.state())))
    assert first.compute() == ev.compute()
    ev.reset()
    assert math.isnan(ev.compute()["accuracy"])
