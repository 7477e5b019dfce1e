"""``HungarianMatcher``: a drop-in for DETR's and MMF's matcher, solved in one batched call.

The module is built on two ops: ``unit_fast.ops.matching_cost`` (the per-image cost) and
``unit_fast.ops.hungarian_match`` (the batched exact solver).  The old path
``unit_fast.ops.hungarian_match.matcher`` is this same module object.
"""

import numpy as np
import torch
from torch import nn

from unit_fast.ops.hungarian_match import INFEASIBLE, INVALID, batched_linear_sum_assignment, to_device
from unit_fast.ops.matching_cost import matching_cost

# Padding target box (cxcywh).  The cost's padding columns are +inf whatever it holds (and the
# solver never reads them: num_cols); a valid box keeps the reference's GIoU there NaN-free.
_PAD_BOX = 0.5


class HungarianMatcher(nn.Module):
    """Optimal bipartite matching between predictions and targets (DETR ``models/matcher.py``).

    Same constructor, forward contract and output as DETR's and MMF's ``HungarianMatcher``;
    the cost is built per image as ``(B, Q, max T)`` and every image -- and, through
    ``match_all``, every decoder layer -- is solved in one ``batched_linear_sum_assignment``
    call on the input's device.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the class, L1 box and GIoU costs.
        logsoftmax: MMF's ``use_bcl`` option: log-softmax class cost instead of softmax.
        keep_on_device: return the indices on the predictions' device instead of the CPU
            (DETR returns CPU tensors), so a CUDA training step never waits for the host.
            Then nothing is checked: an image whose cost holds NaN/-inf gets
            ``tgt_idx`` entries equal to ``unit_fast.INVALID`` (-2).
        backend: force the solver backend (``"cpp"`` or ``"reference"``).  ``"reference"`` also
            builds the cost with the torch composition (scipy + torch: MMF's numerics, no
            unit_fast kernel); otherwise the cost takes its op's default backend.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1,
                 logsoftmax: bool = False, *, keep_on_device: bool = False, backend=None):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs can't be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.logsoftmax = logsoftmax
        # MMF keeps the normalisation as a module attribute; kept for attribute parity.
        self.norm = nn.LogSoftmax(dim=-1) if logsoftmax else nn.Softmax(dim=-1)
        self.keep_on_device = keep_on_device
        self.backend = backend

    def extra_repr(self):
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"logsoftmax={self.logsoftmax}, keep_on_device={self.keep_on_device}")

    @torch.no_grad()
    def forward(self, outputs, targets):
        """Matches the final decoder layer.

        Args:
            outputs: dict with ``"pred_logits"`` ``(B, Q, C+1)`` and ``"pred_boxes"``
                ``(B, Q, 4)`` (normalised cxcywh).
            targets: list of B dicts with ``"labels"`` ``(T_i,)`` int64 and ``"boxes"``
                ``(T_i, 4)`` cxcywh.

        Returns:
            list of B tuples ``(pred_idx, tgt_idx)``, int64, length ``min(Q, T_i)``,
            ``pred_idx`` ascending.
        """
        return self._match([outputs], targets)[0]

    @torch.no_grad()
    def match_all(self, outputs, targets):
        """Matches the main output and every ``outputs["aux_outputs"][i]`` in one solve.

        Returns:
            list over layers -- ``[main, aux 0, aux 1, ...]`` -- of ``forward``'s result.
        """
        return self._match([outputs, *outputs.get("aux_outputs", [])], targets)

    def _match(self, layers, targets):
        L = len(layers)
        logits = torch.stack([o["pred_logits"] for o in layers])  # [L, B, Q, C+1]
        boxes = torch.stack([o["pred_boxes"] for o in layers])  # [L, B, Q, 4]
        _, B, Q, _ = logits.shape
        if len(targets) != B:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {B} predictions")
        device = logits.device
        sizes = [int(t["labels"].shape[0]) for t in targets]
        T = max(sizes, default=0)
        # Padded targets [B, T] from one concatenation and one scatter, with slots
        # computed on the host: pad_sequence would launch a copy per image.
        slot = to_device(_prefix_positions(sizes, T), device)  # [sum T]
        labels = torch.cat([t["labels"] for t in targets]).to(device)  # [sum T]
        labels = labels.new_zeros(B * T).index_copy_(0, slot, labels).view(B, T)
        tboxes = torch.cat([t["boxes"] for t in targets]).to(device)  # [sum T, 4]
        tboxes = tboxes.new_full((B * T, 4), _PAD_BOX).index_copy_(0, slot, tboxes).view(B, T, 4)
        num_targets = to_device(sizes, device)  # [B]
        cost = matching_cost(
            logits, boxes,  # [L, B, Q, C+1], [L, B, Q, 4]
            labels, tboxes, num_targets,  # [B, T], [B, T, 4], [B]
            self.cost_class, self.cost_bbox, self.cost_giou, self.logsoftmax,
            backend="reference" if self.backend == "reference" else None,
        ).flatten(0, 1)  # [L*B, Q, T]; padding columns are +inf, never read (num_cols)
        num_cols = num_targets.repeat(L) if T else None  # [L*B]
        assign = batched_linear_sum_assignment(cost, num_cols, backend=self.backend)  # [L*B, Q]
        # Assigned rows first, in ascending order: a stable sort keeps every shape static.
        order = torch.argsort((assign < 0).to(torch.uint8), dim=1, stable=True)  # [L*B, Q]
        tgt = assign.gather(1, order)  # [L*B, Q]
        if not self.keep_on_device:
            order, tgt = order.cpu(), tgt.cpu()  # host sync: DETR returns CPU indices
            if not torch.compiler.is_compiling():
                _check(tgt, sizes, Q)
        counts = [min(Q, s) for s in sizes] * L  # matches per (layer, image)
        if torch.compiler.is_compiling():
            pairs = [(order[r, :k], tgt[r, :k]) for r, k in enumerate(counts)]
        else:
            # One gather and one split instead of 2 * L * B Python slices (~1 ms at L*B = 384).
            keep = to_device(_prefix_positions(counts, Q), order.device)  # [sum counts]
            pairs = list(zip(order.flatten()[keep].split(counts), tgt.flatten()[keep].split(counts),
                             strict=True))
        return [pairs[layer * B : (layer + 1) * B] for layer in range(L)]


def _prefix_positions(lengths, width):
    """Flat positions ``r * width + j`` for ``j < lengths[r]``, as host int64 ``(sum lengths,)``."""
    if torch.compiler.is_compiling():
        positions = [r * width + j for r, n in enumerate(lengths) for j in range(n)]
        return torch.tensor(positions, dtype=torch.long)
    n = np.asarray(lengths, dtype=np.int64)
    starts = np.repeat(np.arange(len(n), dtype=np.int64) * width - (np.cumsum(n) - n), n)
    return torch.from_numpy(starts + np.arange(int(n.sum()), dtype=np.int64))


def _check(tgt, sizes, Q):
    """Raises scipy's errors for images whose cost was invalid or infeasible (codes fill a row)."""
    if Q == 0:
        return
    for r, code in enumerate(tgt[:, 0].tolist()):
        image = r % len(sizes)
        if sizes[image] and code == INVALID:
            raise ValueError(f"matching cost of image {image} contains invalid numeric entries (NaN/-inf)")
        if sizes[image] and code == INFEASIBLE:
            raise ValueError(f"matching cost of image {image} is infeasible")
