"""UniT's detection loss: DETR's ``SetCriterion`` with MMF's attribute loss, and its builder.

Written from the facts of MMF ``mmf/models/unit/unit_base_model.py`` (``SetCriterion``,
``build_detection_loss``) and DETR ``models/detr.py``, see ``shared/reference/unit_mmf_detr.md``
sections 1.3, 1.6 and 4.  Loss names, the ``empty_weight`` buffer, the ``_{i}`` aux suffixes
and every formula are the reference's.

Two execution paths, chosen by ``implementation``, that give the same numbers:

``"reference"``  MMF's behaviour: the matcher runs once per decoder layer (a scipy solve when
                 built by ``build_detection_loss``, CPU indices), the box losses are
                 ``box_loss_ref`` (plain torch), ``num_boxes`` is read to a python float with
                 ``.item()``, and the attribute loss is MMF's ``(B*Q*16, A)`` formulation.
``"fast"``       one ``matcher.match_all`` solve for the main and every aux layer with indices
                 kept on the device, targets concatenated once per batch, matched
                 predictions gathered with device index tensors, ``unit_fast.box_loss``
                 (Triton on CUDA), ``num_boxes`` kept as a device tensor, and the attribute
                 loss evaluated on the matched queries only.  No host-device sync.

Deliberate differences from MMF:
- ``losses=["labels_balanced"]`` (MMF's ``use_bcl`` option) raises ``NotImplementedError``;
- a ``max_attribute_num`` other than the targets' attribute width raises (MMF hard-codes 16
  and asserts); ``None`` takes the targets' width;
- the fast path computes the attribute log-softmax in at least float32 (what autocast does
  to ``cross_entropy``), so it equals the reference only for fp32/fp64 heads.
"""

import copy
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from unit_fast.nn.hungarian_matcher import HungarianMatcher
from unit_fast.ops.box_loss import box_loss, box_loss_ref
from unit_fast.ops.hungarian_match import to_device

IMPLEMENTATIONS = ("reference", "fast")
_KNOWN_LOSSES = ("labels", "boxes", "cardinality")


class _Matched(NamedTuple):
    """One decoder layer's matched pairs flattened over the batch, ``N = sum_i min(Q, T_i)``."""

    batch_idx: Tensor  # [N] int64: image of each pair
    src_idx: Tensor  # [N] int64: its query
    labels: Tensor  # [N] int64: its target class
    boxes: Tensor  # [N, 4]: its target box, cxcywh
    attributes: Tensor | None  # [N, K] int64, -1 = no attribute; None when targets have none


