"""``loss_boxes`` for every ``transformers`` DETR-family loss class: the fused ``box_loss``.

transformers computes the GIoU term as ``1 - diag(generalized_box_iou(src, tgt))``: an ``N x N``
matrix for its diagonal.  ``box_loss`` computes the ``N`` matched pairs only, in one kernel
(Triton on CUDA, C++ on the CPU), and returns the same two normalised sums.
"""

import torch

from unit_fast.ops.box_loss.op import box_loss


def loss_boxes(self, outputs, targets, indices, num_boxes):
    """Drop-in for ``ImageLoss.loss_boxes`` (and RT-DETR's, LW-DETR's): same arguments, same dict.

    ``outputs["pred_boxes"]`` ``(B, Q, 4)`` cxcywh; ``indices`` B ``(pred_idx, tgt_idx)``;
    ``num_boxes`` a number or 0-d tensor.  Returns ``{"loss_bbox", "loss_giou"}`` 0-d tensors.
    """
    if "pred_boxes" not in outputs:
        raise KeyError("No predicted boxes found in outputs")
    idx = self._get_source_permutation_idx(indices)
    source = outputs["pred_boxes"][idx]  # (N, 4)
    device = source.device
    target = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices, strict=True)])
    loss_bbox, loss_giou = box_loss(source, target.to(device), num_boxes)
    # transformers' sums keep the boxes' dtype; box_loss computes in float32 (MMF's .float()).
    return {"loss_bbox": loss_bbox.to(source.dtype), "loss_giou": loss_giou.to(source.dtype)}
