"""RT-DETR's matcher and box loss (``transformers/loss/loss_rt_detr.py``), which RT-DETRv2, D-FINE
(``loss_d_fine.py``) and DEIMv2 (``loss_deimv2.py``) reuse unchanged.

Derived from ``transformers.loss.loss_rt_detr.RTDetrHungarianMatcher.forward`` (Apache-2.0,
transformers 5.24).  Changes:
  - the cost is ``(B, Q, T_max)``, each image against its own targets, instead of
    ``(B*Q, sum T)``; every entry is computed by the same elementwise formula in the same dtype,
    so it equals the original's block of that image;
  - no copy to the host and no scipy loop: ``matching.solve`` solves all images in one call on
    the device and returns the indices there;
  - ``generalized_box_iou``'s check that the boxes are well formed is dropped (a host sync);
    inverted boxes get what the formula gives.
D-FINE and DEIMv2 build ``RTDetrHungarianMatcher`` themselves and inherit ``RTDetrLoss.loss_boxes``,
so the two patches below serve all four.  Left as transformers has them: D-FINE's ``loss_local``
(FGL + DDF losses over the box distributions, not the DETR box loss), DEIMv2's ``loss_labels_mal``
and its dense one-to-one union ``_get_dense_o2o_indices`` (a host loop over index pairs).
"""

import torch

from unit_fast.patch.hf.boxes import loss_boxes
from unit_fast.patch.hf.matching import padded_targets, solve
from unit_fast.patch.transformers import Patch

_MODULE = "transformers.loss.loss_rt_detr"


def _upcast(t):
    """transformers' ``_upcast``: float16 / bfloat16 -> float32 (its ``box_area`` does this)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _corners(boxes):
    """``(..., 4)`` cxcywh -> xyxy, as transformers' ``center_to_corners_format``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _area(boxes):
    """``(..., 4)`` xyxy -> ``(...)``, as transformers' ``box_area`` (after its upcast)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def hf_generalized_box_iou(boxes1, boxes2):
    """transformers' ``generalized_box_iou``, batched and unchecked.

    Args:
        boxes1: ``(B, Q, 4)`` xyxy.  boxes2: ``(B, T, 4)`` xyxy.

    Returns:
        ``(B, Q, T)``: GIoU of every query of image ``b`` with every target of image ``b``.  The
        same operations in the same order as transformers (areas upcast to float32 for half
        dtypes, as its ``box_area``), so every entry equals the original's bit for bit.
    """
    area1, area2 = _area(_upcast(boxes1)), _area(_upcast(boxes2))  # (B, Q), (B, T)
    b1, b2 = boxes1[:, :, None, :], boxes2[:, None, :, :]  # (B, Q, 1, 4), (B, 1, T, 4)
    wh = (torch.min(b1[..., 2:], b2[..., 2:]) - torch.max(b1[..., :2], b2[..., :2])).clamp(
        min=0
    )  # (B, Q, T, 2)
    inter = wh[..., 0] * wh[..., 1]  # (B, Q, T)
    union = area1[:, :, None] + area2[:, None, :] - inter
    iou = inter / union
    wh = (torch.max(b1[..., 2:], b2[..., 2:]) - torch.min(b1[..., :2], b2[..., :2])).clamp(
        min=0
    )  # (B, Q, T, 2)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def gather_classes(scores, labels):
    """``scores (B, Q, C)`` at each image's own target labels ``(B, T)`` -> ``(B, Q, T)``: the
    per-image form of transformers' ``out_prob[:, target_ids]``."""
    B, Q, _ = scores.shape
    return scores.gather(2, labels[:, None, :].expand(B, Q, labels.shape[1]))


def focal_cost(prob, alpha, gamma):
    """Focal class cost of probabilities ``prob`` (any shape), transformers' formula verbatim
    (the ``+ 1e-8`` inside both logs included): ``pos - neg``."""
    neg_cost_class = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos_cost_class = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos_cost_class - neg_cost_class


def rt_detr_cost(self, outputs, targets):
    """The matching cost of ``RTDetrHungarianMatcher``, per image.

    Args:
        outputs: ``"logits"`` ``(B, Q, C)``, ``"pred_boxes"`` ``(B, Q, 4)`` cxcywh.
        targets: B dicts, ``"class_labels"`` ``(T_b,)``, ``"boxes"`` ``(T_b, 4)`` cxcywh.

    Returns:
        ``cost (B, Q, T_max)`` (columns past ``sizes[b]`` are padding) and ``sizes`` (host ints).
        Class cost: sigmoid focal (``alpha``, ``gamma``) when ``use_focal_loss``, else minus the
        softmax probability; plus L1 and minus GIoU, weighted as configured.  NaN is kept (the
        solver treats it as a huge cost, as transformers' ``nan_to_num`` to the max).
    """
    logits, boxes = outputs["logits"], outputs["pred_boxes"]  # (B, Q, C), (B, Q, 4)
    labels, tgt_boxes, sizes = padded_targets(targets, logits.device)  # (B, T), (B, T, 4)
    if self.use_focal_loss:
        class_cost = focal_cost(gather_classes(logits.sigmoid(), labels), self.alpha, self.gamma)  # (B, Q, T)
    else:
        class_cost = -gather_classes(logits.softmax(-1), labels)  # (B, Q, T)
    bbox_cost = torch.cdist(boxes, tgt_boxes, p=1)  # (B, Q, T)
    giou_cost = -hf_generalized_box_iou(_corners(boxes), _corners(tgt_boxes))  # (B, Q, T)
    cost = self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost
    return cost, sizes


@torch.no_grad()
def rt_detr_matcher_forward(self, outputs, targets):
    """Drop-in for ``RTDetrHungarianMatcher.forward``: same arguments, same list of B
    ``(pred_idx, tgt_idx)`` int64 pairs (scipy's order), but on the predictions' device, from
    one batched exact solve (no host copy, no host sync)."""
    cost, sizes = rt_detr_cost(self, outputs, targets)
    return solve(cost, sizes)


PATCHES = [
    Patch(
        family="RT-DETR, RT-DETRv2, D-FINE, DEIMv2",
        module=_MODULE,
        owner="RTDetrHungarianMatcher",
        attribute="forward",
        replacement=rt_detr_matcher_forward,
        note="focal or softmax class cost + L1 + GIoU in torch on the device, per image (B, Q, T_max); "
        "one batched solve; indices stay on the device",
    ),
    Patch(
        family="RT-DETR, RT-DETRv2, D-FINE, DEIMv2",
        module=_MODULE,
        owner="RTDetrLoss",
        attribute="loss_boxes",
        replacement=loss_boxes,
        note="fused L1 + GIoU of the matched pairs; D-FINE's loss_local (FGL/DDF), DEIMv2's loss_mal and "
        "dense one-to-one union stay transformers'",
    ),
]