class SetCriterion(nn.Module):
    """DETR's set loss: Hungarian matching, then losses on the matched pairs (MMF UniT's copy).

    Args:
        num_classes: C, the number of object classes; the no-object class is index C.
        matcher: ``unit_fast.HungarianMatcher`` (or DETR/MMF's: any module ``matcher(outputs,
            targets)`` -> B pairs ``(pred_idx, tgt_idx)``; the fast path needs ``match_all``).
            ``implementation="fast"`` stores a shallow copy with ``keep_on_device=True`` when the
            given matcher has it off (the given module is not modified), so indices stay on
            the device and nothing is checked on the host: an image whose cost holds NaN gets
            garbage pairs (and NaN losses from its NaN predictions) instead of a ValueError.
        weight_dict: ``{loss name: coefficient}``; stored for the caller (the model multiplies,
            as MMF's ``UniT`` does); the criterion returns unweighted losses.
        eos_coef: weight of the no-object class in ``loss_ce`` (``empty_weight[C]``).
        losses: subset of ``["labels", "boxes", "cardinality"]``.
        attribute_head: ``AttributeHead``; with it, ``"labels"`` adds ``loss_attr`` whenever the
            targets hold ``"attributes"``.  It is fed the *ground-truth* classes of the queries
            (``num_classes`` for unmatched ones), as in MMF.
        attribute_class_num: A; when given, the head's output width is checked against it.
        max_attribute_num: K, the attribute slots per target box (MMF: 16); None = targets'.
        implementation: ``"reference"`` or ``"fast"`` (see the module docstring).
        box_loss_backend: forwarded to ``unit_fast.box_loss`` on the fast path (None = the
            device's default: Triton on CUDA, the reference on CPU; tests force ``"triton"``).

    ``forward(outputs, targets)``:
        outputs: dict with ``pred_logits (B, Q, C+1)``, ``pred_boxes (B, Q, 4)`` (normalised
            cxcywh), ``hs_for_attr (B, Q, d)`` (needed for ``loss_attr``) and optionally
            ``aux_outputs``: a list of dicts with the same keys, one per earlier decoder layer.
        targets: list of B dicts with ``labels (T_i,)`` int64, ``boxes (T_i, 4)`` normalised
            cxcywh and optionally ``attributes (T_i, K)`` int64 (-1 = padding); T_i may be 0.
        Returns a dict of 0-d tensors: ``loss_ce``, ``loss_attr``, ``loss_bbox``, ``loss_giou``,
            ``cardinality_error`` (no gradient) for the last layer and the same names with
            suffix ``_{i}`` for ``aux_outputs[i]``.  No ``class_error`` (MMF drops it).

    The box sums are divided by ``num_boxes`` = the number of target boxes in the batch,
    summed over ranks and divided by the world size when ``torch.distributed`` is
    initialised, clamped to at least 1.
    """

    def __init__(self, num_classes, matcher, weight_dict, eos_coef, losses, attribute_head=None,
                 attribute_class_num=None, max_attribute_num=None, *, implementation="reference",
                 box_loss_backend=None):
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        for loss in losses:
            if loss == "labels_balanced":
                raise NotImplementedError(
                    "SetCriterion: the 'labels_balanced' loss (MMF's use_bcl option) is not "
                    "implemented; use losses=['labels', 'boxes', 'cardinality']")
            if loss not in _KNOWN_LOSSES:
                raise ValueError(f"unknown loss {loss!r}; expected one of {_KNOWN_LOSSES}")
        if implementation == "fast":
            if not hasattr(matcher, "match_all"):
                raise TypeError("implementation='fast' needs a matcher with match_all (unit_fast.HungarianMatcher)")
            if not getattr(matcher, "keep_on_device", False):
                matcher = copy.copy(matcher)  # shallow: the caller's matcher keeps its setting
                matcher.keep_on_device = True
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.attribute_head = attribute_head
        self.attribute_class_num = attribute_class_num
        self.max_attribute_num = max_attribute_num
        self.implementation = implementation
        self.box_loss_backend = box_loss_backend
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def set_implementation(self, implementation, box_loss_backend=None):
        """Switch paths in place: ``"reference"`` matches per layer with scipy (CPU indices);
        ``"fast"`` solves every layer at once on the device and keeps the indices there."""
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if implementation == "fast" and not hasattr(self.matcher, "match_all"):
            raise TypeError("implementation='fast' needs a matcher with match_all (unit_fast.HungarianMatcher)")
        self.implementation, self.box_loss_backend = implementation, box_loss_backend
        if hasattr(self.matcher, "keep_on_device"):
            self.matcher = copy.copy(self.matcher)  # shallow: a caller's matcher keeps its settings
            self.matcher.keep_on_device = implementation == "fast"
            self.matcher.backend = None if implementation == "fast" else "reference"
        return self

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
                f"implementation={self.implementation!r}")

    # ----------------------------------------------------------------------------- losses
    def loss_labels(self, outputs, matched):
        """``loss_ce``: CE over all queries, weighted by ``empty_weight``; plus ``loss_attr``."""
        src_logits = outputs["pred_logits"]  # [B, Q, C+1]
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)  # [B, Q]
        target_classes[matched.batch_idx, matched.src_idx] = matched.labels.to(src_logits.device)
        losses = {"loss_ce": F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)}
        if self.attribute_head is not None and matched.attributes is not None:
            if "hs_for_attr" not in outputs:
                raise KeyError("loss_attr needs outputs['hs_for_attr'] (B, Q, d) in every layer")
            if self.implementation == "reference":
                loss_attr = self._loss_attr_reference(outputs["hs_for_attr"], target_classes, matched)
            else:
                loss_attr = self._loss_attr_fast(outputs["hs_for_attr"], matched)
            losses["loss_attr"] = loss_attr
        return losses

    def _loss_attr_reference(self, hs, target_classes, matched):
        """MMF's attribute loss over every query and every attribute slot.

        Per box: ``0.5 * sum_k CE(logits, attr_k) / #valid slots`` (slots with -1 ignored,
        boxes without a valid slot weigh 0); the loss is the sum over boxes divided by the
        number of boxes whose loss is non-zero (0 when there is none).
        """
        B, Q = target_classes.shape
        K = matched.attributes.shape[-1]
        target_attrs = torch.full((B, Q, K), -1, dtype=torch.int64, device=hs.device)  # [B, Q, K]
        target_attrs[matched.batch_idx, matched.src_idx] = matched.attributes.to(hs.device)
        logits = self.attribute_head(hs, target_classes)  # [B, Q, A]
        A = self._check_attribute_classes(logits)
        n = B * Q
        logits = logits.reshape(n, 1, A).expand(n, K, A).reshape(n * K, A)  # [n*K, A]: one row per slot
        attrs = target_attrs.reshape(n, K)  # [n, K]
        weights = (attrs >= 0).sum(1).float().reciprocal().repeat_interleave(K)  # [n*K]
        weights[weights > 1] = 0.0  # 1/0 = inf: a box without attributes weighs 0 (host sync)
        ce = 0.5 * F.cross_entropy(logits, attrs.reshape(-1), reduction="none", ignore_index=-1)  # [n*K]
        per_box = (ce * weights).view(n, K).sum(1)  # [n]
        n_valid = len(per_box.nonzero())  # host sync, as MMF
        return (per_box / n_valid).sum() if n_valid > 0 else (per_box * 0.0).sum()

    def _loss_attr_fast(self, hs, matched):
        """``_loss_attr_reference`` on the N matched queries only (unmatched queries have no
        valid slot, so they add 0 to the loss and to every gradient), with the log-softmax
        computed once per box instead of once per slot, and no host sync."""
        logits = self.attribute_head(hs[matched.batch_idx, matched.src_idx], matched.labels)  # [N, A]
        self._check_attribute_classes(logits)
        # At least fp32 (what autocast gives cross_entropy); fp64 stays fp64.
        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [N, A]
        attrs = matched.attributes  # [N, K]
        valid = attrs >= 0  # [N, K]
        nll = -logp.gather(1, attrs.clamp(min=0)) * valid  # [N, K]; -1 slots read class 0, then 0
        weight = valid.sum(1).clamp(min=1).float().reciprocal()  # [N]; no valid slot: nll is 0 anyway
        per_box = 0.5 * (nll * weight[:, None]).sum(1)  # [N]
        n_valid = (per_box != 0).sum().clamp(min=1)  # [] on the device; 0 boxes: the sum is 0
        return (per_box / n_valid).sum()

    def _check_attribute_classes(self, logits):
        A = logits.shape[-1]
        if self.attribute_class_num is not None and A != self.attribute_class_num:
            raise ValueError(f"attribute head gives {A} classes, expected {self.attribute_class_num}")
        return A

    def loss_boxes(self, outputs, matched, num_boxes):
        """``loss_bbox`` = sum L1 / num_boxes, ``loss_giou`` = sum (1 - GIoU) / num_boxes."""
        src_boxes = outputs["pred_boxes"][matched.batch_idx, matched.src_idx]  # [N, 4]
        target_boxes = matched.boxes.to(src_boxes.device)  # [N, 4]
        if self.implementation == "reference":
            loss_bbox, loss_giou = box_loss_ref(src_boxes, target_boxes, num_boxes)
        else:
            loss_bbox, loss_giou = box_loss(src_boxes, target_boxes, num_boxes, backend=self.box_loss_backend)
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets):
        """``cardinality_error``: L1 between the number of non-no-object predictions and of
        targets, averaged over images.  A logged metric: no gradient."""
        logits = outputs["pred_logits"]  # [B, Q, C+1]
        sizes = [int(t["labels"].shape[0]) for t in targets]
        if self.implementation == "reference":
            tgt_lengths = torch.as_tensor(sizes, device=logits.device)  # [B]
        else:
            tgt_lengths = to_device(sizes, logits.device)  # [B]; pinned, non-blocking
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)  # [B]
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def get_loss(self, loss, outputs, targets, indices, num_boxes):
        """DETR's per-loss entry point; ``indices`` is the matcher's list of B ``(pred_idx, tgt_idx)``."""
        if self.implementation == "reference":
            matched = _matched_per_image(targets, indices)
        else:
            matched = _FlatTargets(targets, outputs["pred_logits"]).matched(indices)
        return self._get_loss(loss, outputs, targets, matched, num_boxes)

    def _get_loss(self, loss, outputs, targets, matched, num_boxes):
        if loss == "labels":
            return self.loss_labels(outputs, matched)
        if loss == "boxes":
            return self.loss_boxes(outputs, matched, num_boxes)
        if loss == "cardinality":
            return self.loss_cardinality(outputs, targets)
        raise ValueError(f"unknown loss {loss!r}")

    # ---------------------------------------------------------------------------- forward
    def forward(self, outputs, targets):
        layers = [outputs, *outputs.get("aux_outputs", [])]  # main first, then aux 0, 1, ...
        device = outputs["pred_logits"].device
        if self.implementation == "reference":
            # One matcher call (and one host sync) per layer, as MMF.
            matched = [_matched_per_image(targets, self.matcher(_without_aux(o), targets)) for o in layers]
            num_boxes = _num_boxes(targets, device).item()  # host sync, as MMF
        else:
            flat = _FlatTargets(targets, outputs["pred_logits"])
            matched = [flat.matched(idx) for idx in self.matcher.match_all(outputs, targets)]
            num_boxes = _num_boxes(targets, device)  # [] stays on the device
        attrs = matched[0].attributes
        if self.attribute_head is not None and attrs is not None and self.max_attribute_num is not None:
            width = attrs.shape[-1]
            if width != self.max_attribute_num:
                raise ValueError(f"targets hold {width} attribute slots, "
                                 f"max_attribute_num={self.max_attribute_num}")
        losses = {}
        for i, (layer, m) in enumerate(zip(layers, matched, strict=True)):
            suffix = "" if i == 0 else f"_{i - 1}"
            for loss in self.losses:
                for k, v in self._get_loss(loss, layer, targets, m, num_boxes).items():
                    losses[k + suffix] = v
        return losses


