"""The evaluation loop shared by the trainer and ``python -m unit_fast.evaluate``: every val dataset
scored by its headline metric, the synthetic dataset's chance levels, and the per-task table."""

import json
import os

import torch
import torch.distributed as dist

from unit_fast.training.batches import to_device


def _kind(ds, kinds=None):
    """The ``TaskKind`` of ``ds``: from ``kinds`` (``{dataset: TaskKind}``, a run's), else the
    built-in row's; None for an unknown dataset."""
    from unit_fast.tasks import BUILTIN_DATASETS, task_kind

    if kinds and ds in kinds:
        return kinds[ds]
    name = BUILTIN_DATASETS.get(ds, {}).get("kind")
    return None if name is None else task_kind(name)


def headline(ds, kinds=None):
    """The headline metric's name of dataset ``ds`` (its kind's: AP50 for detection)."""
    kind = _kind(ds, kinds)
    return "accuracy" if kind is None else kind.headline


def chance_levels(root, kinds=None):
    """``{dataset: chance of the headline metric}`` from the synthetic dataset's summary.json
    (``root`` None or without one: ``{}``), for the built-in datasets (or those of ``kinds``)."""
    from unit_fast.tasks import BUILTIN_DATASETS

    path = None if root is None else os.path.join(root, "summary.json")
    if path is None or not os.path.exists(path):
        return {}
    with open(path) as f:
        summary = json.load(f)
    out = {}
    for ds, row in BUILTIN_DATASETS.items():
        if kinds is not None and ds not in kinds:
            continue
        chance = _kind(ds, kinds).chance(summary.get(row["summary"]))
        if chance is not None:
            out[ds] = chance
    return out


@torch.no_grad()
def evaluate_datasets(model, data, cfg, device, rank=0, world=1, batch_size=None, datasets=None):
    """Headline metrics on every val dataset of ``data`` (a ``RunData``), or on ``datasets`` (names)
    only, each by its kind's evaluator: detection AP / AP50 / AP75 (pycocotools), VQA soft
    accuracy, accuracy elsewhere.
    Returns ``{dataset: {metric: float}}``.  Under DDP each rank scores its share; rank 0 merges."""
    from unit_fast.data.datasets import BatchCollator

    distributed = world > 1 and dist.is_initialized()
    was_training = model.training
    model.eval()
    bs = batch_size or max(1, cfg["training"]["batch_size"] // world)
    results = {}
    for ds, dataset in data.val.items():
        if datasets is not None and ds not in datasets:
            continue
        kind = data.kinds[ds]
        ev = kind.evaluator(ds, dataset, data.dataset_info.get(ds, {}))
        collate = BatchCollator(ds, decoder=cfg["data"]["decoder"], dataset_type="val",
                                on_error=cfg["data"]["on_error"])
        indices = list(range(rank, len(dataset), world))
        for start in range(0, len(indices), bs):
            idx = indices[start:start + bs]
            batch = to_device(collate([dataset[i] for i in idx]), device)
            # Targets go to the evaluator only.  With targets the model would also compute the
            # training losses, and the detection loss all-reduces num_boxes over ranks: a
            # collective that hangs when ranks hold different numbers of val batches.
            out = model({k: v for k, v in batch.items() if k != "targets"})
            kind.eval_update(ev, out, batch, dataset)
        if distributed:
            states = [None] * world
            dist.all_gather_object(states, ev.state())
            for st in states[1:] if rank == 0 else []:
                ev.merge(st)
        results[ds] = ev.compute()
    model.train(was_training)
    return results


def targets_met(results, targets, kinds=None):
    """``{dataset: bool}`` for every dataset with a target: its headline metric >= the target."""
    return {ds: results[ds].get(headline(ds, kinds), float("nan")) >= float(t)
            for ds, t in (targets or {}).items() if ds in results}


def format_table(results, chance, targets=None, kinds=None):
    """The per-task table: task, headline metric, chance level, result; with ``targets``
    (``{dataset: minimum}``) also each target and whether it was met."""
    header = ("task", "metric", "chance", "result") + (("target", "met") if targets else ())
    rows = [header]
    met = targets_met(results, targets, kinds)
    for ds, metrics in results.items():
        name = headline(ds, kinds)
        c = chance.get(ds)
        row = (ds, name, "-" if c is None else f"{c:.3f}", f"{metrics.get(name, float('nan')):.3f}")
        if targets:
            t = targets.get(ds)
            row += ("-", "-") if t is None else (f"{float(t):.3f}", "yes" if met[ds] else "NO")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
