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


def select_rows(batch, keep):
    """The collated ``batch`` restricted to its rows ``keep`` (a ``(b,)`` index tensor or list):
    every ``(B, ...)`` tensor, ``NestedTensor`` and length-``B`` list is indexed; the rest (the
    dataset name, split, skip count) is kept as it is."""
    rows = [int(i) for i in keep]
    n = len(batch["indices"])
    index = torch.tensor(rows, dtype=torch.long)
    out = {}
    for key, value in batch.items():
        if isinstance(value, NestedTensor):
            i = index.to(value.tensors.device)
            value = NestedTensor(value.tensors[i], None if value.mask is None else value.mask[i])
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            value = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == n:
            value = [value[i] for i in rows]
        out[key] = value
    return out
