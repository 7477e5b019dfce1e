"""What a training run reports: ``log.jsonl``, TensorBoard scalars, and PNG plots at the end.

``RunLog`` writes each record as one JSON line of ``<output>/log.jsonl`` and as scalars of a
TensorBoard event file under ``<output>/tensorboard/`` (``torch.utils.tensorboard``).  Only rank 0
writes; other ranks hold a disabled ``RunLog``.  Every record has ``step`` and ``event``:

  ``train``        ``tasks`` (names drawn for the update), ``loss`` (the update's objective: the
                   mean micro-batch loss, averaged over ranks), ``task_loss`` ``{dataset: loss}``,
                   ``losses`` ``{"train/<dataset>/<term>": value}`` (each a mean over the update's
                   micro-batches of that dataset), ``lr``, ``samples_per_s`` (since the last record)
  ``eval``         ``metrics`` ``{dataset: {metric: value}}``
  ``epoch``        ``dataset``, ``epoch``, ``skipped_images`` (a dataset's stream finished an epoch)
  ``nan_skipped``  ``tasks``, ``message``
  ``init_from``    ``path``, ``missing``, ``unexpected``, ``renamed``, ``dropped``, ``reinitialized``
                  (head keys not loaded because their shapes differ: a new class count)
  ``freeze``       ``frozen`` (parameters per ``training.freeze`` entry), ``frozen_total``,
                  ``masked_rows``, ``trainable``, ``norms_in_eval``
  ``resume``       ``checkpoint`` (the file a resumed run continues from; ``step`` its step)
  ``skipped_records``  ``skipped_records`` ``{dataset: count}``: annotation records the readers
                   skipped (``data.on_error: skip``), written once at the start when any were
  ``final``        ``skipped_steps``, ``skipped_images`` and ``skipped_records`` ``{dataset: count}``

TensorBoard tags: ``loss/total``, ``loss/<dataset>``, each loss term by its key, ``lr``,
``samples_per_s``, ``eval/<dataset>/<metric>``, ``skipped_images/<dataset>``.

``plot_log`` draws ``loss_per_task.png`` and ``metrics.png`` from ``log.jsonl`` with matplotlib's
object API (a ``Figure`` renders with Agg without pyplot, so no global backend is switched).
"""

import json
import math
import os

from unit_fast.atomic import atomic_write


def read_log(path):
    """The records of a ``log.jsonl``; a line that does not parse (the last line of a run killed
    while writing it) is dropped."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def truncate_log(path, step):
    """Keep the records up to ``step`` (a resumed run's checkpoint) so the steps a killed run
    logged after its last checkpoint are not in the log twice.  Rewritten atomically."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_log(path) if r["step"] <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept), binary=False)


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def tensorboard_scalars(record):
    """``[(tag, value), ...]``: the TensorBoard scalars of one record."""
    event = record.get("event")
    if event == "train":
        out = [("loss/total", record["loss"]), ("lr", record["lr"]),
               ("samples_per_s", record["samples_per_s"])]
        out += [(f"loss/{ds}", v) for ds, v in record["task_loss"].items()]
        out += list(record["losses"].items())
        out += [(f"experts/{ds}/{layer}/{e}", share) for ds, layers in record.get("expert_usage", {}).items()
                for layer, shares in layers.items() for e, share in enumerate(shares)]
    elif event == "eval":
        out = [(f"eval/{ds}/{name}", v) for ds, metrics in record["metrics"].items()
               for name, v in metrics.items()]
    elif event == "epoch":
        out = [(f"skipped_images/{record['dataset']}", record["skipped_images"])]
    else:
        out = []
    return [(tag, float(v)) for tag, v in out if _number(v)]


class RunLog:
    """``log.jsonl`` + TensorBoard of a run in ``output_dir``.

    Args:
        enabled: False on ranks other than 0: every call does nothing.
        resume_step: the step of the checkpoint a resumed run starts from: later records are
            dropped from ``log.jsonl`` and TensorBoard hides later events (``purge_step``).
    """

    def __init__(self, output_dir, enabled=True, resume_step=None):
        self.path = os.path.join(output_dir, "log.jsonl")
        self.tensorboard_dir = os.path.join(output_dir, "tensorboard")
        self.enabled = enabled
        self._purge_step = None if resume_step is None else resume_step + 1
        self._writer = None
        if enabled and resume_step is not None:
            truncate_log(self.path, resume_step)

    def _tb(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.tensorboard_dir, purge_step=self._purge_step)
        return self._writer

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        scalars = tensorboard_scalars(record)
        if scalars:
            writer = self._tb()
            for tag, value in scalars:
                writer.add_scalar(tag, value, record["step"])

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _series(records, event, values):
    """``{name: ([steps], [values])}`` over the records of ``event``; ``values(record)`` gives
    ``{name: value}``."""
    out = {}
    for r in records:
        if r.get("event") != event:
            continue
        for name, v in values(r).items():
            if _number(v):
                steps, ys = out.setdefault(name, ([], []))
                steps.append(r["step"])
                ys.append(v)
    return out


def plot_log(log_path, plots_dir):
    """Draw ``loss_per_task.png`` (each task's training loss, and the total, over steps) and
    ``metrics.png`` (one panel per dataset: its eval metrics over steps) into ``plots_dir`` from
    the records of ``log_path``.  Returns the two paths."""
    from matplotlib.figure import Figure

    records = read_log(log_path)
    os.makedirs(plots_dir, exist_ok=True)

    losses = _series(records, "train", lambda r: {**r["task_loss"], "total": r["loss"]})
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for name, (steps, ys) in sorted(losses.items(), key=lambda kv: kv[0] == "total"):
        style = {"color": "black", "linestyle": "--", "linewidth": 1} if name == "total" else {}
        ax.plot(steps, ys, marker="." if len(steps) < 50 else None, label=name, **style)
    if losses and all(y > 0 for _, ys in losses.values() for y in ys):
        ax.set_yscale("log")  # losses of different tasks differ by orders of magnitude
    ax.set(xlabel="step", ylabel="training loss", title="loss per task")
    if losses:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no training steps logged", ha="center", va="center", transform=ax.transAxes)
    loss_path = os.path.join(plots_dir, "loss_per_task.png")
    atomic_write(loss_path, lambda f: fig.savefig(f, format="png", dpi=100))

    datasets = list(dict.fromkeys(ds for r in records if r.get("event") == "eval" for ds in r["metrics"]))
    cols = max(1, min(3, len(datasets)))
    rows = max(1, math.ceil(len(datasets) / cols))
    fig = Figure(figsize=(4.5 * cols, 3.5 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, ds in zip(axes, datasets, strict=False):
        for name, (steps, ys) in _series(records, "eval", lambda r, ds=ds: r["metrics"].get(ds, {})).items():
            ax.plot(steps, ys, marker="o", label=name)
        ax.set(xlabel="step", title=ds)
        ax.legend(fontsize="small")
    for ax in axes[len(datasets):]:
        ax.set_axis_off()
    if not datasets:
        axes[0].text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=axes[0].transAxes)
    metrics_path = os.path.join(plots_dir, "metrics.png")
    atomic_write(metrics_path, lambda f: fig.savefig(f, format="png", dpi=100))
    if any("expert_usage" in r for r in records):
        plot_expert_usage(records, os.path.join(plots_dir, "expert_usage.png"))
    return loss_path, metrics_path


def plot_expert_usage(records, path):
    """``model.moe``: one heatmap per MoE layer, datasets x experts, of the mean share of each
    dataset's slots that each expert took over the run's train records (which experts each task
    uses: specialisation shows as bright cells off a uniform grey)."""
    import numpy as np
    from matplotlib.figure import Figure

    shares = {}  # {layer: {dataset: [per-record share lists]}}
    for r in records:
        for ds, layers in r.get("expert_usage", {}).items() if r.get("event") == "train" else ():
            for layer, s in layers.items():
                shares.setdefault(layer, {}).setdefault(ds, []).append(s)
    layers = sorted(shares)
    height = 0.6 * max(len(v) for v in shares.values()) + 2
    fig = Figure(figsize=(5 * len(layers), height), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False).ravel()
    for ax, layer in zip(axes, layers, strict=True):
        names = sorted(shares[layer])
        grid = np.array([np.mean(shares[layer][ds], axis=0) for ds in names])  # (datasets, E)
        image = ax.imshow(grid, vmin=0.0, vmax=max(1e-9, float(grid.max())), cmap="viridis", aspect="auto")
        ax.set(yticks=range(len(names)), yticklabels=names, xlabel="expert",
               title=layer.replace("unit_base_model.", ""))
        fig.colorbar(image, ax=ax, label="share of the dataset's slots")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path
