"""Loss weighting (fixed, uncertainty, dwa, rlw) at one task per update, and gradient aggregation
(mean, upgrad, mgda, pcgrad, cagrad) with every task in every update.

Setting: three tasks over the same inputs whose losses differ in scale: ``cls4`` (4 classes,
20k), ``cls16`` (16 classes, 5k; cross-entropy starts near log 16) and ``reg`` (regression,
5k, targets of std 10: MSE starts near 100).  All three share the teacher's hidden layer, so
they cooperate through the shared encoder and decoder.

Part A, ``tasks_per_step: 1`` (UniT's schedule): uniform task sampling, each update's loss
weighted by ``build_loss_weighting`` (``start``, ``weigh``, ``observe``; the uncertainty
weighting's log-variances are their own optimizer group; at ``training.lr`` and, as a variant,
at 0.05).  Control: ``fixed`` with the regression targets rescaled to std 1 by hand (what a
weighting should match).  Part B, ``tasks_per_step = 3``: each
update computes every task's loss, the rows ``J (3, P)`` are the per-task gradients of the
shared parameters (``flat_grads``), and ``Aggregator.aggregate(J)`` gives the update
(``set_flat_grads``); task-specific parameters (queries, heads) keep their own task's gradient.
Part B runs a third of part A's updates, so both see the same number of examples.

Run: ``python -m experiments.weighting [--smoke] [--out DIR]`` -> ``weighting.json``, ``weighting.png``.
"""

import time

import numpy as np
import torch

from experiments.common import (
    Batches,
    evaluate,
    fmt,
    make_optimizer,
    mean_std,
    one_thread,
    parse_args,
    pyplot,
    save_figure,
    seed_everything,
    task_loss,
    write_json,
)
from experiments.tasks import Teacher, classification_task, inputs, regression_task
from experiments.tiny_unit import TinyUniT
from unit_fast.training.aggregation import Aggregator, flat_grads, set_flat_grads
from unit_fast.training.loss_weighting import build_loss_weighting
from unit_fast.training.sampling import TaskSampler, task_probabilities

NAME = "weighting"
FULL = dict(seeds=[0, 1, 2], steps=3000, batch=32, lr=1e-3, val=2000, reg_scale=10.0,
            sizes={"cls4": 20000, "cls16": 5000, "reg": 5000})
SMOKE = dict(FULL, seeds=[0, 1], steps=30, val=200, sizes={"cls4": 2000, "cls16": 500, "reg": 500})
SHAPE = dict(seq_len=4, features=8, hidden=16)
CLASSES = {"cls4": 4, "cls16": 16}
WEIGHTINGS = {  # name -> (training.loss_weighting, training.uncertainty.lr (None: training.lr))
    "fixed": ("fixed", None),
    "uncertainty": ("uncertainty", None),
    "uncertainty_lr0.05": ("uncertainty", 0.05),  # log-variances that can move ~50x faster
    "dwa": ("dwa", None),
    "rlw": ("rlw", None),
    "fixed_reg_std1": ("fixed", None),  # control: the regression targets rescaled to std 1 by hand
}
AGGREGATORS = ("mean", "upgrad", "mgda", "pcgrad", "cagrad")


def make_tasks(cfg, seed):
    """``{name: Task}``: two classification tasks and one regression task, one shared hidden layer."""
    g = torch.Generator().manual_seed(2000 + seed)
    s, f, h = SHAPE["seq_len"], SHAPE["features"], SHAPE["hidden"]
    shared = Teacher(s * f, h, 1, g)
    reference = inputs(20000, s, f, g)
    tasks = {}
    for name, n in cfg["sizes"].items():
        teacher = Teacher(s * f, h, CLASSES.get(name, 1), g, hidden_from=shared)
        x_train, x_val = inputs(n, s, f, g), inputs(cfg["val"], s, f, g)
        if name in CLASSES:
            teacher.balance(reference)
            tasks[name] = classification_task(name, teacher, x_train, x_val, CLASSES[name])
        else:
            tasks[name] = regression_task(name, teacher, x_train, x_val, cfg["reg_scale"], reference)
    return tasks


def new_model(tasks, seed):
    seed_everything(seed)
    return TinyUniT({n: t.num_outputs for n, t in tasks.items()}, SHAPE["seq_len"], SHAPE["features"])


def run_weighting(name, tasks, cfg, seed):
    """Part A: one uniformly drawn task per update, its loss weighted by ``WEIGHTINGS[name]``."""
    model = new_model(tasks, seed)
    method, uncertainty_lr = WEIGHTINGS[name]
    t = {"loss_weighting": method, "uncertainty": {"lr": uncertainty_lr},
         "dwa": {"temperature": 2.0, "window": 20}, "seed": seed, "lr": cfg["lr"]}
    weighting = build_loss_weighting(t, list(tasks), "cpu")
    opt = make_optimizer(model, cfg["lr"], weighting.param_group())
    sampler = TaskSampler(task_probabilities({n: x.size for n, x in tasks.items()}, "uniform"), seed=seed)
    batches = Batches(tasks, seed)
    t0 = time.perf_counter()
    for step in range(1, cfg["steps"] + 1):
        weighting.start(step)
        ds = next(sampler)
        x, y = batches.batch(ds, cfg["batch"])
        loss = task_loss(tasks[ds], model(x, ds), y)
        opt.zero_grad(set_to_none=True)
        weighting.weigh(ds, loss).backward()
        opt.step()
        weighting.observe({ds: loss.detach()})
    return {"metrics": evaluate(model, tasks), "seconds": time.perf_counter() - t0,
            "final_weights": weighting.weights()}


