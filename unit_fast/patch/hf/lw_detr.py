"""LW-DETR's and RF-DETR's matchers and box loss (``transformers/loss/loss_lw_detr.py``,
``loss_rf_detr.py``): focal class cost, query groups (``group_detr``), RF-DETR's mask costs.

Derived from ``LwDetrHungarianMatcher.forward`` and ``RfDetrHungarianMatcher.forward``
(transformers 5.24, Apache-2.0).  Changes:
  - the cost is ``(B, Q, T_max)``, each image against its own targets, instead of
    ``(B*Q, sum T)``; the box and class terms are the same elementwise formulas in the same
    dtypes (``cdist`` in float32, as transformers), so they equal the original's block;
  - all ``group_detr`` groups of all images are one batched solve on the device
    (``matching.solve``), in LW-DETR's concatenated index order; nothing goes to the host;
  - ``generalized_box_iou``'s well-formed-box check is dropped (a host sync);
  - RF-DETR's mask costs sample the same random points (one ``torch.rand`` of the same shape,
    so the RNG stream stays the same as unpatched) and take each image's masks as channels of
    one ``grid_sample``; the pairwise sums are batched matmuls (equal up to summation order).
RF-DETR detection uses LW-DETR's loss (``LOSS_MAPPING``); RF-DETR segmentation uses
``RfDetrHungarianMatcher`` and inherits ``LwDetrImageLoss.loss_boxes``.  Its ``loss_masks``
(uncertainty-sampled points) is left as transformers has it.
"""

import torch

from unit_fast.ops.hungarian_match import to_device
from unit_fast.patch.hf.boxes import loss_boxes
from unit_fast.patch.hf.matching import padded_targets, prefix_positions, solve
from unit_fast.patch.hf.rt_detr import _corners, focal_cost, gather_classes, hf_generalized_box_iou
from unit_fast.patch.transformers import Patch

# transformers hard-codes these in both matchers (the loss's focal_alpha is separate).
_ALPHA, _GAMMA = 0.25, 2.0


def lw_detr_cost(self, outputs, targets, giou_in_float32=True):
    """The box and class cost of ``LwDetrHungarianMatcher`` (and RF-DETR's), per image.

    Args:
        outputs: ``"logits"`` ``(B, Q, C)``, ``"pred_boxes"`` ``(B, Q, 4)`` cxcywh.
        targets: B dicts, ``"class_labels"`` ``(T_b,)``, ``"boxes"`` ``(T_b, 4)`` cxcywh.

    Returns:
        ``cost (B, Q, T_max)`` (columns past ``sizes[b]`` are padding), ``sizes`` (host ints).
        Sigmoid focal class cost (alpha 0.25, gamma 2), L1 in float32 cast back to the boxes'
        dtype, minus GIoU of the float32 boxes (LW-DETR, ``giou_in_float32``) or in the boxes'
        dtype (RF-DETR segmentation, which does not reassign them), weighted by ``class_cost``, ``bbox_cost``,
        ``giou_cost``.
    """
    logits, boxes = outputs["logits"], outputs["pred_boxes"]  # (B, Q, C), (B, Q, 4)
    labels, tgt_boxes, sizes = padded_targets(targets, logits.device)  # (B, T), (B, T, 4)
    class_cost = focal_cost(gather_classes(logits.sigmoid(), labels), _ALPHA, _GAMMA)  # (B, Q, T)
    # cdist only supports float32 (transformers' comment); the cost goes back to the boxes' dtype.
    bbox_cost = torch.cdist(boxes.float(), tgt_boxes.float(), p=1).to(boxes.dtype)  # (B, Q, T)
    giou_dtype = torch.float32 if giou_in_float32 else boxes.dtype
    giou_cost = -hf_generalized_box_iou(_corners(boxes.to(giou_dtype)), _corners(tgt_boxes.to(giou_dtype)))
    cost = self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost
    return cost, sizes


