"""Detection post-processing: model outputs -> per-image absolute boxes, and COCO json.

Written from the facts of MMF ``mmf/datasets/builders/coco/detection_dataset.py``
(``PostProcess``, ``DetectionCOCODataset.format_for_prediction``) and DETR
``models/detr.py::PostProcess``, see ``shared/reference/unit_mmf_detr.md`` sections 1.7 and 4.
Choices where the facts are silent are stated in the docstrings (attribute scores; the
``format_for_prediction`` signature).
"""

import torch
from torch import nn

from unit_fast.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Converts the model's normalised outputs into the COCO api's per-image format.

    ``forward(outputs, target_sizes)``:
        outputs: dict with ``pred_logits (B, Q, C+1)``, ``pred_boxes (B, Q, 4)`` normalised
            cxcywh, and optionally ``attr_logits (B, Q, A)``.
        target_sizes: ``(B, 2)`` image sizes ``(h, w)`` in pixels (the original image, for
            evaluation).
        Returns a list of B dicts with, per query (all Q kept: no threshold, no top-k):
            ``scores (Q,)``: the highest softmax probability among the C object classes;
            ``labels (Q,)`` int64: its class (never the no-object class C);
            ``boxes (Q, 4)``: absolute xyxy pixels;
            and with ``attr_logits``: ``attr_scores (Q,)`` and ``attr_labels (Q,)`` int64, the
            top attribute after a softmax over the A attribute classes (our choice: the
            attribute loss is a softmax cross entropy, so the softmax is its probability;
            the head's outputs are post-ReLU scores, not probabilities).

    The softmax is taken over all C+1 columns before the no-object one is dropped, so a query
    the model deems empty gets a low score rather than being removed.
    """

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]  # [B, Q, C+1], [B, Q, 4]
        if len(logits) != len(target_sizes) or target_sizes.dim() != 2 or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be ({len(logits)}, 2) (h, w), "
                             f"got {tuple(target_sizes.shape)}")
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # [B, Q], [B, Q]
        img_h, img_w = target_sizes.to(boxes.dtype).unbind(1)  # [B], [B]
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # [B, 4]
        boxes = box_cxcywh_to_xyxy(boxes) * scale[:, None, :]  # [B, Q, 4]
        results = [{"scores": s, "labels": lab, "boxes": b}
                   for s, lab, b in zip(scores, labels, boxes, strict=True)]
        if "attr_logits" in outputs:
            attr_scores, attr_labels = outputs["attr_logits"].softmax(-1).max(-1)  # [B, Q], [B, Q]
            for r, s, lab in zip(results, attr_scores, attr_labels, strict=True):
                r["attr_scores"], r["attr_labels"] = s, lab
        return results


def format_for_prediction(results, image_ids, label_to_category_id=None):
    """``PostProcess`` results -> the COCO results json list ``COCO.loadRes`` reads.

    Args:
        results: list of B dicts with ``scores (Q,)``, ``labels (Q,)``, ``boxes (Q, 4)`` xyxy.
        image_ids: B COCO image ids (ints or 0-d tensors).
        label_to_category_id: optional mapping from label to COCO category id; default the
            label itself (UniT's COCO labels are the raw category ids, ``num_classes=91``).

    Returns:
        list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` python values,
        one per query of every image.  Reads every tensor on the host (a sync; evaluation only).
    """
    out = []
    for image_id, r in zip(image_ids, results, strict=True):
        image_id = int(image_id)
        x0, y0, x1, y1 = r["boxes"].float().unbind(-1)  # [Q] each
        xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1).tolist()  # host sync
        labels, scores = r["labels"].tolist(), r["scores"].tolist()  # host sync
        for label, score, box in zip(labels, scores, xywh, strict=True):
            category = label_to_category_id[label] if label_to_category_id is not None else label
            out.append({"image_id": image_id, "category_id": category, "bbox": box, "score": score})
    return out
