"""MMF UniT and DETR checkpoints: load them into ``UniT``, save in MMF's layout.

MMF writes ``{"model": state_dict, "optimizer": ..., ...}``; the state dict's keys are the
model's (``unit_base_model.*``, ``bert_model.module.*`` and its alias ``bert_model.embeddings.*``,
...), or ``detr_model.*`` in checkpoints older than the rename (MMF's ``format_state_key``).

Every file is read through ``unit_fast.checkpoint_io.load``: weights only, never code from the
file (``trust=True`` is the one exception, for a file the user trusts); ``.safetensors`` too.
"""

from dataclasses import dataclass, field

import torch

from unit_fast import checkpoint_io
from unit_fast.atomic import atomic_write

# Buffers older transformers versions saved and current ones do not (non-persistent since
# transformers 4.31): dropped on load and reported, never an error.
_BENIGN_SUFFIXES = ("embeddings.position_ids",)


@dataclass
class LoadReport:
    """What a checkpoint load did: keys renamed, dropped as benign, missing and unexpected, and
    ``reinitialized``: the model's keys of the heads left at their fresh initialisation because
    their shapes differ from the checkpoint's (``reinit_mismatched_heads``)."""

    path: str
    renamed: int = 0
    dropped: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    reinitialized: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.missing and not self.unexpected

    def __str__(self):
        lines = [f"checkpoint {self.path}: {'loaded' if self.ok else 'MISMATCH'}"]
        if self.renamed:
            lines.append(f"  renamed detr_model.* -> unit_base_model.*: {self.renamed} keys")
        for name in ("dropped", "missing", "unexpected", "reinitialized"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... (+{len(keys) - 10})" if len(keys) > 10 else "")
                lines.append(f"  {name} ({len(keys)}): {shown}")
        return "\n".join(lines)


def _read_state_dict(path, trust=False, loaded=None):
    ckpt = checkpoint_io.load(path, trust=trust) if loaded is None else loaded
    if isinstance(ckpt, dict) and "model" in ckpt:
        return ckpt["model"]
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict
    raise ValueError(f"checkpoint {path!r} has no 'model' entry and is not a state dict")


def mmf_state_dict(path, trust=False, *, loaded=None):
    """``(state_dict, report)`` of an MMF UniT checkpoint, keys in the current layout.
    ``loaded``: the checkpoint already read from ``path`` (not read again)."""
    report = LoadReport(str(path))
    state = {}
    for key, value in _read_state_dict(path, trust, loaded).items():
        if key.startswith("module."):  # saved from a DistributedDataParallel wrapper
            key = key[len("module."):]
        if key.startswith("detr_model."):
            key = "unit_base_model." + key[len("detr_model."):]
            report.renamed += 1
        if key.endswith(_BENIGN_SUFFIXES):
            report.dropped.append(key)
            continue
        state[key] = value
    return state, report


def _under(key, prefixes):
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _mismatched_heads(model, state, own, path):
    """Every model key of the output heads (``UniT.head_prefixes``) that hold a key whose shape
    differs from the checkpoint's.  A shape mismatch outside every head is a RuntimeError: only
    a head may change with the class count."""
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    datasets = [ds for heads in getattr(model, "heads", {}).values() for ds in heads]
    prefixes = {ds: model.head_prefixes(ds) for ds in datasets}
    outside = [k for k in mismatched if not any(_under(k, p) for p in prefixes.values())]
    if outside:
        errors = "\n  ".join(_shape_error(k, state, own) for k in outside[:20])
        raise RuntimeError(f"checkpoint {path!r}: shape mismatches outside the output heads (is the config "
                           f"the checkpoint's?):\n  {errors}")
    changed = [p for p in prefixes.values() if any(_under(k, p) for k in mismatched)]
    return sorted(k for k in own if any(_under(k, p) for p in changed))


def _shape_error(key, state, own):
    return f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"


def load_mmf_checkpoint(path, model=None, strict=True, trust=False, *, loaded=None,
                        reinit_mismatched_heads=False):
    """Load an MMF UniT checkpoint (its ``"model"`` entry).

    Args:
        path: a local ``.pth`` / ``.ckpt`` / ``.safetensors`` file.
        model: a ``UniT`` built from the matching config; None returns the state dict only.
        strict: raise ``RuntimeError`` (with the report) when keys are missing or unexpected.
        trust: unpickle the file fully (it may run code: only for a file you trust).  Without
            it, a file that needs more than weights raises ``UntrustedCheckpointError``.
        loaded: the checkpoint already read from ``path`` (``read_checkpoint`` has): a
            multi-GB file is not read twice.
        reinit_mismatched_heads: fine-tuning with other class counts (``training.init_strict:
            false``): a dataset's output head (every key under ``model.head_prefixes(ds)``, the
            no-object weight included) with any shape unlike the checkpoint's is not loaded at
            all, keeps its fresh initialisation and is listed in ``report.reinitialized``.  A
            mismatch outside every head is still a ``RuntimeError``; without this flag any
            mismatch is.

    Returns:
        ``LoadReport`` (with ``model``), else ``(state_dict, LoadReport)``.
    """
    state, report = mmf_state_dict(path, trust, loaded=loaded)
    if model is None:
        return state, report
    own = model.state_dict()
    report.missing = sorted(k for k in own if k not in state and not k.endswith(_BENIGN_SUFFIXES))
    report.unexpected = sorted(k for k in state if k not in own)
    shape_errors = [_shape_error(k, state, own) for k in state if k in own and state[k].shape != own[k].shape]
    if shape_errors and not reinit_mismatched_heads:
        raise RuntimeError(f"checkpoint {path!r}: shape mismatches (is the config the checkpoint's?):\n  "
                           + "\n  ".join(shape_errors[:20]))
    if shape_errors:
        report.reinitialized = _mismatched_heads(model, state, own, path)
        fresh = set(report.reinitialized)
        # The whole head keeps its fresh init, also keys whose shape happens to match (a
        # classifier's first layer): half a trained head on new classes is no better start.
        state = {k: v for k, v in state.items() if k not in fresh}
        report.missing = [k for k in report.missing if k not in fresh]
    if strict and not report.ok:
        raise RuntimeError(str(report))
    model.load_state_dict(state, strict=False)
    return report


def save_mmf_checkpoint(model, path, format="torch", **extra):
    """Write the model's weights in MMF's layout, atomically.

    ``format="torch"``: ``{"model": model.state_dict(), **extra}`` with ``torch.save`` (what MMF
    reads); ``format="safetensors"``: the state dict as a ``.safetensors`` file, ``extra`` (JSON
    values) in its metadata.  Both load back with ``load_mmf_checkpoint`` without trust."""
    if format == "safetensors":
        checkpoint_io.save_safetensors(path, model.state_dict(), extra)
    elif format == "torch":
        atomic_write(path, lambda f: torch.save({"model": model.state_dict(), **extra}, f))
    else:
        raise ValueError(f"save_mmf_checkpoint: format must be 'torch' or 'safetensors', got {format!r}")
    return path


def load_base_checkpoint(model, path, backbone_only=True, trust=False):
    """MMF's ``base_ckpt_path``: initialise ``model.unit_base_model`` from a DETR (or UniT base)
    checkpoint; with ``backbone_only`` only keys containing ``"backbone"`` (DETR's
    ``backbone.0.body.*`` = ours), loaded non-strictly as MMF does.  Returns the report."""
    state, report = mmf_state_dict(path, trust)
    if backbone_only:
        state = {k: v for k, v in state.items() if "backbone" in k}
    base = model.unit_base_model
    own = base.state_dict()
    report.unexpected = sorted(k for k in state if k not in own)
    report.missing = sorted(k for k in own if k not in state) if not backbone_only else \
        sorted(k for k in own if "backbone" in k and k not in state)
    base.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report
