"""``unit_fast.patch_detr``: unit_fast's matcher, box loss and attention inside a DETR-style model.

Targets code built from facebookresearch/detr's ``Transformer`` / ``SetCriterion`` /
``HungarianMatcher`` (DETR itself, MMF's UniT, their forks), recognised by class and attribute
names, since none of them can be imported here; and this repo's own ``unit_fast.models`` UniT,
switched with its own ``set_implementation("fast")``.  What it does, in place:

- each DETR ``HungarianMatcher`` (softmax class cost) becomes a ``LayerBatchedMatcher``: a
  ``unit_fast.HungarianMatcher`` with the same cost weights;
- each DETR ``SetCriterion`` gets a generated subclass of its own class whose ``forward`` solves
  the main output and every ``aux_outputs`` layer in one ``match_all`` before running the
  original ``forward``, whose per-layer matcher calls are then answered from that solve; its
  ``loss_boxes`` is ``unit_fast.ops.box_loss.op.box_loss`` (fused L1 + GIoU);
- attention at the call sites that discard the weights (``DISCARDING_CALL_SITES``) becomes
  ``unit_fast.MultiheadAttention(drop_weights=True)``; every other ``nn.MultiheadAttention`` gets
  ``drop_weights=False`` (the fused path for its ``need_weights=False`` calls only).

Parameter objects and state-dict keys never change (the matchers and the generated class hold
no parameters or buffers of their own).
"""

import contextlib
import inspect
import sys

import torch
from torch import nn

from unit_fast.nn.hungarian_matcher import HungarianMatcher
from unit_fast.nn.multihead_attention import MultiheadAttention
from unit_fast.ops.box_loss.op import box_loss
from unit_fast.patch.report import PatchReport

# Layer classes (by name) whose forward calls these attention modules with the default
# need_weights=True and keeps only [0]: DETR models/transformer.py, MMF
# mmf/models/unit/transformer.py and unit_fast/models/transformer.py all do.  torch.nn's own
# layers of the same names pass need_weights=False themselves and are not listed.
DISCARDING_CALL_SITES = {
    "TransformerEncoderLayer": ("self_attn",),
    "TransformerDecoderLayer": ("self_attn", "multihead_attn"),
}
# The backends both attention and box_loss have (attention has no "cpp", box_loss no "torch").
BACKENDS = (None, "reference", "triton")


class LayerBatchedMatcher(HungarianMatcher):
    """``unit_fast.HungarianMatcher`` that answers a criterion's per-layer calls from one solve.

    Inside ``with matcher.solved(outputs, targets):`` every layer (main and ``aux_outputs``) is
    solved in one ``match_all``; a call ``matcher(layer_outputs, targets)`` for one of those
    layers (recognised by its ``pred_logits`` / ``pred_boxes`` tensor objects and the same
    ``targets`` list) returns that layer's result; any other call solves normally.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._answers = {}

    @contextlib.contextmanager
    def solved(self, outputs, targets):
        layers = [outputs, *outputs.get("aux_outputs", [])]
        results = self.match_all(outputs, targets)  # [main, aux 0, aux 1, ...], one solve
        self._answers = {_key(o, targets): r for o, r in zip(layers, results, strict=True)}
        try:
            yield
        finally:
            self._answers = {}

    @torch.no_grad()
    def forward(self, outputs, targets):
        answer = self._answers.pop(_key(outputs, targets), None)
        return super().forward(outputs, targets) if answer is None else answer


def _key(outputs, targets):
    # Object identities: the tensors and the list live for the whole criterion call.
    return id(outputs["pred_logits"]), id(outputs["pred_boxes"]), id(targets)


class _FastCriterion:
    """Mixed in before a DETR ``SetCriterion`` class (see ``_fast_class``)."""

    _unit_fast_backend = None

    def forward(self, outputs, targets):
        matcher = self.matcher
        if not isinstance(matcher, LayerBatchedMatcher):
            return super().forward(outputs, targets)
        with matcher.solved(outputs, targets):
            return super().forward(outputs, targets)

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """DETR's ``loss_bbox`` (sum L1 / num_boxes) and ``loss_giou`` (sum 1 - GIoU / num_boxes),
        one fused ``box_loss`` over the matched ``(N, 4)`` cxcywh pairs."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])  # (N,)
        src_idx = torch.cat([src for src, _ in indices])  # (N,)
        src_boxes = outputs["pred_boxes"][batch_idx, src_idx]  # (N, 4)
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])  # (N, 4)
        loss_bbox, loss_giou = box_loss(src_boxes, target_boxes.to(src_boxes.device), num_boxes,
                                        backend=self._unit_fast_backend)
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def __reduce_ex__(self, protocol):
        # Pickle (torch.save, deepcopy) by the original class, which is importable; the
        # generated one is made again on load.
        return (_rebuild, (type(self).__mro__[2],), *super().__reduce_ex__(protocol)[2:])


