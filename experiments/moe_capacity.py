"""Mixture-of-experts FFNs (MultiModel / Shazeer et al.) in a tiny UniT's decoder against dense FFNs
of the same active FLOPs and of the same parameters, on eight tasks that compete for capacity.

Setting: eight regression tasks on the *same* training inputs, each labelled by its own random
teacher (no shared hidden layer), so the tasks need different features and compete for the
shared model.  Targets are standardised (std 1); the metric is the clean val MSE per task
(0 = perfect, about 1 = the best constant prediction) and its mean over the tasks.

Variants (``model.moe`` options of ``unit_fast.models.moe``, in both decoder layers, noisy top-k
gating, no capacity limit, ``cv2`` balance loss with coef 0.01 unless said):

- ``dense_small``: FFN ``FF``; ``dense_8x``: FFN ``8 FF`` (about the MoE's parameters, 8x the FLOPs);
- ``moe_k1``: E = 8 experts of width ``FF``, k = 1 (the same active FLOPs as dense_small, ~8x its
  FFN parameters).  With k = 1 the gate weight is softmax of one logit = 1, so the task loss gives
  the router *no* gradient; only the balance loss trains it.  Hence also ``moe_k2`` (k = 2: 2x the
  active expert FLOPs, and the router learns from the task loss);
- ``*_noloss``: ``loss: none`` (no balance loss) -> expert collapse, measured as the CV of the load;
- ``*_gate_task``: ``gate_task: true``, the gate reads a per-task embedding (``task_dim`` 8) with
  the token, against token-only gating.

Routing statistics on the val sets in eval mode (clean logits): per decoder layer the slots each
expert ran per task, ``N (T, E)``; ``cv_load`` = std / mean of ``N.sum(0)`` (population std; 0 =
balanced, sqrt(E - 1) = 2.65 = all to one expert); ``mi_bits`` = the mutual information of task
and expert under ``N / N.sum()`` (0 = routing ignores the task; at most log2 8 = 3 bits).  Both
are averaged over the two MoE layers; ``*_train``: the same with the noisy gate of training
mode.  Uniform task sampling, one task per update.

Run: ``python -m experiments.moe_capacity [--smoke] [--out DIR]`` -> ``moe_capacity.json``, ``.png``.
"""

import math
import time

import numpy as np
import torch

