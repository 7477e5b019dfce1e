"""``training.freeze``: which parameters of a UniT stay fixed while the rest train.

Entries are ``fnmatch`` patterns on ``named_parameters()`` names (``unit_base_model.backbone.*``)
or one of the presets:

  ``backbone``  the image backbone: ``unit_base_model.backbone.*`` (the ResNet; its position
                encoding has no parameters).
  ``encoders``  the two encoders, up to their own width: ``backbone`` plus
                ``unit_base_model.input_proj.*`` (backbone channels -> image encoder width),
                ``unit_base_model.transformer.encoder.*`` (the image encoder's layers) and
                ``bert_model.*`` (BERT: embeddings and layers).  Not frozen: the projections to
                the decoder width (``enc2dec_proj``, ``pos_embed_proj``, ``bert_projection``,
                ``bert_pos_projection``), the decoder(s), the task tokens and the heads.
  ``shared``    everything except the parameters registered to the datasets being trained
                (``UniT.dataset_parameters()``): adding a task to a trained model without
                moving any output of the old ones.

Frozen parameters get ``requires_grad_(False)``: no gradient, and ``param_groups`` leaves them out
of the optimizer, so they stay bitwise unchanged.  A shared table of which only some rows are
trained (MMF's task-token tables under ``shared``: row ``task_idx`` per dataset) stays trainable;
a gradient hook zeroes its frozen rows and the optimizer puts it in a group without weight decay
(``FreezeReport.no_decay``), which keeps those rows bitwise unchanged under AdamW (see
``_mask_rows``).  Two datasets that share a row share its training too.

BatchNorm layers whose parameters are all frozen also stop updating their running statistics
(they run in eval mode, ``_freeze_norm_statistics``): otherwise a frozen ``backbone_norm:
batch_norm`` backbone would still change the old tasks' outputs through its buffers.
"""

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

PRESETS = {
    "backbone": ("unit_base_model.backbone.*",),
    "encoders": ("unit_base_model.backbone.*", "unit_base_model.input_proj.*",
                 "unit_base_model.transformer.encoder.*", "bert_model.*"),
}
SHARED = "shared"


@dataclass
class FreezeReport:
    """What ``freeze`` did.  ``frozen``: ``{entry: parameters it froze}`` (a parameter that
    another entry already froze counts for the first); ``masked``: ``{parameter name: trainable
    rows}`` of the partly trained tables; ``no_decay``: those tables' names (the optimizer
    groups them without weight decay); ``trainable``: parameters left trainable;
    ``norms_in_eval``: BatchNorm layers whose running statistics are frozen with them."""

    frozen: dict = field(default_factory=dict)
    masked: dict = field(default_factory=dict)
    trainable: int = 0
    norms_in_eval: int = 0

    @property
    def no_decay(self):
        return tuple(self.masked)

    def log_record(self):
        return {"frozen": dict(self.frozen), "frozen_total": sum(self.frozen.values()),
                "masked_rows": {k: list(v) for k, v in self.masked.items()}, "trainable": self.trainable,
                "norms_in_eval": self.norms_in_eval}

    def __str__(self):
        parts = [f"{entry}: {n}" for entry, n in self.frozen.items()]
        masked = "".join(f"; {name} trains rows {rows} only" for name, rows in self.masked.items())
        total = sum(self.frozen.values())
        return (f"training.freeze froze {total} parameters ({', '.join(parts)}){masked}; "
                f"{self.trainable} trainable")


def _shared_split(model, names, trained):
    """``(frozen names, {table name: trainable rows})`` of the ``shared`` preset."""
    per_dataset = model.dataset_parameters()
    unknown = [ds for ds in trained if ds not in per_dataset]
    if unknown:
        raise ValueError(f"training.freeze: shared: the model has no dataset {unknown}; "
                         f"it has {sorted(per_dataset)}")
    whole, rows = set(), {}
    for ds in trained:
        for name, row in per_dataset[ds]:
            if row is None:
                whole.add(name)
            else:
                rows.setdefault(name, set()).add(int(row))
    rows = {name: sorted(r) for name, r in rows.items() if name not in whole}
    return [n for n in names if n not in whole and n not in rows], rows


def _mask_rows(param, rows):
    """Zero the gradient of every row of ``param`` but ``rows``, before it accumulates (so DDP
    averages the masked gradient too).  With a zero gradient AdamW's moments of those rows stay
    exactly zero (a fresh optimizer starts them at zero), so its update ``lr * m / (sqrt(v) + eps)`` is exactly
    zero, and without weight decay (the table's optimizer group has none) nothing else moves
    them: zero grad + zero moments + no decay = no change, bitwise."""
    keep = torch.zeros(param.shape[0], *([1] * (param.dim() - 1)), dtype=torch.bool, device=param.device)
    keep[rows] = True
    # masked_fill, not a multiply: a NaN or inf in a frozen row's gradient must not get through.
    return param.register_hook(lambda grad: grad.masked_fill(~keep, 0))


def _freeze_norm_statistics(model):
    """Run every BatchNorm whose parameters are all frozen in eval mode (its running statistics
    stay as they are): a forward pre-hook, because ``model.train()`` is called every step."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.register_forward_pre_hook(_eval_mode)
                count += 1
    return count


def _eval_mode(module, args):
    module.train(False)


def freeze(model, entries, trained_datasets=()):
    """Freeze ``model``'s parameters named by ``entries`` (``training.freeze``: patterns and
    presets, module docstring); ``trained_datasets``: the datasets being trained (what
    ``shared`` keeps trainable).  An entry that matches no parameter is a ValueError naming
    ``training.freeze``.  Returns a ``FreezeReport``; pass its ``no_decay`` to
    ``build_optimizer``."""
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
        raise ValueError(f"training.freeze must be a list of parameter patterns and presets "
                         f"({', '.join([*PRESETS, SHARED])}), got {entries!r}")
    params = dict(model.named_parameters())
    names = list(params)
    report = FreezeReport()
    frozen, masked = set(), {}
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"training.freeze: entries are pattern strings, got {entry!r}")
        if entry == SHARED:
            matched, rows = _shared_split(model, names, trained_datasets)
            masked.update(rows)
        else:
            patterns = PRESETS.get(entry, (entry,))
            matched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
            if not matched:
                presets = ", ".join([*PRESETS, SHARED])
                raise ValueError(f"training.freeze: {entry!r} matches no parameter name (presets: {presets}; "
                                 "or a pattern such as unit_base_model.backbone.*)")
        new = [n for n in matched if n not in frozen and params[n].requires_grad]
        frozen.update(matched)
        report.frozen[entry] = len(new)
    report.trainable = sum(p.requires_grad and n not in frozen for n, p in params.items())
    if not report.trainable:  # checked before anything changes: the model is left as it was
        raise ValueError(f"training.freeze: {list(entries)} freezes every parameter; nothing would train")
    for name in frozen:
        params[name].requires_grad_(False)
    for name, rows in masked.items():
        if name not in frozen and params[name].requires_grad:  # another entry may freeze it whole
            _mask_rows(params[name], rows)
            report.masked[name] = rows
    report.norms_in_eval = _freeze_norm_statistics(model)
    return report
