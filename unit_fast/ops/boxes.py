"""Box conversions, areas, IoU and generalized IoU in plain PyTorch: the one copy every reference uses.

Derived from facebookresearch/detr ``util/box_ops.py`` (Apache-2.0) and torchvision
``ops/boxes.py::box_area`` (BSD-3-Clause).  Changes:
  - every function broadcasts over leading dimensions (DETR takes ``(N, 4)`` only);
  - ``generalized_box_iou`` does not assert that boxes are well formed (a host sync; the checking
    drop-in is ``unit_fast.box_ops.generalized_box_iou``): any box gets what the formula gives;
  - areas are the product of the two sides, never ``.prod(-1)``: the same values, but autograd's
    ``prod`` backward holds a host sync (it counts zeros);
  - ``paired_generalized_box_iou`` (``torch.diag(generalized_box_iou(a, b))`` in O(N)) is added.

Boxes are ``(..., 4)`` tensors of one floating dtype: ``cxcywh`` is (center x, center y, width,
height), ``xyxy`` is (x0, y0, x1, y1).  Every step runs in the inputs' dtype, as in DETR, and
autograd works through all of it.  These are specs (``ops/<op>/reference.py`` builds on them),
so they stay readable rather than fast; ``unit_fast.ops.pairwise_giou`` is the fast pairwise GIoU.
"""

import torch

__all__ = [
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "paired_generalized_box_iou",
]


def box_cxcywh_to_xyxy(x):
    """``(..., 4)`` cxcywh -> ``(..., 4)`` xyxy: ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)``."""
    x_c, y_c, w, h = x.unbind(-1)
    return torch.stack([(x_c - 0.5 * w), (y_c - 0.5 * h), (x_c + 0.5 * w), (y_c + 0.5 * h)], dim=-1)


def box_xyxy_to_cxcywh(x):
    """``(..., 4)`` xyxy -> ``(..., 4)`` cxcywh: ``((x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0)``."""
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0), (y1 - y0)], dim=-1)


def box_area(boxes):
    """``(..., 4)`` xyxy -> ``(...)`` area ``(x1 - x0) * (y1 - y0)`` (negative for an inverted box)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection_union(boxes1, boxes2):
    """Intersection and union areas of broadcastable xyxy boxes ``(..., 4)`` -> two ``(...)``."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])  # [..., 2]
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])  # [..., 2]
    wh = (rb - lt).clamp(min=0)  # [..., 2]
    inter = wh[..., 0] * wh[..., 1]  # [...]
    return inter, area1 + area2 - inter


def _enclosing_area(boxes1, boxes2):
    """Area of the smallest box enclosing both (the "hull"), broadcastable ``(..., 4)`` -> ``(...)``."""
    lt = torch.min(boxes1[..., :2], boxes2[..., :2])  # [..., 2]
    rb = torch.max(boxes1[..., 2:], boxes2[..., 2:])  # [..., 2]
    wh = (rb - lt).clamp(min=0)  # [..., 2]
    return wh[..., 0] * wh[..., 1]  # [...]


def _pairs(boxes1, boxes2):
    """Views that broadcast every box of ``(..., N, 4)`` against every box of ``(..., M, 4)``."""
    return boxes1[..., :, None, :], boxes2[..., None, :, :]  # [..., N, 1, 4], [..., 1, M, 4]


def box_iou(boxes1, boxes2):
    """IoU of every pair (DETR ``box_iou``).

    Args:
        boxes1: ``(..., N, 4)`` xyxy.  boxes2: ``(..., M, 4)`` xyxy; leading dims broadcast.

    Returns:
        ``(iou, union)``, both ``(..., N, M)``.  A pair with union 0 has IoU NaN (0 / 0).
    """
    inter, union = _intersection_union(*_pairs(boxes1, boxes2))  # [..., N, M]
    return inter / union, union


def paired_generalized_box_iou(boxes1, boxes2):
    """GIoU of matched pairs: ``torch.diag(generalized_box_iou(boxes1, boxes2))`` in O(N) memory.

    Args:
        boxes1, boxes2: broadcastable ``(..., 4)`` xyxy; pair ``i`` is ``boxes1[i]``, ``boxes2[i]``.

    Returns:
        ``(...)`` ``IoU - (hull - union) / hull`` (Rezatofighi et al. 2019), in ``[-1, 1]`` for
        proper boxes, 1 for identical ones.  NaN where the union is 0 (two zero-area boxes:
        ``0 / 0``); a zero-area box against a proper box is fine.
    """
    inter, union = _intersection_union(boxes1, boxes2)
    iou = inter / union
    hull = _enclosing_area(boxes1, boxes2)
    return iou - (hull - union) / hull


def generalized_box_iou(boxes1, boxes2):
    """Generalized IoU (https://giou.stanford.edu/) of every pair (DETR ``generalized_box_iou``).

    Args:
        boxes1: ``(..., N, 4)`` xyxy.  boxes2: ``(..., M, 4)`` xyxy; leading dims broadcast.

    Returns:
        ``(..., N, M)`` GIoU, as ``paired_generalized_box_iou`` of every pair.  Nothing is
        checked (DETR asserts ``x1 >= x0, y1 >= y0``; ``unit_fast.box_ops`` raises instead).
    """
    return paired_generalized_box_iou(*_pairs(boxes1, boxes2))  # [..., N, M]
