"""Matchers and box loss of ``transformers``' DETR, Deformable DETR and Grounding DINO losses.

Each ``*_matcher_forward`` reproduces one ``transformers`` matcher's cost, but per image against
its own targets, ``(B, Q, T_max)`` instead of ``(B*Q, sum T)``, then solves every image in one
``matching.solve`` call on the predictions' device (no ``.cpu()``, no scipy, no host sync).

- ``HungarianMatcher`` (``loss_for_object_detection``): DETR's softmax / L1 / GIoU cost is the
  fused ``unit_fast.ops.matching_cost`` kernel as it stands.
- ``DeformableDetrHungarianMatcher``: L1 + GIoU from the same kernel (class weight 0), plus the
  focal class cost (alpha 0.25, gamma 2) in torch on the ``(B, Q, T)`` logits gathered at the
  targets' labels (``transformers`` evaluates it on all ``(B*Q, C)`` and then indexes).
- ``GroundingDinoHungarianMatcher``: L1 + GIoU from the kernel, plus the focal cost against the
  targets' normalised label maps as one ``bmm`` per batch: ``(B, Q, L) @ (B, L, T)``.

What differs from ``transformers``: the L1 + GIoU part is computed in float32 (``transformers``:
the logits' dtype); terms are summed in another order (last-bit differences); indices come back
on the predictions' device (``transformers``: CPU); degenerate boxes are not rejected (its
``generalized_box_iou`` raises, a host sync); NaN / inf costs are matched last, as transformers
>= 5.18 does with ``nan_to_num``, where 5.17's scipy call raises instead.
"""

import torch

from unit_fast.ops.hungarian_match import to_device
from unit_fast.ops.matching_cost import matching_cost
from unit_fast.patch.hf.boxes import loss_boxes
from unit_fast.patch.hf.matching import padded_targets, prefix_positions, solve
from unit_fast.patch.transformers import Patch

# DeformableDetrHungarianMatcher / GroundingDinoHungarianMatcher hard-code these.
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


def _box_cost(self, outputs, labels, boxes, sizes):
    """``bbox_cost * L1 + giou_cost * (-GIoU)``, float32 ``(B, Q, T)``, from the fused kernel.

    Its class term is switched off with weight 0 and all-zero labels: a label outside the
    kernel's class range would put NaN in a column (``0 * NaN`` is NaN), and Grounding DINO's
    labels index label maps, not logits.  ``-0.0`` added to a cost leaves it unchanged.
    """
    logits = outputs["logits"]
    num_targets = to_device(sizes, logits.device)  # (B,): a pinned async copy, no sync
    return matching_cost(logits, outputs["pred_boxes"], torch.zeros_like(labels), boxes, num_targets,
                         0.0, self.bbox_cost, self.giou_cost)  # (B, Q, T)


def _focal_cost(prob):
    """``pos - neg`` focal class cost of sigmoid probabilities, elementwise (transformers' form)."""
    neg = (1 - FOCAL_ALPHA) * (prob**FOCAL_GAMMA) * (-(1 - prob + 1e-8).log())
    pos = FOCAL_ALPHA * ((1 - prob) ** FOCAL_GAMMA) * (-(prob + 1e-8).log())
    return pos - neg


@torch.no_grad()
def hungarian_matcher_forward(self, outputs, targets):
    """Drop-in for ``HungarianMatcher.forward`` (DETR): same arguments, same index lists.

    ``outputs["logits"]`` ``(B, Q, C+1)``, ``outputs["pred_boxes"]`` ``(B, Q, 4)`` cxcywh;
    ``targets`` B dicts with ``"class_labels"`` ``(T_b,)`` and ``"boxes"`` ``(T_b, 4)``.
    Returns B ``(pred_idx, tgt_idx)`` int64 pairs on the logits' device, scipy's order.
    """
    logits = outputs["logits"]
    labels, boxes, sizes = padded_targets(targets, logits.device)  # (B, T), (B, T, 4)
    num_targets = to_device(sizes, logits.device)
    cost = matching_cost(logits, outputs["pred_boxes"], labels, boxes, num_targets,
                         self.class_cost, self.bbox_cost, self.giou_cost)  # (B, Q, T)
    return solve(cost, sizes)


