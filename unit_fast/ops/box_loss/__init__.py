"""Fused DETR box loss (L1 + GIoU) of matched pairs.

Public:
  ``box_loss(src_boxes, target_boxes, num_boxes, backend=None)`` -> ``(loss_bbox, loss_giou)``
  ``BoxLoss(backend=None)``: the same as a module
  ``box_loss_ref(src_boxes, target_boxes, num_boxes)``: the spec (DETR ``loss_boxes``)
"""

from torch import nn

from unit_fast.ops.box_loss.op import box_loss
from unit_fast.ops.box_loss.reference import box_loss_ref

__all__ = ["BoxLoss", "box_loss", "box_loss_ref"]


class BoxLoss(nn.Module):
    """``box_loss`` as a module: ``forward(src_boxes (N, 4), target_boxes (N, 4), num_boxes)``
    -> ``(loss_bbox, loss_giou)`` 0-d tensors, cxcywh boxes (see ``box_loss``)."""

    def __init__(self, backend=None):
        super().__init__()
        self.backend = backend

    def forward(self, src_boxes, target_boxes, num_boxes):
        return box_loss(src_boxes, target_boxes, num_boxes, backend=self.backend)

    def extra_repr(self):
        return f"backend={self.backend!r}"
