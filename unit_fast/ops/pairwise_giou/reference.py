"""Reference (the spec) of ``pairwise_giou``: DETR's ``generalized_box_iou`` on valid boxes."""

import torch


def pairwise_giou_ref(boxes1, boxes2):
    """Generalized IoU of every pair, DETR ``util/box_ops.generalized_box_iou`` without its assert.

    Args:
        boxes1: ``(N, 4)`` xyxy.  boxes2: ``(M, 4)`` xyxy.  Any float dtype; autograd works.

    Returns:
        ``(N, M)`` in the inputs' dtype, GIoU = IoU - (hull - union) / hull in [-1, 1] (Rezatofighi
        et al. 2019); identical boxes give 1.  Zero-area pairs give NaN
        (0 / 0), as in DETR.  Every step runs in the inputs' dtype (DETR does the same).
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])  # [N]
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])  # [M]
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])  # [N, M, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])  # [N, M, 2]
    wh = (rb - lt).clamp(min=0)  # [N, M, 2]
    inter = wh[:, :, 0] * wh[:, :, 1]  # [N, M]
    union = area1[:, None] + area2 - inter  # [N, M]
    # The smallest enclosing box ("hull").
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])  # [N, M, 2]
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])  # [N, M, 2]
    wh = (rb - lt).clamp(min=0)  # [N, M, 2]
    hull = wh[:, :, 0] * wh[:, :, 1]  # [N, M]
    return inter / union - (hull - union) / hull  # [N, M]
