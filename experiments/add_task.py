"""Adding a task to a trained, frozen tiny UniT: the new task's score as a share of its score
when trained jointly, for plain UniT and with Medusa's per-task attention modules.

Setting: five 4-class tasks on the *same* inputs; their teachers share one hidden layer (the
"scene" features, width ``hidden``) and have their own readouts, so a body trained on four of
them has features the fifth can use, but not necessarily in the form its own head needs.
For every held-out task ``h`` of the five and every seed:

1. ``joint5``: train on all five tasks jointly (uniform sampling, one task per update, ``steps``)
   -> ``h``'s joint accuracy (one run per seed gives every ``h``'s);
2. ``joint4``: train the same model on the other four (the same ``steps``), then freeze every
   parameter (``requires_grad_(False)``), add ``h``'s own modules (``TinyUniT.add_task``: its
   query embeddings, its head, and its Medusa gate / layer logits) and train only those on ``h``
   (``new_steps`` updates, lr ``new_lr``) -> ``h``'s accuracy after adding it.

Score: ``ratio = acc_added / acc_joint`` and the chance-corrected ``(acc_added - 1/4) /
max(acc_joint - 1/4, 0.01)``.  After step 2 every old parameter and every old task's val output (eval mode)
is checked bitwise against a snapshot taken before the new task was added (``torch.equal``; the run
stops if one differs) and the result is recorded.

Variants (``unit_fast.models.medusa.Medusa`` options, ``has_image`` true for every task):
``plain`` (none), ``feature_attention`` (a per-task channel ``FeatureGate`` on the encoder memory,
``mem * sigmoid(MLP_t(mem))``), ``feature+multiscale`` (that, and a per-task softmax over the two
encoder layers' outputs, ``multiscale: encoder``).

Run: ``python -m experiments.add_task [--smoke] [--out DIR]`` -> ``add_task.json``, ``add_task.png``.
"""

import time

import numpy as np
import torch

