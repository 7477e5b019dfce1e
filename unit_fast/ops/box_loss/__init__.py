"""Fused DETR box loss (L1 + GIoU) of matched pairs.

Public:
  ``box_loss(src_boxes, target_boxes, num_boxes, backend=None)`` -> ``(loss_bbox, loss_giou)``
  ``box_loss_ref(src_boxes, target_boxes, num_boxes)``: the spec (DETR ``loss_boxes``)
  ``BoxLoss(backend=None)``: the module, defined in ``unit_fast.nn.box_loss`` (drop-in modules
  live in ``nn/``) and importable from here as before.
"""

from unit_fast.ops.box_loss.op import box_loss
from unit_fast.ops.box_loss.reference import box_loss_ref

__all__ = ["BoxLoss", "box_loss", "box_loss_ref"]


def __getattr__(name):
    # Resolved on first use, not at import: unit_fast.nn imports this package, so importing nn
    # here would be a cycle whenever this package loads first.
    if name == "BoxLoss":
        from unit_fast.nn.box_loss import BoxLoss

        return BoxLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