@torch.no_grad()
def deformable_detr_matcher_forward(self, outputs, targets):
    """Drop-in for ``DeformableDetrHungarianMatcher.forward`` (Deformable / Conditional / DAB-DETR).

    ``outputs["logits"]`` ``(B, Q, C)`` sigmoid logits (no no-object class), ``"pred_boxes"``
    ``(B, Q, 4)``.  Returns as ``hungarian_matcher_forward``.
    """
    logits = outputs["logits"]
    labels, boxes, sizes = padded_targets(targets, logits.device)  # (B, T), (B, T, 4)
    B, Q, T = *logits.shape[:2], labels.shape[1]
    # Sigmoid and the focal terms are elementwise: gathering the logits first gives the same
    # values as transformers' out_prob[:, target_ids], at T instead of C columns.
    prob = logits.gather(2, labels[:, None, :].expand(B, Q, T)).sigmoid()  # (B, Q, T)
    cost = _box_cost(self, outputs, labels, boxes, sizes) + self.class_cost * _focal_cost(prob).float()
    return solve(cost, sizes)


@torch.no_grad()
def grounding_dino_matcher_forward(self, outputs, targets):
    """Drop-in for ``GroundingDinoHungarianMatcher.forward`` (Grounding DINO, MM Grounding DINO).

    ``outputs["logits"]`` ``(B, Q, L)`` per-token sigmoid logits, ``"pred_boxes"`` ``(B, Q, 4)``,
    ``"label_maps"`` B tensors ``(C_b, L)`` (0/1: the tokens of each of image ``b``'s classes).
    A target's class cost is the focal cost averaged over its class's tokens.
    Returns as ``hungarian_matcher_forward``.
    """
    logits = outputs["logits"]
    labels, boxes, sizes = padded_targets(targets, logits.device)  # (B, T), (B, T, 4)
    B, Q, L = logits.shape
    T = labels.shape[1]
    # float32 at least: transformers' int / int label maps are float32, and half @ float fails.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = torch.cat([m[t["class_labels"]] for m, t in zip(outputs["label_maps"], targets, strict=True)])
    rows = rows / rows.sum(dim=-1, keepdim=True)  # (sum T, L): each class's tokens sum to 1
    slot = to_device(prefix_positions(sizes, T), logits.device)  # (sum T,) flat (b, t) slots
    maps = rows.new_zeros(B * T, L, dtype=dtype).index_copy_(0, slot, rows.to(dtype)).view(B, T, L)
    class_cost = torch.bmm(_focal_cost(logits.sigmoid()).to(dtype), maps.transpose(1, 2))  # (B, Q, T)
    cost = _box_cost(self, outputs, labels, boxes, sizes) + self.class_cost * class_cost.float()
    return solve(cost, sizes)


_OD = "transformers.loss.loss_for_object_detection"
_DEF = "transformers.loss.loss_deformable_detr"
_GD = "transformers.loss.loss_grounding_dino"
_DETR = "DETR, DETR segmentation, Table Transformer, YOLOS, Conditional DETR segmentation"
_DEFORMABLE = "Deformable DETR, Conditional DETR, DAB-DETR"
_GROUNDING = "Grounding DINO, MM Grounding DINO"
_BOX_NOTE = "fused box_loss kernel: L1 + GIoU of the N matched pairs, not an N x N GIoU matrix"
_PER_IMAGE = "per-image (B, Q, T) cost on the device, one batched exact solve, no scipy"

PATCHES = [
    Patch(_DETR, _OD, "HungarianMatcher", "forward", hungarian_matcher_forward,
          f"{_PER_IMAGE}; softmax/L1/GIoU cost from the fused matching_cost kernel"),
    Patch(_DETR, _OD, "ImageLoss", "loss_boxes", loss_boxes, _BOX_NOTE),
    Patch(_DEFORMABLE, _DEF, "DeformableDetrHungarianMatcher", "forward", deformable_detr_matcher_forward,
          f"{_PER_IMAGE}; L1/GIoU from matching_cost, focal class cost in torch at the targets' labels"),
    Patch(_DEFORMABLE, _DEF, "DeformableDetrImageLoss", "loss_boxes", loss_boxes, _BOX_NOTE),
    Patch(_GROUNDING, _GD, "GroundingDinoHungarianMatcher", "forward", grounding_dino_matcher_forward,
          f"{_PER_IMAGE}; L1/GIoU from matching_cost, focal cost x normalised label maps as one bmm"),
    Patch(_GROUNDING, _GD, "GroundingDinoImageLoss", "loss_boxes", loss_boxes, _BOX_NOTE),
]
