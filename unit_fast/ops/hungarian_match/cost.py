"""DETR/MMF matching cost laid out per image: ``(B, Q, max T)`` blocks, never ``(B*Q, sum T)``.

Plain torch for now; the box-ops issue replaces it with a fused Triton kernel.
"""

import torch


def _cxcywh_to_xyxy(x):
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _pairwise_giou(a, b):
    """GIoU of xyxy boxes ``a (B, Q, 4)`` against ``b (B, T, 4)`` -> ``(B, Q, T)``."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])  # [B, Q]
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # [B, T]
    a4, b4 = a[:, :, None, :], b[:, None, :, :]  # [B, Q, 1, 4], [B, 1, T, 4]
    inter = (torch.min(a4[..., 2:], b4[..., 2:]) - torch.max(a4[..., :2], b4[..., :2])).clamp(min=0).prod(-1)
    union = area_a[:, :, None] + area_b[:, None, :] - inter  # [B, Q, T]
    hull = (torch.max(a4[..., 2:], b4[..., 2:]) - torch.min(a4[..., :2], b4[..., :2])).clamp(min=0).prod(-1)
    return inter / union - (hull - union) / hull


def matching_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, cost_class, cost_bbox, cost_giou, logsoftmax):
    """The matcher's cost, per image.

    Args:
        pred_logits: ``(B, Q, C+1)`` logits (any float dtype; computed in float32).
        pred_boxes: ``(B, Q, 4)`` cxcywh, normalised.
        tgt_labels: ``(B, T)`` int64, padded.
        tgt_boxes: ``(B, T, 4)`` cxcywh, padded with valid boxes.

    Returns:
        ``(B, Q, T)`` float32: ``cost_bbox * L1 + cost_class * (-prob) + cost_giou * (-GIoU)``,
        summed in DETR's order.  Columns past each image's target count are padding.
    """
    norm = torch.log_softmax if logsoftmax else torch.softmax
    prob = norm(pred_logits.float(), dim=-1)  # [B, Q, C+1]
    B, Q = prob.shape[:2]
    idx = tgt_labels[:, None, :].expand(B, Q, tgt_labels.shape[1])  # [B, Q, T]
    c_class = -prob.gather(2, idx)
    pb, tb = pred_boxes.float(), tgt_boxes.float()
    # L1 as a broadcast difference: torch.cdist(p=1) is slow and cross-image.
    c_bbox = (pb[:, :, None, :] - tb[:, None, :, :]).abs().sum(-1)  # [B, Q, T]
    c_giou = -_pairwise_giou(_cxcywh_to_xyxy(pb), _cxcywh_to_xyxy(tb))
    return cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou
