"""Pieces every experiment uses: the command line, seeding, batches, one training update,
evaluation, mean ± std, and the JSON / PNG outputs."""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_OUT = Path(__file__).parent / "results"


def parse_args(description):
    """``--smoke`` (tiny sizes, < 1 minute, for CI) and ``--out DIR`` (default ``experiments/results``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, under a minute (CI)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    return p.parse_args()


def one_thread():
    """One intra-op thread: the machines these run on are small and shared, and one thread makes
    the timings comparable between methods."""
    torch.set_num_threads(1)


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


class Batches:
    """Seeded uniform draws of training indices, with replacement across batches (each batch
    drawn independently, as an infinite shuffled stream would give in expectation)."""

    def __init__(self, tasks, seed):
        self.tasks = tasks
        self.gen = torch.Generator().manual_seed(seed)

    def indices(self, name, n):
        """``(n,)`` int64 indices into task ``name``'s training set."""
        return torch.randint(0, self.tasks[name].size, (n,), generator=self.gen)

    def batch(self, name, n):
        """``(x (n, S, F), y (n,))`` of task ``name``."""
        i = self.indices(name, n)
        return self.tasks[name].x_train[i], self.tasks[name].y_train[i]


def task_loss(task, out, y):
    """The task's scalar loss: cross-entropy of ``out (B, C)`` or MSE of ``out (B, 1)``."""
    if task.loss == "ce":
        return F.cross_entropy(out, y)
    return F.mse_loss(out[:, 0], y)


def make_optimizer(model, lr, extra_group=None):
    """AdamW (UniT's optimizer) over the model, plus a loss weighting's own param group."""
    groups = [{"params": list(model.parameters())}]
    if extra_group is not None:
        groups.append(extra_group)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)


@torch.no_grad()
def evaluate(model, tasks, batch_size=1024):
    """``{task: metric}`` on the clean val sets: accuracy (``ce``) or R^2 (``mse``)."""
    model.eval()
    metrics = {}
    for name, task in tasks.items():
        out = torch.cat([model(task.x_val[i:i + batch_size], name)
                         for i in range(0, task.x_val.shape[0], batch_size)])  # (N, C)
        if task.loss == "ce":
            metrics[name] = (out.argmax(1) == task.y_val).float().mean().item()
        else:
            mse = F.mse_loss(out[:, 0], task.y_val).item()
            metrics[name] = 1.0 - mse / task.y_val.var().item()
    model.train()
    return metrics


def mean_std(values):
    """``{"mean", "std", "values"}`` of a list of floats (std: sample std, ddof = 1; 0 for one)."""
    v = np.asarray(values, dtype=float)
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "values": [float(x) for x in v]}


def fmt(stat, scale=100.0, digits=1):
    """``"mean ± std"`` of a ``mean_std`` dict (accuracies as percentages by default)."""
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def all_finite(obj):
    """Whether every number in a JSON-like object is finite."""
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


class Clock:
    """Wall-clock seconds accumulated under named keys: ``with clock("probe"): ...``."""

    def __init__(self):
        self.seconds = {}
        self._key = None

    def __call__(self, key):
        self._key = key
        return self

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self._key] = self.seconds.get(self._key, 0.0) + time.perf_counter() - self._t0


def write_json(out, name, obj):
    """Write ``out/<name>.json`` and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(obj, indent=1) + "\n")
    return path


def save_figure(fig, out, name, dpi=90):
    """Write ``out/<name>.png`` (a low dpi keeps the committed file near 100 KB)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_grid(cfg, variants, make_tasks, run, describe):
    """``{variant: [run result per seed]}``: for each seed of ``cfg["seeds"]`` the tasks are made
    once (the same data and initialisation for every variant of a seed), then every variant runs
    on them in order; ``describe(result)`` is the progress line's tail."""
    runs = {v: [] for v in variants}
    for seed in cfg["seeds"]:
        tasks = make_tasks(cfg, seed)
        for v in variants:
            r = run(v, tasks, cfg, seed)
            runs[v].append(r)
            print(f"seed {seed} {v:26s} {r['seconds']:6.1f}s {describe(r)}", flush=True)
    return runs
