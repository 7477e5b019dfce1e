"""MMF UniT and DETR checkpoints: load them into ``UniT``, save in MMF's layout.

MMF writes ``{"model": state_dict, "optimizer": ..., ...}``; the state dict's keys are the
model's (``unit_base_model.*``, ``bert_model.module.*`` and its alias ``bert_model.embeddings.*``,
...), or ``detr_model.*`` in checkpoints older than the rename (MMF's ``format_state_key``).
"""

import os
from dataclasses import dataclass, field

import torch

# Buffers older transformers versions saved and current ones do not (non-persistent since
# transformers 4.31): dropped on load and reported, never an error.
_BENIGN_SUFFIXES = ("embeddings.position_ids",)


@dataclass
class LoadReport:
    """What a checkpoint load did: keys renamed, dropped as benign, missing and unexpected."""

    path: str
    renamed: int = 0
    dropped: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.missing and not self.unexpected

    def __str__(self):
        lines = [f"checkpoint {self.path}: {'loaded' if self.ok else 'MISMATCH'}"]
        if self.renamed:
            lines.append(f"  renamed detr_model.* -> unit_base_model.*: {self.renamed} keys")
        for name in ("dropped", "missing", "unexpected"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... (+{len(keys) - 10})" if len(keys) > 10 else "")
                lines.append(f"  {name} ({len(keys)}): {shown}")
        return "\n".join(lines)


def _read_state_dict(path):
    if not os.path.isfile(os.path.expanduser(str(path))):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    ckpt = torch.load(os.path.expanduser(str(path)), map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict) and "model" in ckpt:
        return ckpt["model"]
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict
    raise ValueError(f"checkpoint {path!r} has no 'model' entry and is not a state dict")


def mmf_state_dict(path):
    """``(state_dict, report)`` of an MMF UniT checkpoint, keys in the current layout."""
    report = LoadReport(str(path))
    state = {}
    for key, value in _read_state_dict(path).items():
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


def load_mmf_checkpoint(path, model=None, strict=True):
    """Load an MMF UniT checkpoint (its ``"model"`` entry).

    Args:
        path: a local ``.pth`` / ``.ckpt`` file.
        model: a ``UniT`` built from the matching config; None returns the state dict only.
        strict: raise ``RuntimeError`` (with the report) when keys are missing or unexpected.

    Returns:
        ``LoadReport`` (with ``model``), else ``(state_dict, LoadReport)``.
    """
    state, report = mmf_state_dict(path)
    if model is None:
        return state, report
    own = model.state_dict()
    report.missing = sorted(k for k in own if k not in state and not k.endswith(_BENIGN_SUFFIXES))
    report.unexpected = sorted(k for k in state if k not in own)
    shape_errors = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in state if k in own and state[k].shape != own[k].shape]
    if shape_errors:
        raise RuntimeError(f"checkpoint {path!r}: shape mismatches (is the config the checkpoint's?):\n  "
                           + "\n  ".join(shape_errors[:20]))
    if strict and not report.ok:
        raise RuntimeError(str(report))
    model.load_state_dict(state, strict=False)
    return report


def save_mmf_checkpoint(model, path, **extra):
    """Write ``{"model": model.state_dict(), **extra}`` atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"model": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def load_base_checkpoint(model, path, backbone_only=True):
    """MMF's ``base_ckpt_path``: initialise ``model.unit_base_model`` from a DETR (or UniT base)
    checkpoint; with ``backbone_only`` only keys containing ``"backbone"`` (DETR's
    ``backbone.0.body.*`` = ours), loaded non-strictly as MMF does.  Returns the report."""
    state, report = mmf_state_dict(path)
    if backbone_only:
        state = {k: v for k, v in state.items() if "backbone" in k}
    base = model.unit_base_model
    own = base.state_dict()
    report.unexpected = sorted(k for k in state if k not in own)
    report.missing = sorted(k for k in own if k not in state) if not backbone_only else \
        sorted(k for k in own if "backbone" in k and k not in state)
    base.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report
