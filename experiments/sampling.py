"""Task sampling at equal gradient steps: proportional, uniform, temperature, and CA-MTL's
uncertainty sampling at task level and at task + example level.

Setting: five 4-class tasks over the same inputs with very different training-set sizes
(``big_a``, ``big_b`` 20k; ``mid`` 1k; ``small`` 300; ``noisy`` 500 with 30% of its training
labels replaced by another class).  All five share the teacher's hidden layer (``tasks.py``), so
the small tasks can borrow the large ones' features.  One task per update (UniT's schedule),
batch 32, the same number of updates for every method.

Uncertainty, task level: every ``probe_every`` updates a no-grad probe batch per task gives its
mean normalised entropy ``u_t`` (``TaskKind.uncertainty``), and ``UncertaintySampler.update``
sets ``p_t ∝ r_t^(1-λ) u_t^λ`` (base ``r``: proportional).  Task + example level: in addition,
each update draws ``candidates * batch`` examples of its task, scores them without gradient and
keeps the ``batch`` most uncertain (``select_most_uncertain``).

Run: ``python -m experiments.sampling [--smoke] [--out DIR]`` -> ``sampling.json``, ``sampling.png``.
"""

import time

import numpy as np
import torch

from experiments.common import (
    Batches,
    Clock,
    evaluate,
    fmt,
    make_optimizer,
    mean_std,
    one_thread,
    parse_args,
    pyplot,
    run_grid,
    save_figure,
    seed_everything,
    task_loss,
    write_json,
)
from experiments.tasks import Teacher, classification_task, inputs
from experiments.tiny_unit import TinyUniT
from unit_fast.tasks import task_kind
from unit_fast.training.sampling import (
    TaskSampler,
    UncertaintySampler,
    select_most_uncertain,
    task_probabilities,
)

NAME = "sampling"
FULL = dict(seeds=[0, 1, 2, 3, 4], steps=3000, batch=32, lr=1e-3, val=2000, probe_every=50, probe_batch=64,
            sizes={"big_a": 20000, "big_b": 20000, "mid": 1000, "small": 300, "noisy": 500},
            noise={"noisy": 0.3}, windows=10)
SMOKE = dict(FULL, seeds=[0, 1], steps=60, val=200, probe_every=10, windows=3,
             sizes={"big_a": 2000, "big_b": 2000, "mid": 200, "small": 60, "noisy": 100})
SHAPE = dict(seq_len=4, features=8, hidden=16, classes=4)
METHODS = {  # name -> how its tasks (and examples) are drawn
    "proportional": dict(mode="proportional"),
    "uniform": dict(mode="uniform"),
    "temperature_T3": dict(mode="temperature", temperature=3.0),
    # The uncertainty samplers' base without the uncertainty: r^(1-λ) = size^0.5 at λ = 0.5.
    "temperature_T2": dict(mode="temperature", temperature=2.0),
    "uncertainty_task": dict(mode="uncertainty", base="proportional", lam=0.5),
    "uncertainty_task_example": dict(mode="uncertainty", base="proportional", lam=0.5, candidates=4),
}
CE = task_kind("text_classification")  # the library's normalised entropy of CE scores


def make_tasks(cfg, seed):
    """``{name: Task}``: the sizes of ``cfg``, one shared teacher hidden layer, data from ``seed``."""
    g = torch.Generator().manual_seed(1000 + seed)
    s, f, h, c = SHAPE["seq_len"], SHAPE["features"], SHAPE["hidden"], SHAPE["classes"]
    shared = Teacher(s * f, h, c, g)
    reference = inputs(20000, s, f, g)  # for balancing the classes
    tasks = {}
    for name, n in cfg["sizes"].items():
        teacher = Teacher(s * f, h, c, g, hidden_from=shared)
        teacher.balance(reference)
        tasks[name] = classification_task(name, teacher, inputs(n, s, f, g), inputs(cfg["val"], s, f, g), c,
                                          cfg["noise"].get(name, 0.0), gen=g)
    return tasks


