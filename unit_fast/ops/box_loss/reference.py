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
The box conversion and the paired GIoU are ``unit_fast.ops.boxes``, shared by every reference.
"""

import torch
import torch.nn.functional as F

from unit_fast.ops.boxes import box_cxcywh_to_xyxy, paired_generalized_box_iou


def compute_dtype(src_boxes, target_boxes):
    """float64 if either input is float64, else float32 (MMF's ``.float()``)."""
    return torch.promote_types(torch.promote_types(src_boxes.dtype, target_boxes.dtype), torch.float32)


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