_FAST_CLASSES = {}


def _fast_class(cls):
    """``cls`` with ``_FastCriterion`` first in its MRO, one class per ``cls``; same name, so the
    model prints as before."""
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(cls.__name__, (_FastCriterion, cls), {"__module__": __name__,
                                                                        "__qualname__": cls.__qualname__})
    return _FAST_CLASSES[cls]


def _rebuild(cls):
    return object.__new__(_fast_class(cls))


def _loaded(module, name):
    """``module.name`` if ``module`` is imported, else None: unit_fast.models imports transformers
    (seconds), and a model of it cannot exist unless it was imported."""
    return getattr(sys.modules.get(module), name, None)


def _source(fn):
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _matcher_problem(m):
    """None if ``m`` is DETR's matcher (softmax or MMF's log-softmax class cost), else why not."""
    if not all(hasattr(m, a) for a in ("cost_class", "cost_bbox", "cost_giou")):
        return "no cost_class / cost_bbox / cost_giou"
    src = _source(type(m).forward)
    if any(word in src for word in ("alpha", "gamma", "sigmoid")):
        return "its class cost is a focal / sigmoid cost (Deformable-DETR style), not DETR's softmax cost"
    if "softmax" not in src and not isinstance(getattr(m, "norm", None), (nn.Softmax, nn.LogSoftmax)):
        return "could not confirm that its class cost is DETR's softmax cost (source unavailable or different)"
    return None


def _is_detr_criterion(m):
    return (isinstance(getattr(m, "matcher", None), nn.Module) and hasattr(m, "losses")
            and callable(getattr(m, "get_loss", None)) and callable(getattr(m, "loss_boxes", None)))


def _is_discarding_site(layer, attr):
    cls = type(layer)
    return attr in DISCARDING_CALL_SITES.get(cls.__name__, ()) and not cls.__module__.startswith("torch.")


def patch_detr(model: nn.Module, criterion: nn.Module | None = None, *, backend: str | None = None) -> PatchReport:
    """Swaps unit_fast's matcher, box loss and attention into a DETR-style model, in place.

    Args:
        model: a DETR-style model, a criterion, or any module tree holding them (e.g. DETR's
            ``build()`` results in an ``nn.ModuleList``); this repo's ``unit_fast.models`` UniT
            is switched with ``set_implementation("fast", kernel_backend=backend)``.
        criterion: a second tree, e.g. DETR's criterion, so ``patch_detr(*build(args)[:2])``
            works; paths in the report start with ``criterion.``.
        backend: ``"triton"`` / ``"reference"`` forces the attention and box-loss kernels (and,
            for ``"reference"``, the matcher's scipy solve); None = each op's default for the
            device.

    Returns:
        a ``PatchReport``: ``entries`` ``(path, before, after)``, ``skipped`` ``(path, reason)``.
        Patching twice is harmless (the second call reports what is already patched).

    Surprises: a patched attention module at a discarding call site returns ``None`` weights
    (read them and it fails loudly); a patched criterion's class is generated (same name,
    ``isinstance`` of the original holds, pickles by the original class).
    """
    if backend not in BACKENDS:
        raise ValueError(f"patch_detr: backend must be one of {BACKENDS}, got {backend!r}")
    roots = [("", "model", model)] + ([] if criterion is None else [("criterion", "criterion", criterion)])
    for _, arg, root in roots:
        if not isinstance(root, nn.Module):
            raise TypeError(f"patch_detr: {arg} must be an nn.Module, got {type(root).__name__}")
    report, seen = PatchReport(), set()
    modules = []  # (path, module), each module once
    for prefix, _, root in roots:
        for path, m in root.named_modules(prefix=prefix):
            if id(m) not in seen:
                seen.add(id(m))
                modules.append((path or type(m).__name__, m))
    done = set()  # ids handled by a UniT's own switch
    unit_cls = _loaded("unit_fast.models.unit", "UniT")
    for path, m in modules:
        if unit_cls is not None and isinstance(m, unit_cls) and id(m) not in done:
            _patch_unit(path, m, backend, report)
            done.update(id(s) for s in m.modules())
    fast_crit_cls = _loaded("unit_fast.models.criterion", "SetCriterion")
    for path, m in modules:
        if id(m) in done:
            continue
        if fast_crit_cls is not None and isinstance(m, fast_crit_cls):
            if m.implementation == "fast":
                report.skipped.append((path, "unit_fast SetCriterion already on implementation='fast'"))
            else:
                m.set_implementation("fast", backend)
                report.entries.append((path, "unit_fast SetCriterion(implementation='reference')",
                                       "its implementation='fast' (set_implementation)"))
            done.add(id(m.matcher))
        elif _is_detr_criterion(m):
            _patch_criterion(path, m, backend, report)
            done.add(id(m.matcher))
    for path, m in modules:
        if id(m) not in done:
            _patch_children(path, m, backend, report, done)
    return report


