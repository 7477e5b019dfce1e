"""Moving collated batches to the training device."""

import torch

from unit_fast.models.misc import NestedTensor


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
