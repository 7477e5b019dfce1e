"""``BoxLoss``: DETR's box loss (L1 + GIoU of matched pairs) as a module over ``unit_fast.ops.box_loss``."""

from torch import nn

from unit_fast.ops.box_loss.op import box_loss

__all__ = ["BoxLoss"]


class BoxLoss(nn.Module):
    """``box_loss`` as a module: ``forward(src_boxes (N, 4), target_boxes (N, 4), num_boxes)``
    -> ``(loss_bbox, loss_giou)`` 0-d tensors, cxcywh boxes (see ``unit_fast.ops.box_loss.box_loss``).

    Args:
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"`` (default: the best available
            for the inputs' device, see ``unit_fast._backend``).
    """

    def __init__(self, backend=None):
        super().__init__()
        self.backend = backend

    def forward(self, src_boxes, target_boxes, num_boxes):
        return box_loss(src_boxes, target_boxes, num_boxes, backend=self.backend)

    def extra_repr(self):
        return f"backend={self.backend!r}"
