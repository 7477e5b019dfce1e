"""Drop-in for DETR's ``util/box_ops.py`` and MMF's ``mmf/utils/box_ops.py``.

Same names, signatures and results.  Boxes are ``(..., 4)`` tensors: ``cxcywh`` is
(center x, center y, width, height), ``xyxy`` is (x0, y0, x1, y1); any float dtype.

Differences from the reference, all deliberate:
- Where DETR asserts that boxes are well formed (``generalized_box_iou``), these raise a
  ``ValueError`` naming the first bad box -- inverted (x1 < x0 or y1 < y0) or non-finite.  The
  check reads the boxes on the host, a sync exactly where DETR's assert is one; the fused
  training-path ops (``matching_cost``, ``box_loss``) check nothing and never sync.
- ``generalized_box_iou_loss`` (matched pairs, torchvision semantics) and ``matching_cost``
  (the matcher's per-image cost, ``unit_fast.ops.matching_cost``) are additions.
- ``masks_to_boxes`` is torchvision's (``torchvision.ops.masks_to_boxes``), which DETR's
  panoptic code imports from its ``box_ops``; it differs from DETR's own only on an all-zero mask,
  whose box is ``[0, 0, 0, 0]`` where DETR's gives ``[1e8, 1e8, 0, 0]``.
- ``generalized_box_iou`` runs ``unit_fast.ops.pairwise_giou``: Triton on CUDA, the reference
  composition on CPU (``UNIT_FAST_BACKEND`` overrides).

The conversions, ``box_area`` and ``box_iou`` are ``unit_fast.ops.boxes``, the one plain-torch copy
of DETR's box math that every op reference also uses (``box_area`` is torchvision's, which DETR's
module imports).
"""

import torch
import torchvision

from unit_fast.ops.boxes import box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh
from unit_fast.ops.matching_cost import matching_cost
from unit_fast.ops.pairwise_giou import pairwise_giou

__all__ = [
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "generalized_box_iou_loss",
    "masks_to_boxes",
    "matching_cost",
]


def _check_boxes(boxes, name):
    """ValueError naming the first non-finite or inverted xyxy box (a host sync, as DETR's assert)."""
    if boxes.numel() == 0 or boxes.dim() != 2 or boxes.shape[1] != 4:
        return  # empty: nothing to check; a wrong shape: pairwise_giou raises the ValueError
    bad = ~torch.isfinite(boxes).all(-1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bool(bad.any()):  # host sync
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name}[{i}] = {boxes[i].tolist()} is not a valid xyxy box: need finite values with "
            "x1 >= x0 and y1 >= y0"
        )


def generalized_box_iou(boxes1, boxes2):
    """Generalized IoU (https://giou.stanford.edu/) of every pair.

    Args:
        boxes1: ``(N, 4)`` xyxy.  boxes2: ``(M, 4)`` xyxy.

    Returns:
        ``(N, M)`` GIoU in [-1, 1], differentiable (``unit_fast.ops.pairwise_giou``: one Triton
        tile pass on CUDA).  Degenerate boxes give NaN as in DETR (0 / 0).

    Raises:
        ValueError: naming the first inverted (x1 < x0 or y1 < y0) or non-finite box, with its
            index and values (DETR asserts instead).  The check is a host-device sync, exactly
            where DETR's ``assert (boxes1[:, 2:] >= boxes1[:, :2]).all()`` is one; code that must
            not sync calls ``unit_fast.ops.pairwise_giou.pairwise_giou``, which checks nothing.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    return pairwise_giou(boxes1, boxes2)  # Triton on CUDA, the reference composition on CPU


def generalized_box_iou_loss(boxes1, boxes2, reduction="none", eps=1e-7):
    """``1 - GIoU`` of matched pairs, as ``torchvision.ops.generalized_box_iou_loss``.

    Args:
        boxes1, boxes2: ``(..., 4)`` xyxy, same shape (pair i is ``boxes1[i]``, ``boxes2[i]``).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        eps: added to the union and enclosing areas, as torchvision does.

    Returns:
        ``(...)`` loss per pair for ``"none"``, else a scalar; an empty input gives an empty
        loss, or 0 for ``"mean"`` and ``"sum"`` (torchvision's ``0.0 * loss.sum()``, not NaN).
        Plain torch composition (autograd works); like torchvision it checks no box and never
        syncs.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if boxes1.shape != boxes2.shape or boxes1.shape[-1:] != (4,):
        raise ValueError(f"expected two (..., 4) tensors of one shape, got {tuple(boxes1.shape)} and "
                         f"{tuple(boxes2.shape)}")
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    xi1, yi1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xi2, yi2 = torch.min(x2, x2g), torch.min(y2, y2g)
    inter = torch.where((xi2 > xi1) & (yi2 > yi1), (xi2 - xi1) * (yi2 - yi1), torch.zeros_like(x1))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    hull = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    loss = 1 - (iou - (hull - union) / (hull + eps))
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


def masks_to_boxes(masks):
    """The xyxy box around each mask: ``torchvision.ops.masks_to_boxes``, as DETR's ``box_ops`` offers it.

    Args:
        masks: ``(N, H, W)``, any dtype (non-zero = inside).

    Returns:
        ``(N, 4)`` float32 ``x0, y0, x1, y1`` in pixels (inclusive, as DETR's); ``(0, 4)`` for
        ``N = 0``; ``[0, 0, 0, 0]`` for an all-zero mask (DETR's own gives ``[1e8, 1e8, 0, 0]``).
    """
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks_to_boxes: masks must be an (N, H, W) tensor, got {shape}")
    return torchvision.ops.masks_to_boxes(masks)
