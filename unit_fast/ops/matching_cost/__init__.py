"""The DETR/MMF Hungarian matcher's cost, per image, in one pass (Triton, or the C++ CPU kernel).

Public:
  ``matching_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, cost_class,
  cost_bbox, cost_giou, logsoftmax=False, backend=None)`` -> float32 ``([L,] B, Q, T)``
  ``matching_cost_ref(...)``: the plain-torch spec, same arguments (no ``backend``).
"""

from unit_fast.ops.matching_cost.op import matching_cost
from unit_fast.ops.matching_cost.reference import matching_cost_ref

__all__ = ["matching_cost", "matching_cost_ref"]
