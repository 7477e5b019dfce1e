"""MMF's optimiser setup for UniT: AdamW with a backbone group at ``lr_backbone``, and the
warmup-cosine schedule (``mmf/modules/schedulers.py`` ``warmup_cosine``)."""

import math

import torch


def param_groups(model, lr, lr_backbone, weight_decay):
    """MMF's ``get_optimizer_parameters``: every trainable parameter at ``lr``, except the image
    backbone's (``unit_base_model.backbone``) at ``lr_backbone``."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if name.startswith("unit_base_model.backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if backbone:
        groups.append({"params": backbone, "lr": lr_backbone, "weight_decay": weight_decay})
    return groups


def build_optimizer(model, lr, lr_backbone, weight_decay, eps=1e-8):
    return torch.optim.AdamW(param_groups(model, lr, lr_backbone, weight_decay), lr=lr, eps=eps)


def warmup_cosine(optimizer, warmup_steps, max_steps, warmup_factor=0.1):
    """Linear warmup from ``warmup_factor`` to 1 over ``warmup_steps``, then cosine to 0 at
    ``max_steps`` (per group: every group's lr follows the same multiplier)."""

    def factor(step):
        if step < warmup_steps:
            alpha = step / max(1, warmup_steps)
            return warmup_factor * (1 - alpha) + alpha
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
