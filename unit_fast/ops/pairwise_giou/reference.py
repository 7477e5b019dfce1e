"""Reference (the spec) of ``pairwise_giou``: DETR's ``generalized_box_iou`` on valid boxes."""

from unit_fast.ops.boxes import generalized_box_iou


def pairwise_giou_ref(boxes1, boxes2):
    """Generalized IoU of every pair, DETR ``util/box_ops.generalized_box_iou`` without its assert.

    Args:
        boxes1: ``(N, 4)`` xyxy.  boxes2: ``(M, 4)`` xyxy.  Any float dtype; autograd works.

    Returns:
        ``(N, M)`` in the inputs' dtype, GIoU = IoU - (hull - union) / hull in [-1, 1] (Rezatofighi
        et al. 2019); identical boxes give 1.  Zero-area pairs give NaN
        (0 / 0), as in DETR.  Every step runs in the inputs' dtype (DETR does the same).
        The math is ``unit_fast.ops.boxes.generalized_box_iou``, shared with the other references.
    """
    return generalized_box_iou(boxes1, boxes2)  # [N, M]