@torch.no_grad()
def uncertainty(model, x, name):
    """``(B,)`` normalised entropy of the model's predictions on ``x (B, S, F)`` for task ``name``."""
    return CE.uncertainty({"scores": model(x, name)}, {"loss_type": "ce"})


def run(method, tasks, cfg, seed):
    """Train one model with ``method``; returns its val metrics, draw counts and timings."""
    spec = METHODS[method]
    seed_everything(seed)
    model = TinyUniT({n: t.num_outputs for n, t in tasks.items()}, SHAPE["seq_len"], SHAPE["features"])
    opt = make_optimizer(model, cfg["lr"])
    sizes = {n: t.size for n, t in tasks.items()}
    if spec["mode"] == "uncertainty":
        sampler = UncertaintySampler(task_probabilities(sizes, spec["base"]), spec["lam"], seed=seed)
    else:
        p = task_probabilities(sizes, spec["mode"], temperature=spec.get("temperature", 1.0))
        sampler = TaskSampler(p, seed=seed)
    batches, probes = Batches(tasks, seed), Batches(tasks, 10_000 + seed)
    names, b, steps = list(tasks), cfg["batch"], cfg["steps"]
    window = max(1, steps // cfg["windows"])
    draws = np.zeros((cfg["windows"], len(names)), dtype=int)  # (windows, tasks)
    u_sum = np.zeros((cfg["windows"], len(names)))  # probed uncertainty, summed per window
    u_count = np.zeros(cfg["windows"])
    clock = Clock()
    t0 = time.perf_counter()
    for step in range(steps):
        if spec["mode"] == "uncertainty" and step % cfg["probe_every"] == 0:
            with clock("probe"):
                sampler.update({n: uncertainty(model, probes.batch(n, cfg["probe_batch"])[0], n).mean().item()
                                for n in names})
            w = min(step // window, cfg["windows"] - 1)
            u_sum[w] += [sampler.u[n] for n in names]
            u_count[w] += 1
        ds = next(sampler)
        draws[min(step // window, cfg["windows"] - 1), names.index(ds)] += 1
        if "candidates" in spec:
            with clock("select"):
                x, y = batches.batch(ds, spec["candidates"] * b)  # (m*b, S, F), (m*b,)
                keep = select_most_uncertain(uncertainty(model, x, ds), b)  # (b,)
                x, y = x[keep], y[keep]
        else:
            x, y = batches.batch(ds, b)
        loss = task_loss(tasks[ds], model(x, ds), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    u = (u_sum / np.maximum(u_count, 1)[:, None]).T.tolist() if u_count.any() else None  # (tasks, windows)
    return {"metrics": evaluate(model, tasks), "draws": draws.tolist(), "seconds": seconds,
            "uncertainty_over_training": None if u is None else dict(zip(names, u, strict=True)),
            "probe_seconds": clock.seconds.get("probe", 0.0),
            "select_seconds": clock.seconds.get("select", 0.0)}


def summarize(runs, names):
    """Per method: each task's and the macro accuracy, draw shares and timings as mean ± std over seeds."""
    base_seconds = np.array([r["seconds"] for r in runs["proportional"]])
    base_macro = np.array([np.mean([r["metrics"][n] for n in names]) for r in runs["proportional"]])
    out = {}
    for method, rs in runs.items():
        acc = {n: mean_std([r["metrics"][n] for r in rs]) for n in names}
        macro = np.array([np.mean([r["metrics"][n] for n in names]) for r in rs])
        acc["macro"] = mean_std(macro)
        draws = np.array([r["draws"] for r in rs], dtype=float)  # (seeds, windows, tasks)
        share = draws.sum(1) / draws.sum((1, 2))[:, None]  # (seeds, tasks)
        share_t = draws / draws.sum(2, keepdims=True)  # (seeds, windows, tasks)
        seconds = np.array([r["seconds"] for r in rs])
        out[method] = {
            "accuracy": acc,
            "macro_gain_vs_proportional": mean_std(macro - base_macro),  # paired by seed
            "draw_share": {n: mean_std(share[:, i]) for i, n in enumerate(names)},
            "draw_share_over_training": {n: share_t[:, :, i].mean(0).tolist() for i, n in enumerate(names)},
            "seconds": mean_std(seconds),
            # Wall clock vs the same seed's proportional run: includes the shared machine's noise.
            "overhead_vs_proportional": mean_std(seconds / base_seconds - 1.0),
            # Probe + selection time over the run's other time: the method's own cost, measured in
            # the same run (less exposed to the machine's load changing between runs).
            "overhead_own": mean_std([(r["probe_seconds"] + r["select_seconds"])
                                      / (r["seconds"] - r["probe_seconds"] - r["select_seconds"])
                                      for r in rs]),
            "probe_seconds": mean_std([r["probe_seconds"] for r in rs]),
            "select_seconds": mean_std([r["select_seconds"] for r in rs]),
        }
        if rs[0]["uncertainty_over_training"] is not None:  # mean over seeds, per window
            out[method]["uncertainty_over_training"] = {
                n: np.mean([r["uncertainty_over_training"][n] for r in rs], 0).tolist() for n in names}
    return out


def plot(summary, names, cfg, out):
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    cols = names + ["macro"]
    width = 0.8 / len(summary)
    for k, (method, s) in enumerate(summary.items()):
        xs = np.arange(len(cols)) + (k - (len(summary) - 1) / 2) * width
        acc = s["accuracy"]
        ax.bar(xs, [acc[c]["mean"] for c in cols], width, yerr=[acc[c]["std"] for c in cols], capsize=2,
               label=method)
        share = s["draw_share_over_training"]["noisy"]
        ax2.plot((np.arange(len(share)) + 0.5) / len(share), share, marker="o", label=method)
    ax.axhline(1 / SHAPE["classes"], color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(cols)), [f"{c}\n({cfg['sizes'][c]})" if c in cfg["sizes"] else c for c in cols])
    ax.set_ylabel("clean val accuracy")
    ax.set_title(f"Task sampling, {cfg['steps']} updates, mean ± std over {len(cfg['seeds'])} seeds")
    ax.legend(fontsize=7, ncol=2)
    ax2.set_xlabel("fraction of training")
    ax2.set_ylabel("share of draws")
    ax2.set_title("draws of the 30%-noise task 'noisy'")
    ax2.legend(fontsize=7)
    save_figure(fig, out, NAME)


def main():
    args = parse_args(__doc__.splitlines()[0])
    one_thread()
    start = time.perf_counter()
    cfg = SMOKE if args.smoke else FULL
    runs = run_grid(cfg, METHODS, make_tasks, run,
                    lambda r: " ".join(f"{n}={v:.3f}" for n, v in r["metrics"].items()))
    names = list(cfg["sizes"])
    summary = summarize(runs, names)
    chance = {n: t.chance for n, t in make_tasks(cfg, cfg["seeds"][0]).items()}
    write_json(args.out, NAME, {"experiment": NAME, "smoke": args.smoke,
                                "wall_seconds": time.perf_counter() - start, "config": cfg, "shape": SHAPE,
                                "methods": METHODS, "baseline": "proportional", "chance_seed0": chance,
                                "summary": summary, "runs": runs})
    plot(summary, names, cfg, args.out)
    for method, s in summary.items():
        print(f"{method:26s} " + " ".join(f"{c}={fmt(s['accuracy'][c])}" for c in names + ["macro"])
              + f" overhead={fmt(s['overhead_vs_proportional'], 100, 0)}%"
              + f" own={fmt(s['overhead_own'], 100, 0)}%")


if __name__ == "__main__":
    main()
