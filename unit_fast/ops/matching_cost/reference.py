"""Reference (the spec) of ``matching_cost``: DETR's matcher cost, laid out per image.

DETR (``models/matcher.py::HungarianMatcher.forward``) and MMF UniT build one cross-image
``(B*Q, sum T)`` cost with ``torch.cdist(p=1)`` and keep only its per-image diagonal blocks.
This computes just those blocks, padded: ``(B, Q, max T)`` (or ``(L, B, Q, max T)`` for L
decoder layers at once), with ``+inf`` in the padding columns.  Plain torch, kept readable
(the box math is ``unit_fast.ops.boxes``); it supports autograd (the kernels do not: the
matcher runs under ``torch.no_grad()``).
"""

import torch

from unit_fast.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou


def matching_cost_ref(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, cost_class, cost_bbox,
                      cost_giou, logsoftmax=False):
    """The Hungarian matcher's cost, per image (DETR/MMF ``HungarianMatcher``).

    Args:
        pred_logits: ``(B, Q, C+1)`` or ``(L, B, Q, C+1)`` logits, any float dtype; the
            softmax is computed in float32.
        pred_boxes: ``(B, Q, 4)`` or ``(L, B, Q, 4)`` normalised cxcywh boxes, any float dtype
            (cast to float32, as MMF casts them for the GIoU).
        tgt_labels: ``(B, T)`` int64 class ids, padded: entries ``t >= num_targets[b]`` are
            ignored (any value).
        tgt_boxes: ``(B, T, 4)`` cxcywh boxes, padded the same way.
        num_targets: ``(B,)`` int64 tensor, the number of real targets of each image (values
            above ``T`` act as ``T``).  Never read on the host.
        cost_class, cost_bbox, cost_giou: the weights (Python floats).
        logsoftmax: MMF's option: log-softmax instead of softmax for the class cost.

    Returns:
        float32 ``(B, Q, T)`` (``(L, B, Q, T)`` with layers)::

            cost_bbox * L1(pred, tgt) + cost_class * (-p[label]) + cost_giou * (-GIoU(pred, tgt))

        summed in DETR's order, where ``p`` is the softmax (log-softmax) of the logits and the
        GIoU is taken on the boxes converted to xyxy.  Entries of columns
        ``t >= num_targets[b]`` are ``+inf``.  NaN among a query's logits or box gives NaN
        costs in that query's row (the solver then marks the image INVALID); a real target
        whose label is outside ``[0, C+1)`` gets NaN costs in its column.
    """
    norm = torch.log_softmax if logsoftmax else torch.softmax
    prob = norm(pred_logits.float(), dim=-1)  # [..., B, Q, C+1]
    *lead, Q, C1 = prob.shape
    B, T = tgt_labels.shape
    valid = torch.arange(T, device=tgt_labels.device) < num_targets[:, None]  # [B, T]
    in_range = (tgt_labels >= 0) & (tgt_labels < C1)  # [B, T]
    # Padding labels may hold anything: gather at 0 there, the column becomes +inf below.
    labels = torch.where(valid & in_range, tgt_labels, 0)  # [B, T]
    idx = labels[:, None, :].expand(*lead, Q, T)  # [..., B, Q, T]
    c_class = -prob.gather(-1, idx)  # [..., B, Q, T]
    c_class = torch.where(in_range[:, None, :], c_class, float("nan"))
    pb, tb = pred_boxes.float(), tgt_boxes.float()
    # L1 as a broadcast difference: torch.cdist(p=1) is slow and cross-image.
    c_bbox = (pb[..., :, None, :] - tb[:, None, :, :]).abs().sum(-1)  # [..., B, Q, T]
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(tb))  # [..., B, Q, T]
    cost = cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou
    return torch.where(valid[:, None, :], cost, float("inf"))
