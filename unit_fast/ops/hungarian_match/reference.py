"""Reference (the spec) of ``hungarian_match``: scipy per problem, and DETR's matcher.

``hungarian_match_ref`` is what every kernel of ``unit_fast::hungarian_match`` is tested
against: ``scipy.optimize.linear_sum_assignment`` solved once per problem in a Python loop.
``hungarian_matcher_ref`` is DETR's ``models/matcher.py::HungarianMatcher.forward`` (with
MMF's optional log-softmax and fp32 box cast): the cross-image ``[B*Q, sum T]`` cost,
``torch.cdist(p=1)``, a copy to the CPU and one scipy call per image.  Both are kept plain
and slow on purpose.
"""

import numpy as np
import scipy.optimize
import torch

from unit_fast.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou

# Codes written over a whole problem's row of the result (see csrc/ops/hungarian_match.h).
UNASSIGNED = -1
INVALID = -2  # NaN or -inf among the costs (after the maximize sign flip), or bad num_cols
INFEASIBLE = -3  # no complete assignment of finite cost


def hungarian_match_ref(cost, num_cols=None, maximize=False, scipy_ties=False):
    """Batched linear-sum assignment by a scipy loop.

    Args:
        cost: ``(B, N, M)`` floating tensor, any device.  ``+inf`` forbids a pair.
        num_cols: optional ``(B,)`` int64 tensor: problem ``b`` uses columns ``[0, num_cols[b])``.
        maximize: maximise the total instead.
        scipy_ties: accepted for signature parity with the kernels; scipy always breaks
            ties its own way.

    Returns:
        ``(B, N)`` int64 tensor on ``cost.device``: the column of each row, ``-1`` if the row
        is unassigned, or the whole row set to ``INVALID`` / ``INFEASIBLE``.
    """
    del scipy_ties
    B, N, M = cost.shape
    host = cost.detach().to("cpu", torch.float64).numpy()
    cols = [M] * B if num_cols is None else [int(c) for c in num_cols.cpu()]  # host sync
    out = np.full((B, N), UNASSIGNED, dtype=np.int64)
    for b in range(B):
        if not 0 <= cols[b] <= M:
            out[b] = INVALID
            continue
        try:
            rows, assigned = scipy.optimize.linear_sum_assignment(host[b, :, : cols[b]], maximize=maximize)
        except ValueError as exc:
            out[b] = INFEASIBLE if "infeasible" in str(exc) else INVALID
            continue
        out[b, rows] = assigned
    return torch.from_numpy(out).to(cost.device)


# The old private names: tests/ops/test_matching_cost.py and benchmarks/bench_matching_cost.py
# build DETR's cross-image cost with them.
_box_cxcywh_to_xyxy, _generalized_box_iou = box_cxcywh_to_xyxy, generalized_box_iou


@torch.no_grad()
def hungarian_matcher_ref(outputs, targets, cost_class=1.0, cost_bbox=1.0, cost_giou=1.0, logsoftmax=False):
    """DETR/MMF ``HungarianMatcher.forward``.

    Args:
        outputs: ``{"pred_logits": (B, Q, C+1), "pred_boxes": (B, Q, 4) cxcywh in [0, 1]}``.
        targets: list of B dicts with ``"labels"`` ``(T_i,)`` int64 and ``"boxes"`` ``(T_i, 4)``
            cxcywh.

    Returns:
        list of B ``(pred_idx, tgt_idx)`` int64 CPU tensors of length ``min(Q, T_i)``,
        ``pred_idx`` ascending.
    """
    bs, num_queries = outputs["pred_logits"].shape[:2]
    norm = torch.log_softmax if logsoftmax else torch.softmax
    out_prob = norm(outputs["pred_logits"].flatten(0, 1), -1)  # [B*Q, C+1]
    out_bbox = outputs["pred_boxes"].flatten(0, 1)  # [B*Q, 4]
    tgt_ids = torch.cat([v["labels"] for v in targets])  # [sum T]
    tgt_bbox = torch.cat([v["boxes"] for v in targets])  # [sum T, 4]
    c_class = -out_prob[:, tgt_ids]
    c_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox.float()), box_cxcywh_to_xyxy(tgt_bbox))
    C = cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou
    C = C.view(bs, num_queries, -1).cpu()  # host sync
    sizes = [len(v["boxes"]) for v in targets]
    indices = [scipy.optimize.linear_sum_assignment(c[i]) for i, c in enumerate(C.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
            for i, j in indices]
