"""The device a run uses, and moving collated batches to it."""

import torch

from unit_fast.structures import NestedTensor


def resolve_device(name, option="--device"):
    """``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"`` -> ``torch.device``; ValueError
    naming ``option`` otherwise, or for ``"cuda"`` without a CUDA device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"{option} must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}=cuda but no CUDA device is available")
    return torch.device(name)


def to_device(x, device):
    """Moves a batch to ``device`` (``non_blocking`` only on CUDA)."""
    nb = device.type == "cuda"
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=nb)
    if isinstance(x, NestedTensor):
        return x.to(device, non_blocking=nb)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [to_device(v, device) for v in x]
    return x
