"""MMF's optimiser setup for UniT: AdamW with a backbone group at ``lr_backbone`` (or MMF's
``adam_w_skip_params_with_zero_grad``), and the warmup-cosine schedule
(``mmf/modules/schedulers.py`` ``warmup_cosine``)."""

import math

import torch

OPTIMIZERS = ("adam_w", "adam_w_skip_params_with_zero_grad")


def param_groups(model, lr, lr_backbone, weight_decay, no_decay=()):
    """MMF's ``get_optimizer_parameters``: every trainable parameter at ``lr``, except the image
    backbone's (``unit_base_model.backbone``) at ``lr_backbone``.  Frozen parameters
    (``requires_grad`` False: ``training.freeze``, DETR's frozen stem) are left out.

    ``no_decay``: names of parameters put in a group of their own (same lr) with weight decay 0:
    the partly frozen task-token tables of ``training.freeze`` (``FreezeReport.no_decay``), whose
    masked rows must not be decayed.  Empty groups are dropped."""
    unused = set(no_decay) - {n for n, _ in model.named_parameters()}
    if unused:
        raise ValueError(f"param_groups: no_decay names no parameter of the model: {sorted(unused)}")
    # MMF's two groups first, in its order (a checkpoint's optimizer state lists groups by index),
    # then the no-decay ones.
    order = [("rest", False), ("backbone", False), ("rest", True), ("backbone", True)]
    groups = {key: [] for key in order}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if name.startswith("unit_base_model.backbone.") else "rest"
        groups[(part, name in no_decay)].append(p)
    return [{"params": groups[key], "lr": lr_backbone if key[0] == "backbone" else lr,
             "weight_decay": 0.0 if key[1] else weight_decay} for key in order if groups[key]]


class AdamWSkipParamsWithZeroGrad(torch.optim.AdamW):
    """MMF's ``adam_w_skip_params_with_zero_grad``: AdamW that leaves every parameter whose
    gradient is exactly zero untouched: no weight decay, no moment update, its step count not
    advanced.  Parameters with a gradient of None are skipped as by plain AdamW; everything else
    is torch's AdamW, value for value.

    Why: in multitask training the heads of the tasks not drawn in a step have no gradient, but
    under DDP (or after ``zero_grad(set_to_none=False)``) they can receive an all-zero one;
    plain AdamW would then still decay them and shrink their moments every step.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the gradients must exist before they are inspected
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if params:
            # One host sync for all parameters (not one per parameter).
            nonzero = torch.stack([p.grad.ne(0).any() for p in params]).tolist()
        else:
            nonzero = []
        hidden = [(p, p.grad) for p, nz in zip(params, nonzero, strict=True) if not nz]
        for p, _ in hidden:
            p.grad = None  # AdamW skips a parameter without a gradient entirely
        try:
            super().step()
        finally:
            for p, g in hidden:
                p.grad = g
        return loss


def build_optimizer(model, lr, lr_backbone, weight_decay, eps=1e-8, name="adam_w", no_decay=()):
    """``name`` (``training.optimizer``): ``adam_w`` (torch's AdamW) or
    ``adam_w_skip_params_with_zero_grad`` (``AdamWSkipParamsWithZeroGrad``); ``no_decay``: see
    ``param_groups``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"training.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    cls = torch.optim.AdamW if name == "adam_w" else AdamWSkipParamsWithZeroGrad
    return cls(param_groups(model, lr, lr_backbone, weight_decay, no_decay), lr=lr, eps=eps)


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
