"""What every patched ``transformers`` matcher shares: padded targets, one batched exact solve on
the cost's device, and the index lists in scipy's order.

``transformers``' matchers build the cost over ``[B*Q, sum T]`` (every query against every image's
targets), copy it to the host and loop ``scipy.optimize.linear_sum_assignment`` over the images.
Here the cost is ``(B, Q, T_max)`` -- each image only against its own targets -- and every image
(and every query group, LW-DETR's ``group_detr``) is one problem of a single
``batched_linear_sum_assignment`` call; the indices stay on the device, so a CUDA step never
waits for the host (the target counts are tensor shapes, known on the host without a sync).
"""

import numpy as np
import torch

from unit_fast.nn.hungarian_matcher import _prefix_positions as prefix_positions
from unit_fast.ops.hungarian_match import batched_linear_sum_assignment, to_device

# transformers replaces NaN / +-inf costs by the dtype's max ("matched only if nothing else
# is valid").  float32's max overflows a float32 dual update to inf, so such costs take this
# instead: far above any real cost, and finite in float32 sums of a few thousand terms.
BIG = 1e30


def padded_targets(targets, device, label_key="class_labels"):
    """Targets as padded tensors, from one concatenation and one scatter.

    Args:
        targets: list of B dicts with ``label_key`` ``(T_b,)`` int64 and ``"boxes"`` ``(T_b, 4)``.
        device: where the tensors go (the predictions' device).

    Returns:
        ``labels (B, T)`` int64 (0 in padding), ``boxes (B, T, 4)`` (0.5 in padding: a valid
        box, so no NaN arises there), ``sizes`` (B host ints), ``T = max(sizes, default=0)``.
    """
    sizes = [int(t["boxes"].shape[0]) for t in targets]
    B, T = len(sizes), max(sizes, default=0)
    slot = to_device(prefix_positions(sizes, T), device)  # (sum T,)
    labels = torch.cat([t[label_key] for t in targets]).to(device, torch.long)
    labels = labels.new_zeros(B * T).index_copy_(0, slot, labels).view(B, T)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device)
    boxes = boxes.new_full((B * T, 4), 0.5).index_copy_(0, slot, boxes).view(B, T, 4)
    return labels, boxes, sizes


def blocks_to_padded(cost, sizes):
    """``(B, Q, sum T)`` -- transformers' layout, image ``b``'s columns at its offset -- to
    ``(B, Q, T_max)``: image ``b``'s own block, left-aligned (columns past ``sizes[b]`` are
    arbitrary: the solver never reads them)."""
    B, Q, _ = cost.shape
    T = max(sizes, default=0)
    if T == 0:
        return cost.new_zeros(B, Q, 0)
    offsets = np.cumsum([0, *sizes[:-1]])
    cols = np.minimum(offsets[:, None] + np.arange(T)[None, :], max(sum(sizes) - 1, 0))  # (B, T)
    index = to_device(torch.from_numpy(cols.astype(np.int64)), cost.device)
    return cost.gather(2, index[:, None, :].expand(B, Q, T))


def solve(cost, sizes, groups=1, backend=None):
    """One exact assignment per image (and per query group), in one call, on ``cost.device``.

    Args:
        cost: ``(B, Q, T)`` float; row ``q`` of image ``b`` against its own targets
            ``0 .. sizes[b] - 1`` (columns beyond are ignored).  NaN / +-inf entries count as
            ``BIG`` (transformers' ``nan_to_num`` to the max, in a form float32 can add).
        sizes: B host ints, the target counts.
        groups: split the Q queries into this many consecutive groups of ``Q // groups``, each
            matched to all of the image's targets on its own (LW-DETR / RF-DETR ``group_detr``).
        backend: force the solver backend (``"cpp"`` or ``"reference"``).

    Returns:
        list of B ``(pred_idx, tgt_idx)`` int64 tensors on ``cost.device``, as transformers
        returns them: per group, the assigned queries ascending with their targets; groups
        concatenated in order, group ``g``'s query indices offset by ``g * Q // groups``.
    """
    B, Q, T = cost.shape
    if Q % groups:
        raise ValueError(f"{Q} queries do not split into group_detr={groups} equal groups")
    Qg = Q // groups
    cost = torch.nan_to_num(cost.detach(), nan=BIG, posinf=BIG, neginf=BIG)
    cost = cost.view(B * groups, Qg, T)  # problem b * groups + g: a view, no copy
    num_cols = [s for s in sizes for _ in range(groups)]
    assign = batched_linear_sum_assignment(cost, num_cols if T else None, backend=backend)  # (P, Qg)
    # Assigned rows first, ascending: a stable sort keeps every shape static (no nonzero()).
    order = torch.argsort((assign < 0).to(torch.uint8), dim=1, stable=True)  # (P, Qg)
    tgt = assign.gather(1, order)
    offset = (torch.arange(groups, device=cost.device) * Qg).repeat(B)  # (P,)
    pred = order + offset[:, None]
    counts = [min(Qg, s) for s in num_cols]
    keep = to_device(prefix_positions(counts, Qg), cost.device)
    per_image = [groups * min(Qg, s) for s in sizes]
    return list(zip(pred.flatten()[keep].split(per_image), tgt.flatten()[keep].split(per_image), strict=True))