from experiments.common import (
    Batches,
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
from experiments.tasks import Teacher, inputs, regression_task
from experiments.tiny_unit import TinyUniT, count_parameters
from unit_fast.models.moe import MoEFFN, moe_options
from unit_fast.training.sampling import TaskSampler, task_probabilities

NAME = "moe_capacity"
FULL = dict(seeds=[0, 1, 2], steps=2000, batch=32, lr=1e-3, train=8000, val=2000)
SMOKE = dict(FULL, seeds=[0, 1], steps=20, train=400, val=200)
SHAPE = dict(seq_len=4, features=8, hidden=16, tasks=8)
FF = 16
MODEL = dict(d_model=16, nhead=2, enc_layers=1, dec_layers=2, num_queries=4)
MOE = {"layers": [0, 1], "num_experts": 8, "expert_ff": FF, "noisy": True, "task_dim": 8, "loss": "cv2",
       "loss_coef": 0.01, "capacity_factor": None}
VARIANTS = {  # name -> (dense FFN width, model.moe overrides or None)
    "dense_small": (FF, None),
    "moe_k1": (FF, {"k": 1}),
    "moe_k2": (FF, {"k": 2}),
    "dense_8x": (8 * FF, None),
    "moe_k1_noloss": (FF, {"k": 1, "loss": "none"}),
    "moe_k2_noloss": (FF, {"k": 2, "loss": "none"}),
    "moe_k1_gate_task": (FF, {"k": 1, "gate_task": True}),
    "moe_k2_gate_task": (FF, {"k": 2, "gate_task": True}),
}
TASKS = tuple(f"t{i}" for i in range(SHAPE["tasks"]))


def make_tasks(cfg, seed):
    """``{name: Task}``: eight regression tasks, one independent teacher each, on shared inputs."""
    g = torch.Generator().manual_seed(5000 + seed)
    s, f, h = SHAPE["seq_len"], SHAPE["features"], SHAPE["hidden"]
    x_train, x_val = inputs(cfg["train"], s, f, g), inputs(cfg["val"], s, f, g)
    reference = inputs(20000, s, f, g)
    return {t: regression_task(t, Teacher(s * f, h, 1, g), x_train, x_val, 1.0, reference) for t in TASKS}


def build(variant, seed):
    ff, over = VARIANTS[variant]
    seed_everything(seed)
    moe = None if over is None else moe_options({**MOE, **over})
    model = TinyUniT(dict.fromkeys(TASKS, 1), SHAPE["seq_len"], SHAPE["features"], dim_feedforward=ff,
                     moe=moe,
                     **MODEL)
    if moe is not None:
        per_layer = MoEFFN.parameter_count(MODEL["d_model"], moe["num_experts"], FF, noisy=True,
                                           task_dim=moe["task_dim"] if moe["gate_task"] else 0)
        assert all(count_parameters(m) == per_layer for m in model.moe_layers())
    return model, moe


def ffn_stats(model, moe, ff):
    """FFN parameters (both decoder layers, gates included) and active FFN multiply-adds per token-layer."""
    d = MODEL["d_model"]
    if moe is None:
        return MODEL["dec_layers"] * (2 * d * ff + ff + d), 2 * d * ff
    params = sum(count_parameters(m) for m in model.moe_layers())
    gate_in = d + (moe["task_dim"] if moe["gate_task"] else 0)
    return params, moe["k"] * 2 * d * FF + (2 if moe["noisy"] else 1) * gate_in * moe["num_experts"]


@torch.no_grad()
def evaluate(model, tasks, batch_size=1000, train_mode=False):
    """``(val MSE per task, routing counts (layers, T, E) or None)`` in eval mode (clean gate), or
    with ``train_mode`` in training mode (the noisy gate that training routes with)."""
    model.train(train_mode)
    mse, counts = {}, None
    layers = model.moe_layers()
    if layers:
        counts = torch.zeros(len(layers), len(tasks), layers[0].num_experts)
    for ti, (name, task) in enumerate(tasks.items()):
        outs = []
        for i in range(0, task.x_val.shape[0], batch_size):
            outs.append(model(task.x_val[i:i + batch_size], name))
            for li, m in enumerate(layers):
                counts[li, ti] += m.last["usage"].float()
        mse[name] = task_loss(task, torch.cat(outs), task.y_val).item()
    model.train()
    return mse, counts


def routing_stats(counts):
    """``(cv_load, mi_bits)`` averaged over layers, of ``counts (L, T, E)``."""
    cvs, mis = [], []
    for n in counts:
        load = n.sum(0)
        cvs.append((load.std(unbiased=False) / load.mean()).item())
        p = n / n.sum()
        pt, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
        ratio = torch.where(p > 0, p / (pt * pe), torch.ones_like(p))
        mis.append((p * ratio.log2()).sum().item())
    return float(np.mean(cvs)), float(np.mean(mis))


def run(variant, tasks, cfg, seed):
    model, moe = build(variant, seed)
    opt = make_optimizer(model, cfg["lr"])
    sampler = TaskSampler(task_probabilities({n: t.size for n, t in tasks.items()}, "uniform"), seed=seed)
    batches = Batches(tasks, seed)
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        ds = next(sampler)
        x, y = batches.batch(ds, cfg["batch"])
        loss = task_loss(tasks[ds], model(x, ds), y) + model.moe_aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    mse, counts = evaluate(model, tasks)
    ffn_params, ffn_flops = ffn_stats(model, moe, VARIANTS[variant][0])
    r = {"mse": mse, "mean_mse": float(np.mean(list(mse.values()))), "seconds": seconds,
         "total_parameters": count_parameters(model), "ffn_parameters": ffn_params,
         "ffn_mult_adds_per_token": ffn_flops}
    if counts is not None:
        r["cv_load"], r["mi_bits"] = routing_stats(counts)
        r["routing_counts"] = counts.tolist()
        r["cv_load_train"], r["mi_bits_train"] = routing_stats(evaluate(model, tasks, train_mode=True)[1])
    return r


def summarize(runs):
    base = np.array([r["mean_mse"] for r in runs["dense_small"]])
    out = {}
    for v, rs in runs.items():
        s = {"mse": {t: mean_std([r["mse"][t] for r in rs]) for t in TASKS},
             "mean_mse": mean_std([r["mean_mse"] for r in rs]),
             "gain_vs_dense_small": mean_std(base - np.array([r["mean_mse"] for r in rs])),
             "total_parameters": rs[0]["total_parameters"], "ffn_parameters": rs[0]["ffn_parameters"],
             "ffn_mult_adds_per_token": rs[0]["ffn_mult_adds_per_token"],
             "seconds": mean_std([r["seconds"] for r in rs])}
        if "cv_load" in rs[0]:
            s["cv_load"] = mean_std([r["cv_load"] for r in rs])
            s["mi_bits"] = mean_std([r["mi_bits"] for r in rs])
            s["cv_load_train"] = mean_std([r["cv_load_train"] for r in rs])
            s["mi_bits_train"] = mean_std([r["mi_bits_train"] for r in rs])
        out[v] = s
    return out


def plot(summary, cfg, out):
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.4), gridspec_kw={"width_ratios": [2, 1]})
    main = ["dense_small", "moe_k1", "moe_k2", "dense_8x", "moe_k1_gate_task", "moe_k2_gate_task"]
    width = 0.8 / len(main)
    xs = np.arange(len(TASKS) + 1)
    for k, v in enumerate(main):
        s = summary[v]
        m = [s["mse"][t]["mean"] for t in TASKS] + [s["mean_mse"]["mean"]]
        e = [s["mse"][t]["std"] for t in TASKS] + [s["mean_mse"]["std"]]
        ax.bar(xs + (k - len(main) / 2 + 0.5) * width, m, width, yerr=e, capsize=2, color=f"C{k}",
               label=f"{v} ({s['ffn_parameters']:,} FFN params, {s['ffn_mult_adds_per_token']:,} MAC/token)")
    ax.set_xticks(xs, [*TASKS, "mean"])
    ax.set_ylabel("val MSE (1 = constant prediction)")
    ax.set_title(f"8 independent teachers, {cfg['steps']} updates, mean ± std over {len(cfg['seeds'])} seeds",
                 fontsize=10)
    top = max(summary[v]["mse"][t]["mean"] + summary[v]["mse"][t]["std"] for v in main for t in TASKS)
    ax.set_ylim(0, 1.45 * top)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    moes = [v for v in summary if "cv_load" in summary[v]]
    for k, v in enumerate(moes):
        s = summary[v]
        ax2.errorbar(s["cv_load"]["mean"], s["mi_bits"]["mean"], xerr=s["cv_load"]["std"],
                     yerr=s["mi_bits"]["std"], fmt="o", capsize=3, color=f"C{k}", label=v)
    ax2.set_xlabel("CV of expert load (0 balanced, 2.65 one expert)")
    ax2.set_ylabel("I(task; expert) [bits] (max 3)")
    ax2.set_title("routing on the val sets (eval, clean gate)", fontsize=10)
    ax2.legend(fontsize=7)
    save_figure(fig, out, NAME)