def run_aggregator(name, tasks, cfg, seed):
    """Part B: every task in every update; the shared parameters' update is ``name``'s aggregate
    of the per-task gradients."""
    model = new_model(tasks, seed)
    opt = make_optimizer(model, cfg["lr"])
    aggregator = Aggregator(name)
    shared = model.shared_parameters()
    batches = Batches(tasks, seed)
    cosines = []  # mean pairwise cosine of the task gradients: how much they conflict
    t0 = time.perf_counter()
    for step in range(cfg["steps"] // len(tasks)):
        opt.zero_grad(set_to_none=True)
        rows = []
        for ds in tasks:
            x, y = batches.batch(ds, cfg["batch"])
            task_loss(tasks[ds], model(x, ds), y).backward()  # own params: only this task reaches them
            rows.append(flat_grads(shared))  # (P,)
            for p in shared:
                p.grad = None
        J = torch.stack(rows)  # (T, P)
        set_flat_grads(shared, aggregator.aggregate(J))
        opt.step()
        if step % 50 == 0:
            u = torch.nn.functional.normalize(J, dim=1)
            c = u @ u.T  # (T, T)
            cosines.append(c[~torch.eye(len(rows), dtype=torch.bool)].mean().item())
    return {"metrics": evaluate(model, tasks), "seconds": time.perf_counter() - t0,
            "mean_grad_cosine": float(np.mean(cosines))}


def summarize(runs, names):
    out = {}
    for method, rs in runs.items():
        s = {"metric": {n: mean_std([r["metrics"][n] for r in rs]) for n in names},
             "seconds": mean_std([r["seconds"] for r in rs])}
        if "final_weights" in rs[0]:
            s["final_weights"] = {n: mean_std([r["final_weights"][n] for r in rs]) for n in names}
        if "mean_grad_cosine" in rs[0]:
            s["mean_grad_cosine"] = mean_std([r["mean_grad_cosine"] for r in rs])
        out[method] = s
    return out


def plot(summary, names, cfg, out):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(13, 3.6))
    methods = list(summary)
    colors = ["C0"] * len(WEIGHTINGS) + ["C1"] * len(AGGREGATORS)
    for ax, n in zip(axes, names, strict=True):
        m = [summary[k]["metric"][n]["mean"] for k in methods]
        e = [summary[k]["metric"][n]["std"] for k in methods]
        ax.bar(range(len(methods)), m, yerr=e, capsize=2, color=colors)
        lo = min(v - d for v, d in zip(m, e, strict=True))
        ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(m) + 0.05))
        ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=8)
        ax.set_title(f"{n} ({'R²' if n == 'reg' else 'accuracy'})")
    fig.suptitle(f"Loss weighting (blue: 1 task/update, {cfg['steps']} updates) and aggregation "
                 f"(orange: 3 tasks/update, {cfg['steps'] // 3} updates); "
                 f"mean ± std over {len(cfg['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out, NAME)


def main():
    args = parse_args(__doc__.splitlines()[0])
    one_thread()
    start = time.perf_counter()
    cfg = SMOKE if args.smoke else FULL
    runs = {m: [] for m in (*WEIGHTINGS, *AGGREGATORS)}
    for seed in cfg["seeds"]:
        tasks = make_tasks(cfg, seed)
        rescaled = make_tasks(dict(cfg, reg_scale=1.0), seed)  # the same inputs and teachers; R^2 unchanged
        for m in runs:
            fn = run_weighting if m in WEIGHTINGS else run_aggregator
            runs[m].append(fn(m, rescaled if m == "fixed_reg_std1" else tasks, cfg, seed))
            r = runs[m][-1]
            print(f"seed {seed} {m:12s} {r['seconds']:6.1f}s "
                  + " ".join(f"{n}={v:.3f}" for n, v in r["metrics"].items()), flush=True)
    names = list(cfg["sizes"])
    summary = summarize(runs, names)
    write_json(args.out, NAME, {"experiment": NAME, "smoke": args.smoke,
                                "wall_seconds": time.perf_counter() - start, "config": cfg, "shape": SHAPE,
                                "baseline": "fixed", "aggregation_baseline": "mean",
                                "chance": {"cls4": 0.25, "cls16": 1 / 16, "reg": 0.0},
                                "summary": summary, "runs": runs})
    plot(summary, names, cfg, args.out)
    for m, s in summary.items():
        print(f"{m:12s} " + " ".join(f"{n}={fmt(s['metric'][n])}" for n in names))


if __name__ == "__main__":
    main()