def _patch_unit(path, model, backend, report):
    """This repo's UniT: its own switch, reported module by module."""
    def state():
        return {n: _describe(s) for n, s in model.named_modules(prefix=path)
                if isinstance(s, nn.MultiheadAttention) or hasattr(s, "set_implementation")}
    before = state()
    model.set_implementation("fast", kernel_backend=backend)
    changed = [(n, before[n], now) for n, now in state().items() if before.get(n) != now]
    report.entries += [(n, old, f"{now} (UniT.set_implementation)") for n, old, now in changed]
    if not changed:
        report.skipped.append((path, "UniT already on implementation='fast'"))


def _describe(m):
    if isinstance(m, MultiheadAttention):
        return f"unit_fast.MultiheadAttention(drop_weights={m.drop_weights})"
    if isinstance(m, nn.MultiheadAttention):
        return f"{type(m).__module__}.{type(m).__name__}"
    return f"{type(m).__name__}(implementation={m.implementation!r})"


def _patch_criterion(path, crit, backend, report):
    cls = type(crit)
    if isinstance(crit, _FastCriterion):
        crit._unit_fast_backend = backend
        report.skipped.append((path, f"{cls.__name__} already patched"))
        return
    if "giou" not in _source(cls.loss_boxes):
        report.skipped.append((path, f"{cls.__name__}.loss_boxes is not DETR's L1 + GIoU loss"))
        return
    matcher_path, matcher = f"{path}.matcher", crit.matcher
    problem = _matcher_problem(matcher)
    if problem is None:
        crit.matcher = _batched_matcher(matcher, backend)
        report.entries.append((matcher_path, type(matcher).__name__,
                               "unit_fast LayerBatchedMatcher (all decoder layers in one solve)"))
    else:
        report.skipped.append((matcher_path, f"{type(matcher).__name__}: {problem}"))
    crit.__class__ = _fast_class(cls)
    crit._unit_fast_backend = backend
    report.entries.append((f"{path}.loss_boxes", f"{cls.__name__}.loss_boxes", "unit_fast box_loss (fused L1 + GIoU)"))
    if problem is None:
        report.entries.append((f"{path}.forward", f"{cls.__name__}.forward (one matcher solve per layer)",
                               "one match_all solve for the main and every aux layer, then the original forward"))


def _batched_matcher(m, backend):
    logsoftmax = bool(getattr(m, "logsoftmax", False)) or isinstance(getattr(m, "norm", None), nn.LogSoftmax)
    return LayerBatchedMatcher(m.cost_class, m.cost_bbox, m.cost_giou, logsoftmax,
                               keep_on_device=getattr(m, "keep_on_device", False),
                               backend="reference" if backend == "reference" else None)


def _patch_children(path, parent, backend, report, done):
    """Matchers outside a criterion, and attention modules, as direct children of ``parent``."""
    for name, child in list(parent.named_children()):
        where = f"{path}.{name}"
        if id(child) in done:
            continue
        if type(child).__name__ == "HungarianMatcher" and type(child) is not HungarianMatcher:
            problem = _matcher_problem(child)
            if problem is None:
                setattr(parent, name, _batched_matcher(child, backend))
                report.entries.append((where, type(child).__name__, "unit_fast LayerBatchedMatcher"))
            else:
                report.skipped.append((where, f"{type(child).__name__}: {problem}"))
        elif isinstance(child, nn.MultiheadAttention):
            _patch_attention(where, parent, name, child, backend, report)
        done.add(id(child))


def _patch_attention(where, layer, name, attn, backend, report):
    drop = _is_discarding_site(layer, name)
    if type(attn) not in (nn.MultiheadAttention, MultiheadAttention):
        report.skipped.append((where, f"{type(attn).__name__} subclasses nn.MultiheadAttention with its own forward"))
        return
    if type(attn) is MultiheadAttention and (attn.drop_weights, attn.backend) == (drop, backend):
        report.skipped.append((where, f"already {_describe(attn)}"))
        return
    before = "torch.nn.MultiheadAttention" if type(attn) is nn.MultiheadAttention else _describe(attn)
    attn.__class__ = MultiheadAttention
    attn.backend, attn.drop_weights = backend, drop
    why = (f"{type(layer).__name__}.{name} keeps only [0] of need_weights=True calls" if drop
           else "call site not known to discard the weights")
    report.entries.append((where, before, f"unit_fast.MultiheadAttention(drop_weights={drop}): {why}"))