def main():
    args = parse_args(__doc__.splitlines()[0])
    one_thread()
    start = time.perf_counter()
    cfg = SMOKE if args.smoke else FULL
    runs = run_grid(cfg, VARIANTS, make_tasks, run, lambda r: f"mean_mse={r['mean_mse']:.3f}"
                    + (f" cv={r['cv_load']:.2f} mi={r['mi_bits']:.2f}" if "cv_load" in r else ""))
    summary = summarize(runs)
    write_json(args.out, NAME, {"experiment": NAME, "smoke": args.smoke,
                                "wall_seconds": time.perf_counter() - start, "config": cfg, "shape": SHAPE,
                                "model": MODEL, "moe": MOE, "ffn": FF,
                                "variants": {v: {"dim_feedforward": ff, "moe": o}
                                             for v, (ff, o) in VARIANTS.items()},
                                "baseline": "dense_small", "max_cv_load": math.sqrt(MOE["num_experts"] - 1),
                                "summary": summary, "runs": runs})
    plot(summary, cfg, args.out)
    for v, s in summary.items():
        extra = (f" cv={s['cv_load']['mean']:.2f}±{s['cv_load']['std']:.2f} "
                 f"mi={s['mi_bits']['mean']:.2f}±{s['mi_bits']['std']:.2f}") if "cv_load" in s else ""
        print(f"{v:18s} ffn_params={s['ffn_parameters']:6d} mean_mse={s['mean_mse']['mean']:.3f}"
              f"±{s['mean_mse']['std']:.3f}{extra}")


if __name__ == "__main__":
    main()