from experiments.common import (
    Batches,
    evaluate,
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
from unit_fast.models.medusa import Medusa
from unit_fast.training.sampling import TaskSampler, task_probabilities

NAME = "add_task"
FULL = dict(seeds=[0, 1, 2], steps=1200, new_steps=500, batch=32, lr=1e-3, new_lr=3e-3, train=8000, val=2000)
SMOKE = dict(FULL, seeds=[0, 1], steps=20, new_steps=10, train=400, val=200)
SHAPE = dict(seq_len=4, features=8, hidden=16, classes=4)
MODEL = dict(d_model=16, nhead=2, dim_feedforward=32, enc_layers=2, dec_layers=2, num_queries=2)
VARIANTS = {  # name -> model.medusa section (None: plain UniT)
    "plain": None,
    "feature_attention": {"feature_attention": "channel", "attention_hidden": 16},
    "feature+multiscale": {"feature_attention": "channel", "attention_hidden": 16, "multiscale": "encoder"},
}
TASKS = ("a", "b", "c", "d", "e")


def make_tasks(cfg, seed):
    """``{name: Task}``: five balanced 4-class readouts of one shared teacher hidden layer."""
    g = torch.Generator().manual_seed(7000 + seed)
    s, f, h, c = SHAPE["seq_len"], SHAPE["features"], SHAPE["hidden"], SHAPE["classes"]
    x_train, x_val = inputs(cfg["train"], s, f, g), inputs(cfg["val"], s, f, g)
    reference = inputs(20000, s, f, g)
    scene = Teacher(s * f, h, c, g)
    tasks = {}
    for name in TASKS:
        teacher = Teacher(s * f, h, c, g, hidden_from=scene)
        teacher.balance(reference)
        tasks[name] = classification_task(name, teacher, x_train, x_val, c)
    return tasks


def build(variant, names, seed):
    seed_everything(seed)
    cfg = VARIANTS[variant]
    # the Medusa modules are built first here, then the model's (a fixed order per variant)
    medusa = None if cfg is None else Medusa(cfg, dict.fromkeys(names, True), MODEL["d_model"],
                                             enc_layers=MODEL["enc_layers"])
    model = TinyUniT(dict.fromkeys(names, SHAPE["classes"]), SHAPE["seq_len"], SHAPE["features"],
                     medusa=medusa,
                     **MODEL)
    return model


def train(model, tasks, steps, lr, batch, seed, params=None):
    """``steps`` updates, one uniformly drawn task each; ``params``: the ones to train (all if None)."""
    if params is None:
        opt = make_optimizer(model, lr)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sampler = TaskSampler(task_probabilities({n: t.size for n, t in tasks.items()}, "uniform"), seed=seed)
    batches = Batches(tasks, seed)
    for _ in range(steps):
        ds = next(sampler)
        x, y = batches.batch(ds, batch)
        loss = task_loss(tasks[ds], model(x, ds), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def outputs(model, tasks):
    model.eval()
    out = {n: model(t.x_val, n) for n, t in tasks.items()}
    model.train()
    return out


def add_one(variant, tasks, held, cfg, seed):
    """Joint-train on every task but ``held``, freeze, learn ``held``; its accuracy and the checks."""
    old = {n: t for n, t in tasks.items() if n != held}
    model = build(variant, list(old), seed)
    train(model, old, cfg["steps"], cfg["lr"], cfg["batch"], seed)
    old_acc = evaluate(model, old)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    before = outputs(model, old)
    model.requires_grad_(False)  # freeze the whole trained model: the shared body and the old tasks' own
    new_params = model.add_task(held, SHAPE["classes"])  # fresh, requires_grad True
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trained) == sorted(model.task_parameter_names(held)), trained
    train(model, {held: tasks[held]}, cfg["new_steps"], cfg["new_lr"], cfg["batch"], seed + 100,
          params=new_params)
    state = model.state_dict()
    params_equal = all(torch.equal(state[k], v) for k, v in snapshot.items())
    after = outputs(model, old)
    outputs_equal = all(torch.equal(before[n], after[n]) for n in old)
    assert params_equal and outputs_equal, (variant, held, params_equal, outputs_equal)
    return {"accuracy": evaluate(model, {held: tasks[held]})[held], "old_accuracy": old_acc,
            "old_params_bitwise_equal": params_equal, "old_outputs_bitwise_equal": outputs_equal,
            "trained_parameters": trained, "trained_parameter_count": sum(p.numel() for p in new_params),
            "total_parameters": count_parameters(model)}


def run(variant, tasks, cfg, seed):
    t0 = time.perf_counter()
    model = build(variant, list(tasks), seed)
    train(model, tasks, cfg["steps"], cfg["lr"], cfg["batch"], seed)
    joint = evaluate(model, tasks)
    added = {h: add_one(variant, tasks, h, cfg, seed) for h in TASKS}
    chance = 1.0 / SHAPE["classes"]
    ratio = {h: added[h]["accuracy"] / joint[h] for h in TASKS}
    # the denominator floored at 0.01 (a smoke run's joint accuracy can be at chance)
    corrected = {h: (added[h]["accuracy"] - chance) / max(joint[h] - chance, 0.01) for h in TASKS}
    return {"joint_accuracy": joint, "added": added, "ratio": ratio, "ratio_chance_corrected": corrected,
            "mean_ratio": float(np.mean(list(ratio.values()))),
            "mean_ratio_chance_corrected": float(np.mean(list(corrected.values()))),
            "seconds": time.perf_counter() - t0}


def summarize(runs):
    out = {}
    for v, rs in runs.items():
        out[v] = {
            "joint_accuracy": {h: mean_std([r["joint_accuracy"][h] for r in rs]) for h in TASKS},
            "added_accuracy": {h: mean_std([r["added"][h]["accuracy"] for r in rs]) for h in TASKS},
            "ratio": {h: mean_std([r["ratio"][h] for r in rs]) for h in TASKS},
            "ratio_chance_corrected": {h: mean_std([r["ratio_chance_corrected"][h] for r in rs])
                                       for h in TASKS},
            "mean_ratio": mean_std([r["mean_ratio"] for r in rs]),
            "mean_ratio_chance_corrected": mean_std([r["mean_ratio_chance_corrected"] for r in rs]),
            "mean_joint_accuracy": mean_std([np.mean(list(r["joint_accuracy"].values())) for r in rs]),
            "mean_added_accuracy": mean_std([np.mean([r["added"][h]["accuracy"] for h in TASKS])
                                             for r in rs]),
            "trained_parameters": rs[0]["added"][TASKS[0]]["trained_parameters"],
            "trained_parameter_count": rs[0]["added"][TASKS[0]]["trained_parameter_count"],
            "total_parameters": rs[0]["added"][TASKS[0]]["total_parameters"],
            "all_old_params_bitwise_equal": all(a["old_params_bitwise_equal"] for r in rs
                                                for a in r["added"].values()),
            "all_old_outputs_bitwise_equal": all(a["old_outputs_bitwise_equal"] for r in rs
                                                 for a in r["added"].values()),
            "seconds": mean_std([r["seconds"] for r in rs])}
    return out


def plot(summary, cfg, out):
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / len(summary)
    xs = np.arange(len(TASKS) + 1)
    for k, (v, s) in enumerate(summary.items()):
        for a, key in ((ax, "ratio"), (ax2, "ratio_chance_corrected")):
            m = [s[key][h]["mean"] for h in TASKS] + [s["mean_" + key]["mean"]]
            e = [s[key][h]["std"] for h in TASKS] + [s["mean_" + key]["std"]]
            a.bar(xs + (k - len(summary) / 2 + 0.5) * width, m, width, yerr=e, capsize=2, color=f"C{k}",
                  label=f"{v} ({s['trained_parameter_count']} params trained)")
    for a, label in ((ax, "acc added / acc joint"), (ax2, "(acc added - 1/4) / (acc joint - 1/4)")):
        a.set_xticks(xs, [*TASKS, "mean"])
        a.set_xlabel("held-out task")
        a.set_ylabel(label)
        a.axhline(1.0, color="gray", lw=1)
    ax.set_title(f"new task on a frozen body ({cfg['new_steps']} updates) vs joint training "
                 f"({cfg['steps']}),\nmean ± std over {len(cfg['seeds'])} seeds", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax2.set_title("the same, chance-corrected", fontsize=10)
    save_figure(fig, out, NAME)


def main():
    args = parse_args(__doc__.splitlines()[0])
    one_thread()
    start = time.perf_counter()
    cfg = SMOKE if args.smoke else FULL
    runs = run_grid(cfg, VARIANTS, make_tasks, run, lambda r: f"ratio={r['mean_ratio']:.3f} " + " ".join(
        f"{h}={r['added'][h]['accuracy']:.3f}/{r['joint_accuracy'][h]:.3f}" for h in TASKS))
    summary = summarize(runs)
    write_json(args.out, NAME, {"experiment": NAME, "smoke": args.smoke,
                                "wall_seconds": time.perf_counter() - start, "config": cfg, "shape": SHAPE,
                                "model": MODEL, "variants": VARIANTS, "baseline": "plain",
                                "summary": summary, "runs": runs})
    plot(summary, cfg, args.out)
    for v, s in summary.items():
        print(f"{v:18s} trained={s['trained_parameter_count']:4d} ratio={s['mean_ratio']['mean']:.3f}"
              f"±{s['mean_ratio']['std']:.3f} corrected={s['mean_ratio_chance_corrected']['mean']:.3f}"
              f"±{s['mean_ratio_chance_corrected']['std']:.3f} joint={s['mean_joint_accuracy']['mean']:.3f} "
              f"added={s['mean_added_accuracy']['mean']:.3f} bitwise={s['all_old_params_bitwise_equal']}"
              f"/{s['all_old_outputs_bitwise_equal']}")


if __name__ == "__main__":
    main()
