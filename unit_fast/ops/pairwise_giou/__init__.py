"""Pairwise generalized IoU of xyxy boxes (DETR ``generalized_box_iou``): Triton and C++ CPU
kernels, forward and backward.

Public:
  ``pairwise_giou(boxes1 (N, 4), boxes2 (M, 4), backend=None)`` -> ``(N, M)``
  ``pairwise_giou_ref(boxes1, boxes2)``: the spec
"""

from unit_fast.ops.pairwise_giou.op import pairwise_giou
from unit_fast.ops.pairwise_giou.reference import pairwise_giou_ref

__all__ = ["pairwise_giou", "pairwise_giou_ref"]