def rf_detr_mask_cost(self, outputs, targets, sizes):
    """RF-DETR's point-sampled mask costs, per image: sigmoid CE + dice, ``(B, Q, T_max)``.

    ``outputs["pred_masks"]`` ``(B, Q, H, W)`` logits; ``targets[b]["masks"]`` ``(T_b, h, w)``
    (one size for all images, as transformers' ``torch.cat`` needs).  The points are one
    ``torch.rand(1, P, 2)`` with ``P = (B*Q) * 4 // mask_point_sample_ratio``: transformers takes
    ``height, width = out_bbox.shape[:2]``, i.e. ``(B*Q, 4)``; kept so the point count and
    the RNG stream match the unpatched loss.  Weighted by ``cost_mask_class``, ``cost_mask_dice``.
    """
    masks = outputs["pred_masks"]  # (B, Q, H, W)
    B, Q = masks.shape[:2]
    num_points = B * Q * 4 // self.mask_point_sample_ratio
    points = torch.rand(1, num_points, 2, device=masks.device)  # (1, P, 2) in [0, 1]^2
    grid = (2.0 * points - 1.0)[:, :, None, :]  # (1, P, 1, 2): grid_sample's [-1, 1]
    # Queries (and targets) as channels: one bilinear / nearest sample per channel, the same
    # arithmetic as transformers' per-mask batch, without repeating the grid B*Q times.
    pred = torch.nn.functional.grid_sample(masks, grid.expand(B, -1, -1, -1), align_corners=False)
    pred = pred[..., 0]  # (B, Q, P)
    T = max(sizes, default=0)
    if T == 0:  # no target anywhere: nothing to sample (the points are drawn all the same)
        return pred.new_zeros(B, Q, 0)
    tgt = torch.cat([t["masks"] for t in targets]).to(device=masks.device, dtype=masks.dtype)  # (sum T, h, w)
    tgt = torch.nn.functional.grid_sample(tgt[None], grid, mode="nearest", align_corners=False)[0, :, :, 0]
    slot = to_device(prefix_positions(sizes, T), masks.device)  # (sum T,)
    tgt = tgt.new_zeros(B * T, num_points).index_copy_(0, slot, tgt).view(B, T, num_points)  # (B, T, P)
    tgt_t = tgt.transpose(1, 2)  # (B, P, T)

    # pair_wise_sigmoid_cross_entropy_loss: BCE-with-logits against 1 and 0, averaged over points.
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    pos = bce(pred, torch.ones_like(pred), reduction="none") / num_points  # (B, Q, P)
    neg = bce(pred, torch.zeros_like(pred), reduction="none") / num_points
    cost_ce = torch.matmul(pos, tgt_t) + torch.matmul(neg, 1 - tgt_t)  # (B, Q, T)
    # pair_wise_dice_loss.
    prob = pred.sigmoid()
    numerator = 2 * torch.matmul(prob, tgt_t)  # (B, Q, T)
    denominator = prob.sum(-1)[:, :, None] + tgt.sum(-1)[:, None, :]
    cost_dice = 1 - (numerator + 1) / (denominator + 1)
    return self.cost_mask_class * cost_ce + self.cost_mask_dice * cost_dice


@torch.no_grad()
def lw_detr_matcher_forward(self, outputs, targets, group_detr):
    """Drop-in for ``LwDetrHungarianMatcher.forward``: same arguments and result (B
    ``(pred_idx, tgt_idx)`` int64 pairs, groups concatenated with their query offsets), on the
    predictions' device, all images x groups in one solve."""
    cost, sizes = lw_detr_cost(self, outputs, targets)
    return _solve_groups(cost, sizes, group_detr)


@torch.no_grad()
def rf_detr_matcher_forward(self, outputs, targets, group_detr):
    """Drop-in for ``RfDetrHungarianMatcher.forward`` (segmentation): LW-DETR's cost plus the
    point-sampled mask costs, then one batched solve over images x groups."""
    cost, sizes = lw_detr_cost(self, outputs, targets, giou_in_float32=False)
    cost = cost + rf_detr_mask_cost(self, outputs, targets, sizes)
    return _solve_groups(cost, sizes, group_detr)


def _solve_groups(cost, sizes, group_detr):
    """``solve`` with ``group_detr`` groups of ``Q // group_detr`` queries.  transformers splits
    by that size and loops over the first ``group_detr`` chunks, so a remainder is never
    matched: it is dropped here too."""
    Q = cost.shape[1]
    return solve(cost[:, : Q - Q % group_detr], sizes, groups=group_detr)


_NOTE = (
    "sigmoid focal class cost (alpha 0.25, gamma 2) + float32 L1 + GIoU in torch on the device, "
    "per image (B, Q, T_max); all images x group_detr groups in one batched solve"
)

PATCHES = [
    Patch(
        family="LW-DETR, RF-DETR",
        module="transformers.loss.loss_lw_detr",
        owner="LwDetrHungarianMatcher",
        attribute="forward",
        replacement=lw_detr_matcher_forward,
        note=_NOTE,
    ),
    Patch(
        family="RF-DETR segmentation",
        module="transformers.loss.loss_rf_detr",
        owner="RfDetrHungarianMatcher",
        attribute="forward",
        replacement=rf_detr_matcher_forward,
        note=_NOTE + "; plus point-sampled mask sigmoid-CE + dice costs (same random points)",
    ),
    Patch(
        family="LW-DETR, RF-DETR, RF-DETR segmentation",
        module="transformers.loss.loss_lw_detr",
        owner="LwDetrImageLoss",
        attribute="loss_boxes",
        replacement=loss_boxes,
        note="fused L1 + GIoU of the matched pairs; RF-DETR's loss_masks stays transformers'",
    ),
]
