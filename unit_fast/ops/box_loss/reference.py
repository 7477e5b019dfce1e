"""Reference (the spec) of ``box_loss``: DETR's ``SetCriterion.loss_boxes``, per matched pair.

Derived from facebookresearch/detr ``models/detr.py::SetCriterion.loss_boxes`` and
``util/box_ops.py`` (Apache-2.0), with MMF UniT's ``.float()`` cast of the predictions.
Changes:
  - ``torch.diag(generalized_box_iou(a, b))`` is computed per pair (``a[i]`` with ``b[i]``)
    instead of as an ``N x N`` matrix whose diagonal is then taken: same values, O(N) memory;
  - ``generalized_box_iou``'s ``assert (boxes[:, 2:] >= boxes[:, :2]).all()`` is dropped: it
    is a host sync, and it made NaN predictions crash training (detr#101) instead of giving a
    NaN loss.  Boxes with negative width or height get whatever the formula gives;
  - areas ``w * h`` are written as a product of the two sides instead of ``.prod(-1)``: the
    same values, and autograd's ``prod`` backward holds a host sync (it counts zeros);
  - both boxes are cast to the compute dtype (float32, or float64 when an input is float64),
    where MMF casts only the predictions.
"""

import torch
import torch.nn.functional as F


def compute_dtype(src_boxes, target_boxes):
    """float64 if either input is float64, else float32 (MMF's ``.float()``)."""
    return torch.promote_types(torch.promote_types(src_boxes.dtype, target_boxes.dtype), torch.float32)


def box_cxcywh_to_xyxy(x):
    """DETR ``util/box_ops.box_cxcywh_to_xyxy``: ``(..., 4)`` cxcywh -> ``(..., 4)`` xyxy."""
    x_c, y_c, w, h = x.unbind(-1)
    b = [(x_c - 0.5 * w), (y_c - 0.5 * h), (x_c + 0.5 * w), (y_c + 0.5 * h)]
    return torch.stack(b, dim=-1)


def paired_generalized_box_iou(boxes1, boxes2):
    """``torch.diag(generalized_box_iou(boxes1, boxes2))`` of DETR, one pair per row.

    Args:
        boxes1, boxes2: ``(N, 4)`` xyxy boxes of one floating dtype.

    Returns:
        ``(N,)`` GIoU of ``boxes1[i]`` with ``boxes2[i]``, in ``[-1, 1]`` for proper boxes.
        NaN where the union is 0 (both boxes have zero area: ``0 / 0``).
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])  # [N]
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])  # [N]
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])  # [N, 2]
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])  # [N, 2]
    wh = (rb - lt).clamp(min=0)  # [N, 2]
    inter = wh[:, 0] * wh[:, 1]  # [N]
    union = area1 + area2 - inter
    iou = inter / union
    lt = torch.min(boxes1[:, :2], boxes2[:, :2])  # [N, 2]
    rb = torch.max(boxes1[:, 2:], boxes2[:, 2:])  # [N, 2]
    wh = (rb - lt).clamp(min=0)  # [N, 2]
    area = wh[:, 0] * wh[:, 1]  # [N]: the smallest enclosing box
    return iou - (area - union) / area


def box_loss_ref(src_boxes, target_boxes, num_boxes):
    """DETR/MMF ``SetCriterion.loss_boxes`` on already matched pairs.

    Args:
        src_boxes: ``(N, 4)`` predicted boxes, cxcywh (normalised to the image in DETR), any
            floating dtype, any strides.
        target_boxes: ``(N, 4)`` matched target boxes, cxcywh.
        num_boxes: python number or 0-d tensor: the (all-reduced) number of target boxes the
            sums are divided by.  A tensor is divided by on the device, never read on the host.

    Returns:
        ``(loss_bbox, loss_giou)``, 0-d tensors of the compute dtype (float32, or float64 when
        an input is float64)::

            loss_bbox = sum_i sum_k |src[i, k] - tgt[i, k]| / num_boxes
            loss_giou = sum_i (1 - GIoU(xyxy(src[i]), xyxy(tgt[i]))) / num_boxes

        ``N = 0`` gives two zeros.  NaN anywhere in a pair makes both losses NaN (nothing is
        checked).  A pair of two zero-area boxes (identical or not) has union 0, so its GIoU is
        ``0 / 0`` = NaN and ``loss_giou`` is NaN; a zero-area box against a proper box is fine.
        Differentiable in both inputs.
    """
    dtype = compute_dtype(src_boxes, target_boxes)
    src, tgt = src_boxes.to(dtype), target_boxes.to(dtype)
    loss_bbox = F.l1_loss(src, tgt, reduction="none")  # [N, 4]
    loss_giou = 1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))  # [N]
    return loss_bbox.sum() / num_boxes, loss_giou.sum() / num_boxes