def _without_aux(outputs):
    return {k: v for k, v in outputs.items() if k != "aux_outputs"}


def _has_attributes(targets):
    return len(targets) > 0 and "attributes" in targets[0]  # MMF looks at the first image


def _num_boxes(targets, device):
    """Target boxes in the batch, all-reduced (mean over ranks), clamped >= 1: ``()`` float32.

    Built with ``torch.full`` (a fill kernel), not from a host tensor: a pageable copy to
    CUDA would wait for the GPU.
    """
    n = torch.full((), float(sum(int(t["labels"].shape[0]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1)


def _matched_per_image(targets, indices):
    """DETR's gathering: per-image index tensors (CPU from a reference matcher) concatenated."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])  # [N]
    src_idx = torch.cat([src for src, _ in indices])  # [N]
    pairs = list(zip(targets, [j for _, j in indices], strict=True))
    labels = torch.cat([t["labels"][j] for t, j in pairs])  # [N]
    boxes = torch.cat([t["boxes"][j] for t, j in pairs])  # [N, 4]
    attrs = torch.cat([t["attributes"][j] for t, j in pairs]) if _has_attributes(targets) else None  # [N, K]
    return _Matched(batch_idx, src_idx, labels, boxes, attrs)


class _FlatTargets:
    """The batch's targets concatenated once, for every layer's gather (fast path).

    Matched pair ``r`` of image ``b`` reads target ``starts[b] + tgt_idx``; the image of each
    pair and that offset depend only on the host-known counts ``min(Q, T_b)``, the same for
    every layer, so they are built on the host once and copied without a sync.
    """

    def __init__(self, targets, pred_logits):
        device = pred_logits.device
        Q = pred_logits.shape[1]
        sizes = np.array([int(t["labels"].shape[0]) for t in targets], dtype=np.int64)  # [B]
        counts = np.minimum(sizes, Q)  # [B] pairs per image
        starts = np.cumsum(sizes) - sizes  # [B] first target of each image
        host = np.stack([np.repeat(np.arange(len(sizes)), counts), np.repeat(starts, counts)])  # [2, N]
        self.batch_idx, self.offset = to_device(torch.from_numpy(host), device).unbind(0)  # [N], [N]
        self.labels = torch.cat([t["labels"] for t in targets]).to(device)  # [sum T]
        self.boxes = torch.cat([t["boxes"] for t in targets]).to(device)  # [sum T, 4]
        self.attributes = (torch.cat([t["attributes"] for t in targets]).to(device)  # [sum T, K]
                           if _has_attributes(targets) else None)

    def matched(self, indices):
        src_idx = torch.cat([src for src, _ in indices]).to(self.batch_idx.device)  # [N]
        tgt = torch.cat([tgt for _, tgt in indices]).to(self.batch_idx.device) + self.offset  # [N]
        attrs = self.attributes[tgt] if self.attributes is not None else None  # [N, K]
        return _Matched(self.batch_idx, src_idx, self.labels[tgt], self.boxes[tgt], attrs)


def build_detection_loss(num_classes, *, set_cost_class=1, set_cost_bbox=5, set_cost_giou=2,
                         bbox_loss_coef=5, giou_loss_coef=2, attr_loss_coef=1, eos_coef=0.1,
                         dec_layers=6, aux_loss=True, use_bcl=False, attribute_head=None,
                         attribute_class_num=None, max_attribute_num=16, implementation="reference"):
    """MMF's ``build_detection_loss`` with the ``base_args`` fields as keywords (MMF defaults).

    The matcher is ``unit_fast.HungarianMatcher``: on ``implementation="reference"`` solved by scipy
    with CPU indices (MMF), on ``"fast"`` by the default solver with indices kept on the device.
    ``weight_dict`` = ``{loss_ce: 1, loss_bbox, loss_giou, loss_attr}`` plus copies suffixed
    ``_0 .. _{dec_layers-2}`` when ``aux_loss``.  ``use_bcl=True`` selects MMF's balanced
    label loss, which raises ``NotImplementedError``.
    """
    matcher = HungarianMatcher(cost_class=set_cost_class, cost_bbox=set_cost_bbox, cost_giou=set_cost_giou,
                               logsoftmax=use_bcl, keep_on_device=implementation == "fast",
                               backend="reference" if implementation == "reference" else None)
    weight_dict = {"loss_ce": 1, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef,
                   "loss_attr": attr_loss_coef}
    if aux_loss:
        main = dict(weight_dict)
        for i in range(dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in main.items()})
    losses = ["labels_balanced" if use_bcl else "labels", "boxes", "cardinality"]
    return SetCriterion(num_classes, matcher, weight_dict, eos_coef, losses, attribute_head,
                        attribute_class_num, max_attribute_num, implementation=implementation)
