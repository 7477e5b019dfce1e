"""Task-conditioned decoder modules (CA-MTL) against a shared and against separate decoders, on
tasks whose labels conflict on the same inputs: accuracy vs added parameters.

Setting: four 4-class tasks on the *same* training inputs.  ``a`` is labelled by a random
teacher on ``x`` and ``a_neg`` by the same teacher on ``-x``; ``b`` / ``b_neg`` likewise with a
second teacher.  The teachers are ReLU networks with biases (not odd), so ``a_neg``'s label is
not a relabelling of ``a``'s that the per-task linear heads could undo: on one input the pair
wants different features from the shared decoder, and its layers must serve both (interference).
A per-task sign or scale of the normalised features (a conditional layer norm's ``gamma``) is
what would separate them.  The model is deliberately narrow (``MODEL``): with room for every
task's features there was no interference to remove (a 32-wide decoder: shared = separate).

Variants (``model.conditioning`` sections of ``unit_fast.models.conditioning.TaskConditioning``,
``task_dim`` 16): none (UniT's shared decoder), CLN table, CLN hypernetwork, + attention bias,
+ adapters, + memory alignment (all of CA-MTL's decoder-side modules), and one decoder per task
(UniT's ``share_decoders: false``).  Added parameters: ``parameter_count`` (checked against the
module), or the extra decoders' parameters.  Uniform task sampling, one task per update.

Run: ``python -m experiments.conditioning [--smoke] [--out DIR]``
-> ``conditioning.json``, ``conditioning.png``.
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
    run_grid,
    save_figure,
    seed_everything,
    task_loss,
    write_json,
)
from experiments.tasks import Teacher, classification_task, inputs
from experiments.tiny_unit import TinyUniT, count_parameters
from unit_fast.models.conditioning import TaskConditioning, parameter_count
from unit_fast.training.sampling import TaskSampler, task_probabilities

NAME = "conditioning"
FULL = dict(seeds=[0, 1, 2, 3, 4], steps=4000, batch=32, lr=1e-3, train=8000, val=2000)
SMOKE = dict(FULL, seeds=[0, 1], steps=30, train=500, val=200)
SHAPE = dict(seq_len=4, features=8, hidden=8, classes=4)
# d_model 8 < the input's 32 numbers: the decoder's attention values (one shared projection of each
# token) cannot carry what both teachers need, so the tasks compete for them.  No encoder layer: the
# decoder does all the nonlinear work, so the shared part that the variants condition is the bottleneck.
MODEL = dict(d_model=8, nhead=2, dim_feedforward=16, enc_layers=0, dec_layers=2, num_queries=4)
HYPER = {"task_dim": 16, "layer_norm": "hypernetwork"}
VARIANTS = {  # name -> model.conditioning section (None: no conditioning module)
    "none": None,
    "cln_table": {"task_dim": 16, "layer_norm": "table"},
    "cln_hypernetwork": HYPER,
    "+attention_bias": {**HYPER, "attention_bias": True, "attention_block": 4},
    "+adapters": {**HYPER, "attention_bias": True, "attention_block": 4, "adapters": True},
    "+alignment_memory": {**HYPER, "attention_bias": True, "attention_block": 4, "adapters": True,
                          "alignment": "memory"},
    "separate_decoders": "separate",
}
TASKS = ("a", "a_neg", "b", "b_neg")


def make_tasks(cfg, seed):
    """``{name: Task}``: two teachers, each labelling the shared inputs ``x`` and ``-x``."""
    g = torch.Generator().manual_seed(3000 + seed)
    s, f, h, c = SHAPE["seq_len"], SHAPE["features"], SHAPE["hidden"], SHAPE["classes"]
    x_train, x_val = inputs(cfg["train"], s, f, g), inputs(cfg["val"], s, f, g)  # shared by every task
    reference = inputs(20000, s, f, g)
    tasks = {}
    for base in ("a", "b"):
        teacher = Teacher(s * f, h, c, g)
        teacher.balance(torch.cat([reference, -reference]))  # balanced on x and on -x
        for negate in (False, True):
            name = base + ("_neg" if negate else "")
            tasks[name] = classification_task(name, teacher, x_train, x_val, c, negate=negate)
    return tasks


def build(variant, seed):
    """``(model, added parameters)`` of ``variant``, initialised from ``seed``."""
    cfg = VARIANTS[variant]
    seed_everything(seed)
    outputs = dict.fromkeys(TASKS, SHAPE["classes"])
    common = dict(seq_len=SHAPE["seq_len"], features=SHAPE["features"], **MODEL)
    if cfg == "separate":
        model = TinyUniT(outputs, separate_decoders=True, **common)
        return model, count_parameters(model) - count_parameters(TinyUniT(outputs, **common))
    if cfg is None:
        return TinyUniT(outputs, **common), 0
    d, layers = MODEL["d_model"], MODEL["dec_layers"]
    cond = TaskConditioning(cfg, d, MODEL["nhead"], layers, list(TASKS))
    added = parameter_count(cfg, d, layers, len(TASKS), nhead=MODEL["nhead"])
    assert added == count_parameters(cond), (variant, added, count_parameters(cond))
    return TinyUniT(outputs, conditioning=cond, **common), added


def run(variant, tasks, cfg, seed):
    model, added = build(variant, seed)
    opt = make_optimizer(model, cfg["lr"])
    sampler = TaskSampler(task_probabilities({n: t.size for n, t in tasks.items()}, "uniform"), seed=seed)
    batches = Batches(tasks, seed)
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        ds = next(sampler)
        x, y = batches.batch(ds, cfg["batch"])
        loss = task_loss(tasks[ds], model(x, ds), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    metrics = evaluate(model, tasks)
    return {"metrics": metrics, "mean_accuracy": float(np.mean(list(metrics.values()))), "seconds": seconds,
            "added_parameters": added, "total_parameters": count_parameters(model)}


def summarize(runs):
    """Per variant: accuracies, and the gain over ``none`` paired by seed (same data, same init of
    the shared weights), which removes the seed-to-seed spread that the narrow model has."""
    base = np.array([r["mean_accuracy"] for r in runs["none"]])
    return {v: {"accuracy": {n: mean_std([r["metrics"][n] for r in rs]) for n in TASKS},
                "mean_accuracy": mean_std([r["mean_accuracy"] for r in rs]),
                "gain_vs_none": mean_std(np.array([r["mean_accuracy"] for r in rs]) - base),
                "added_parameters": rs[0]["added_parameters"], "total_parameters": rs[0]["total_parameters"],
                "seconds": mean_std([r["seconds"] for r in rs])}
            for v, rs in runs.items()}


def plot(summary, cfg, out):
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for k, (v, s) in enumerate(summary.items()):
        x = s["added_parameters"] + 1  # + 1: "none" on the log axis
        ax.errorbar(x, s["mean_accuracy"]["mean"], yerr=s["mean_accuracy"]["std"], fmt="o", capsize=3,
                    color=f"C{k}", label=f"{v} (+{s['added_parameters']:,})")
        gain = s["gain_vs_none"]
        ax2.errorbar(x, gain["mean"], yerr=gain["std"], fmt="o", capsize=3, color=f"C{k}")
    base = summary["none"]["total_parameters"]
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel("added parameters + 1 (log)")
    ax.set_ylabel("mean val accuracy over the 4 tasks (chance 0.25)")
    ax.set_title(f"Conflicting tasks, base model {base:,} params, {cfg['steps']} updates\n"
                 f"mean ± std over {len(cfg['seeds'])} seeds", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax2.axhline(0.0, color="gray", lw=1)
    ax2.set_ylabel("gain over none, paired by seed")
    ax2.set_title("the same, as the per-seed gain over the shared decoder", fontsize=10)
    save_figure(fig, out, NAME)


def main():
    args = parse_args(__doc__.splitlines()[0])
    one_thread()
    start = time.perf_counter()
    cfg = SMOKE if args.smoke else FULL
    runs = run_grid(cfg, VARIANTS, make_tasks, run, lambda r: f"mean={r['mean_accuracy']:.3f} "
                    + " ".join(f"{n}={a:.3f}" for n, a in r["metrics"].items()))
    summary = summarize(runs)
    chance = {n: t.chance for n, t in make_tasks(cfg, cfg["seeds"][0]).items()}
    write_json(args.out, NAME, {"experiment": NAME, "smoke": args.smoke,
                                "wall_seconds": time.perf_counter() - start, "config": cfg, "shape": SHAPE,
                                "model": MODEL, "variants": VARIANTS, "baseline": "none",
                                "chance_seed0": chance, "summary": summary, "runs": runs})
    plot(summary, cfg, args.out)
    for v, s in summary.items():
        print(f"{v:18s} +{s['added_parameters']:6d} mean={fmt(s['mean_accuracy'])} "
              f"gain={fmt(s['gain_vs_none'])} "
              + " ".join(f"{n}={fmt(s['accuracy'][n])}" for n in TASKS))


if __name__ == "__main__":
    main()
