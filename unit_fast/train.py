"""``python -m unit_fast.train [--config NAME|PATH] [--output-dir DIR] [--resume [RUN|CHECKPOINT]]
[--trust-checkpoint] [key=value ...]``

One linear loop (nanoGPT's ``train.py`` shape), numbered:
  1. config, output folder, logging;  2. distributed set-up (torchrun) and seeds;
  3. data (the synthetic default is generated once when ``data.root`` is null);
  4. model (``training.init_from``: weights from an MMF / unit_fast checkpoint), optimizer,
     schedule, task sampler, batch loader (``data.num_workers`` DataLoader workers);
  5. resume (``training/resume.py``: the checkpoint's own config, overrides on top);
  6. the training loop, evaluating every ``training.eval_every`` steps; SIGINT / SIGTERM finish
     the step and checkpoint (``training/stopping.py``);
  7. evaluation (not repeated when the last step just evaluated), the per-task table, plots.

Tasks per update: ``training.tasks_per_step: 1`` is MMF's schedule: every update trains one task
drawn by the sampler (``accumulate`` micro-batches of it), the same task on every rank.  With
N > 1 an update draws N tasks (with replacement, so a task can come twice) and accumulates
``accumulate`` micro-batches of each; the gradient is that of the mean micro-batch loss.

Under DDP (``torchrun``) every rank draws the same tasks (one seeded sampler) and takes its share
of each global batch (``BatchStream``); gradients are averaged once per update (``no_sync`` before
the last micro-batch) and the box losses are normalised by the box count all-reduced over ranks
(DETR).  Two things still make N ranks differ from one process with the same global batch, as in
DETR / MMF: a batch is padded to its largest image (a rank pads only its share), and the class
loss is a weighted mean (``eos_coef``) over each rank's share.

Outputs (rank 0): ``checkpoints/``, ``log.jsonl`` and ``tensorboard/`` (``training/report.py``),
``plots/loss_per_task.png`` and ``plots/metrics.png``, ``final_metrics.json``.
Bad input (an unknown key, a malformed override, a missing path) prints one ``error:`` line
and exits with status 2, no traceback.
"""

import argparse
import json
import os
import sys
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist

from unit_fast.atomic import atomic_write
from unit_fast.config import load_config
from unit_fast.training import checkpoint as ckpt
from unit_fast.training.aggregation import AGGREGATORS, build_aggregator, flat_grads, set_flat_grads
from unit_fast.training.batches import resolve_device, select_rows, to_device
from unit_fast.training.evaluation_loop import chance_levels, evaluate_datasets, format_table, targets_met
from unit_fast.training.loader import UpdateLoader
from unit_fast.training.loss_weighting import build_loss_weighting
from unit_fast.training.loss_weighting import check_options as check_loss_weighting
from unit_fast.training.metadata import run_metadata
from unit_fast.training.optim import build_optimizer, warmup_cosine
from unit_fast.training.probe import UncertaintyProbe, batch_uncertainty, example_pools
from unit_fast.training.probe import check_options as check_probe
from unit_fast.training.report import RunLog, plot_log
from unit_fast.training.resume import LATEST, RUNS, find_resume, newest_run, resume_command, run_folder_of
from unit_fast.training.sampling import base_probabilities, build_sampler, select_most_uncertain
from unit_fast.training.skips import SkippedImages
from unit_fast.training.stopping import GracefulStop
from unit_fast.training.streams import BatchStream


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


DESCRIPTION = """\
Trains a UniT model on one or several tasks and evaluates it. With no
arguments it generates the synthetic default data (once), trains the default
config on all of its tasks, and prints one row per task: its metric, the
chance level, the result and the target.

Output goes to --output-dir (default: training.output_dir, else
runs/<config>-<time>): checkpoints/, log.jsonl, tensorboard/, plots/ and
final_metrics.json. Ctrl-C (or SIGTERM) finishes the current step, writes a
checkpoint and prints the command that resumes; a second one stops at once.
Bad input prints one "error:" line and exits with status 2."""


def parse_args(argv):
    from unit_fast.config import packaged_configs_epilog

    p = argparse.ArgumentParser(prog="python -m unit_fast.train", description=DESCRIPTION,
                                epilog=packaged_configs_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", 
                   help="a packaged config name or a .yaml path (default: default)")
    p.add_argument("--output-dir", default=None,
                   help="default: training.output_dir, else runs/<config>-<time>")
    p.add_argument("--resume", nargs="?", const=LATEST, default=None, metavar="RUN|CHECKPOINT",
                   help="continue a stopped run: from a run folder (its newest checkpoint that loads) or a "
                        "checkpoint file, with the run's own config (key=value overrides apply on top); "
                        "alone: the --output-dir run, else the newest run of --config in runs/")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="fully unpickle the checkpoints this run reads (--resume, training.init_from, "
                        "model.base_ckpt_path, backbone weights), which can run code stored in them: only "
                        "for files whose source you trust (default: weights only, anything else is refused)")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    # "--resume key=value": argparse gives the optional PATH the first override.
    if args.resume not in (None, LATEST) and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)
        args.resume = LATEST
    return args


def _check_options(cfg):
    """Options the loop reads directly: a wrong value is a one-line usage error, not a traceback."""
    t = cfg["training"]
    for key in ("tasks_per_step", "accumulate", "log_every", "checkpoint_every"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise UsageError(f"training.{key} must be an integer >= 1, got {t[key]!r}")
    if not isinstance(t["eval_every"], int) or t["eval_every"] < 0:
        raise UsageError(f"training.eval_every must be an integer >= 0 (0: no periodic evaluation), "
                         f"got {t['eval_every']!r}")
    check_loss_weighting(t)  # a ValueError naming the key
    check_probe(t)
    if t["aggregator"] not in AGGREGATORS:
        raise UsageError(f"training.aggregator must be one of {', '.join(AGGREGATORS)}, "
                         f"got {t['aggregator']!r}")
    implementation = cfg["model"]["implementation"]
    if implementation not in ("fast", "reference"):
        raise UsageError(f"model.implementation must be fast or reference, got {implementation!r}")
    amp = cfg["model"]["autocast_dtype"]
    if amp not in (None, "auto"):
        if not isinstance(getattr(torch, str(amp), None), torch.dtype):
            raise UsageError(f"model.autocast_dtype must be auto, null or a torch dtype (e.g. bfloat16), "
                             f"got {amp!r}")
        if implementation != "fast":  # the reference keeps MMF's float32 numerics: no autocast
            raise UsageError(f"model.autocast_dtype={amp} needs model.implementation=fast (the reference "
                             "implementation keeps MMF's float32 numerics)")


def _datasets_of(cfg):
    return [ds for qs in cfg["model"]["base_args"]["num_queries"].values() for ds in qs]


def _one_line(exc):
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


class Trainer:
    """The training run in ``output_dir`` (created only once everything is set up).

    Args:
        resume: None (a new run); ``"latest"``: the newest checkpoint of ``output_dir`` that loads;
            a run folder or checkpoint file (``find_resume``); or ``(path, state)`` already loaded.
        trust_checkpoint: fully unpickle the checkpoints read (resume, ``training.init_from``,
            ``model.base_ckpt_path``, backbone weights); they may run code: trusted files only.
    """

    def __init__(self, cfg, output_dir, resume=None, trust_checkpoint=False):
        # 1-2. output, distributed, seeds
        self.cfg, self.out, self.trust = cfg, output_dir, trust_checkpoint
        self.interrupted = None  # the signal's name once SIGINT / SIGTERM stopped the run
        self._signal, self._signals_seen = None, None  # the active GracefulStop; ranks that saw a signal
        if resume == LATEST:
            resume = os.path.join(output_dir, "checkpoints")
            if ckpt.checkpoint_folder(resume) is None:
                raise UsageError(f"--resume: no checkpoint in {resume}")
        if resume is not None and not isinstance(resume, tuple):
            resume = find_resume(resume, trust=trust_checkpoint)
        t, data_cfg = cfg["training"], cfg["data"]
        _check_options(cfg)
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = resolve_device(t["device"], "training.device")
        if self.distributed and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                self.device = torch.device("cuda", torch.cuda.current_device())
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        torch.manual_seed(t["seed"] + self.rank)

        # 3. data: the served datasets (declared in data.datasets, or the synthetic default's)
        from unit_fast.tasks import resolve_run_config
        from unit_fast.training.data import build_data, configure_model

        resolve_run_config(cfg)  # idempotent: a resumed run's stored config is resolved already
        self.data = build_data(cfg, _datasets_of(cfg))
        configure_model(cfg, self.data)

        # 4. model, optimizer, schedule, sampler, loader
        from unit_fast.data.datasets import BatchCollator
        from unit_fast.models.unit import build_model

        torch.manual_seed(t["seed"])  # identical initial weights on every rank
        try:
            self.model = build_model(cfg, trust=trust_checkpoint).to(self.device)
        except RuntimeError as exc:  # model.base_ckpt_path that does not fit the configured model
            raise UsageError(f"model.base_ckpt_path: {_one_line(exc)[:600]}") from None
        self.model.set_implementation(cfg["model"]["implementation"])
        # A resumed run's weights come from its checkpoint; init_from only starts a new run.
        init_report = self._init_from(t["init_from"]) if t["init_from"] and resume is None else None
        # training.freeze before DDP wraps the model: DDP only tracks parameters that need a gradient.
        freeze_report = self._freeze(t["freeze"])
        # find_unused_parameters: a step trains one task's head and encoder, the rest get no gradient.
        self.ddp = (torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=True) if self.distributed else None)
        lr_backbone = cfg["model"]["base_args"]["lr_backbone"]
        self.optimizer = build_optimizer(self.model, t["lr"], lr_backbone, t["weight_decay"], t["eps"],
                                         name=t["optimizer"],
                                         no_decay=freeze_report.no_decay if freeze_report is not None else ())
        # training.loss_weighting; uncertainty's s_t are one more group, added before the schedule
        # is built so that they follow its warmup-cosine factor too.
        self.weighting = build_loss_weighting(t, self._trained_datasets(), self.device, self.distributed)
        if self.weighting.param_group() is not None:
            self.optimizer.add_param_group(self.weighting.param_group())
        self.scheduler = warmup_cosine(self.optimizer, t["warmup_steps"], t["max_updates"])
        sizes = {ds: len(d) for ds, d in self.data.train.items()}
        self.sampler = build_sampler(sizes, t)
        self.streams = {ds: BatchStream(d, ds, t["batch_size"], seed=t["seed"], rank=self.rank,
                                        world_size=self.world,
                                        aspect_ratio_bins=data_cfg["aspect_ratio_bins"])
                        for ds, d in self.data.train.items()}
        collators = {ds: BatchCollator(ds, decoder=data_cfg["decoder"], on_error=data_cfg["on_error"])
                     for ds in self.data.train}
        # sampling_mode uncertainty: the probe (task level) and the candidate pools (example level).
        self.probe = (UncertaintyProbe(self.data.train, collators, t, rank=self.rank, world=self.world,
                                       aspect_ratio_bins=data_cfg["aspect_ratio_bins"])
                      if t["sampling_mode"] == "uncertainty" else None)
        self.pools = example_pools(t, {ds: self.model.kinds[ds] for ds in self.data.train})
        self.loader = UpdateLoader(self.data.train, collators, self.sampler, self.streams,
                                   tasks_per_step=t["tasks_per_step"], accumulate=t["accumulate"],
                                   num_workers=data_cfg["num_workers"], pin_memory=self.device.type == "cuda",
                                   seed=t["seed"], pools=self.pools)
        # training.aggregator: the shared parameters' gradient from the per-task gradients.
        try:
            self.aggregator = build_aggregator(t)
        except ImportError as exc:  # TorchJD (the mtl extra) is not installed
            raise UsageError(_one_line(exc)) from None
        self.shared_params = self._shared_parameters() if self.aggregator is not None else []
        self.expert_usage = {}  # model.moe: {dataset: {layer: (E,) slots}} since the last train record
        self.step, self.skipped_steps = 0, 0
        self.skipped_images = SkippedImages(self.data.train)
        self.last_eval = None  # (step, results) of the latest evaluation

        # 5. resume
        self.resumed_from = None
        if resume is not None:
            self._load(*resume)
            self.resumed_from = resume[0]
        if self.rank == 0:  # the run starts: only now does its folder exist
            os.makedirs(output_dir, exist_ok=True)
        self.log = RunLog(output_dir, enabled=self.rank == 0,
                          resume_step=self.step if resume is not None else None)
        if self.rank == 0:
            ckpt.remove_temporaries(os.path.join(output_dir, "checkpoints"))  # left by a run killed mid-save
        if resume is not None:
            self.log.write({"step": self.step, "event": "resume", "checkpoint": resume[0]})
        if init_report is not None:
            self.log.write({"step": 0, "event": "init_from", "path": init_report.path,
                            "missing": init_report.missing, "unexpected": init_report.unexpected,
                            "renamed": init_report.renamed, "dropped": init_report.dropped,
                            "reinitialized": init_report.reinitialized})
        if freeze_report is not None:
            self.log.write({"step": self.step, "event": "freeze", **freeze_report.log_record()})
        reports = getattr(self.data, "read_reports", {})
        self.skipped_records = {ds: int(r.skipped) for ds, r in reports.items()}
        if any(self.skipped_records.values()):
            self.log.write({"step": self.step, "event": "skipped_records",
                            "skipped_records": self.skipped_records})

    def _init_from(self, path):
        """``training.init_from``: load an MMF UniT (or unit_fast) checkpoint's weights, non-strictly;
        missing and unexpected keys are reported (printed, and logged once the log is open).  With
        ``training.init_strict: false`` a head whose shapes differ (another class count) keeps its
        fresh initialisation and is reported as ``reinitialized``; ``true``: any mismatch is an error."""
        from unit_fast.models.checkpoint import load_mmf_checkpoint

        if not os.path.isfile(os.path.expanduser(str(path))):
            raise UsageError(f"training.init_from: {path} does not exist")
        strict_shapes = self.cfg["training"]["init_strict"]
        if not isinstance(strict_shapes, bool):
            raise UsageError(f"training.init_strict must be true or false, got {strict_shapes!r}")
        try:
            report = load_mmf_checkpoint(os.path.expanduser(str(path)), self.model, strict=False,
                                         trust=self.trust, reinit_mismatched_heads=not strict_shapes)
        except (RuntimeError, ValueError) as exc:  # shape mismatches, not a checkpoint, refused
            hint = ""
            if strict_shapes and "shape mismatch" in str(exc):
                hint = " (training.init_strict=false re-initialises the heads whose sizes differ)"
            raise UsageError(f"training.init_from: {_one_line(exc)}{hint}") from None
        if self.rank == 0:
            print(report)
        return report

    def _trained_datasets(self):
        """The datasets this run trains: those the sampler can draw (probability > 0)."""
        t = self.cfg["training"]
        sizes = {ds: len(d) for ds, d in self.data.train.items()}
        return [ds for ds, p in base_probabilities(sizes, t).items() if p > 0]

    def _freeze(self, entries):
        """``training.freeze`` (``training/freeze.py``; ``shared`` keeps the datasets the sampler
        can draw trainable): None when empty; the report is printed."""
        from unit_fast.training.freeze import freeze

        if entries is None or entries == []:
            return None
        try:
            report = freeze(self.model, entries, self._trained_datasets())
        except ValueError as exc:
            raise UsageError(_one_line(exc)) from None
        if self.rank == 0:
            print(report)
        return report

    # -- checkpoints ---------------------------------------------------------------------------

    def _payload(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "streams": {k: s.state_dict() for k, s in self.streams.items()}, "step": self.step,
                "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images.state_dict(),
                "rng": ckpt.rng_state(), "config": self.cfg, "loss_weighting": self.weighting.state_dict(),
                "meta": run_metadata(self.cfg, self.data),
                **({"probe": self.probe.state_dict()} if self.probe is not None else {})}

    def save(self):
        if self.rank == 0:
            ckpt.save(os.path.join(self.out, "checkpoints"), self.step, self._payload(),
                      keep=self.cfg["training"]["keep_checkpoints"])

    def _load(self, path, state):
        """Continue from the checkpoint ``state`` (read from ``path``)."""
        try:  # a checkpoint from before training.loss_weighting trained with fixed weights
            self.weighting.load_state_dict(state.get("loss_weighting", {"method": "fixed"}))
        except ValueError as exc:
            raise UsageError(f"--resume: {path}: {_one_line(exc)}") from None
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:  # e.g. an override that changes the architecture
            raise UsageError(f"--resume: {path} does not fit the model of its config with these overrides: "
                             f"{_one_line(exc)[:400]}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.probe is not None and "probe" in state:
            self.probe.load_state_dict(state["probe"])
        for k, s in state["streams"].items():
            self.streams[k].load_state_dict(s)
        self.loader.reset()  # anything prefetched came from the old position
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        if "skipped_images" in state:
            self.skipped_images.load_state_dict(state["skipped_images"])
        ckpt.set_rng_state(state["rng"])

    # -- training ------------------------------------------------------------------------------

    def _sum_over_ranks(self, value):
        if not self.distributed:
            return value
        x = torch.tensor(float(value), device=self.device)
        dist.all_reduce(x)
        return x.item()  # host sync: rare (epoch ends, the end of the run)

    def _count_skipped(self, ds, epoch, n):
        finished = self.skipped_images.add(ds, epoch, n)
        if finished is not None:  # every rank finishes a dataset's epoch at the same micro-batch
            name, ep, count = finished
            self.log.write({"step": self.step + 1, "event": "epoch", "dataset": name, "epoch": ep,
                            "skipped_images": int(self._sum_over_ranks(count))})

    def train_step(self):
        """One optimizer update: ``tasks_per_step`` tasks x ``accumulate`` micro-batches; the
        gradient is that of the mean micro-batch loss, each weighted by ``training.loss_weighting``
        (``stats`` hold the unweighted losses).  Returns ``(tasks, stats)``: the task names
        drawn and ``{"loss": (), "task_loss": {ds: ()}, "losses": {key: ()}}`` of detached
        tensors (``loss`` averaged over ranks), or ``(tasks, None)`` for a step skipped by the
        NaN policy."""
        t = self.cfg["training"]
        model = self.ddp or self.model
        if self.probe is not None and self.probe.due(self.step):
            self._probe()
        model.train()
        tasks, micro = self.loader.next_update()
        self.weighting.start(self.step + 1)
        n = len(micro)
        total = 0.0
        task_sum, task_count, term_sum, term_count = {}, {}, {}, {}
        rows = {}  # training.aggregator: {dataset: its micro-batches' summed shared-parameter gradient}
        for j, (ds, epoch, batch) in enumerate(micro):
            self._count_skipped(ds, epoch, batch.pop("skipped", 0))
            batch = to_device(batch, self.device)
            if ds in self.pools:  # example level: train on the most uncertain 1/m of the candidates
                keep = max(1, round(len(batch["indices"]) / self.pools[ds]))
                u = batch_uncertainty(self.model, batch, self.cfg["training"]["uncertainty"]["top_m"])
                batch = select_rows(batch, select_most_uncertain(u, keep))
            # DDP all-reduces the gradients once, in the last micro-batch's backward; torch >= 2.4
            # also syncs parameters used only in the earlier (no_sync) micro-batches.  With an
            # aggregator the trainer all-reduces them itself (_aggregate), per task.
            sync = self.ddp is None or (j == n - 1 and self.aggregator is None)
            with nullcontext() if sync else self.ddp.no_sync():
                losses = model(batch)["losses"]
                self._count_expert_usage(ds)
                loss = sum(losses.values())
                (self.weighting.weigh(ds, loss) / n).backward()  # fixed: loss itself
            if self.aggregator is not None and (j == n - 1 or micro[j + 1][0] != ds):  # a draw's last
                rows[ds] = rows.get(ds, 0.0) + flat_grads(self.shared_params)
                for p in self.shared_params:
                    p.grad = None
            loss = loss.detach()
            total = total + loss / n
            task_sum[ds], task_count[ds] = task_sum.get(ds, 0.0) + loss, task_count.get(ds, 0) + 1
            for k, v in losses.items():
                term_sum[k], term_count[k] = term_sum.get(k, 0.0) + v.detach(), term_count.get(k, 0) + 1
        if self.aggregator is not None:
            self._aggregate(rows, {ds: task_count[ds] for ds in rows}, n)
        self.weighting.sync_grads()  # DDP: uncertainty's s_t are outside the DDP-wrapped model
        if self.distributed:  # every rank must take the same decision below: skip or step
            # The stop request (SIGINT / SIGTERM on any rank) rides on the same all-reduce, so
            # stopping costs no collective or host sync of its own (``_stop_requested``).
            signal_here = self._signal is not None and self._signal.requested is not None
            packed = torch.stack([total.float(), total.new_tensor(float(signal_here), dtype=torch.float32)])
            dist.all_reduce(packed)
            total, self._signals_seen = packed[0] / self.world, packed[1]
        if not torch.isfinite(total):  # host sync: the one per step, for the NaN policy
            self.optimizer.zero_grad(set_to_none=True)
            msg = f"non-finite loss {total.item()} at step {self.step + 1} on tasks {tasks}"
            if t["nan_policy"] == "stop":
                raise FloatingPointError(msg)
            self.skipped_steps += 1
            self.log.write({"step": self.step + 1, "event": "nan_skipped", "tasks": tasks, "message": msg})
            self.step += 1
            self.scheduler.step()
            return tasks, None
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t["max_grad_l2_norm"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        task_loss = {ds: task_sum[ds] / task_count[ds] for ds in task_sum}
        self.weighting.observe(task_loss)  # dwa's loss history; after the NaN check's host sync
        return tasks, {"loss": total, "task_loss": task_loss,
                       "losses": {k: term_sum[k] / term_count[k] for k in term_sum}}

    def _probe(self):
        """``sampling_mode: uncertainty``: score one probe batch per dataset, mix the means into
        the sampler and log them (every rank: the scores are all-reduced)."""
        started = time.perf_counter()
        u = self.probe.scores(self.model, self.device)
        self.sampler.update(u)
        self.loader.reset()  # batches prefetched by workers were drawn with the old probabilities
        self.log.write({"step": self.step, "event": "probe", "uncertainty": u,
                        "probabilities": self.sampler.probabilities(),
                        "seconds": time.perf_counter() - started})

    def _count_expert_usage(self, ds):
        """``model.moe``: add the last forward's expert slots to ``ds``'s counts (device tensors:
        no host sync until a train record reads them)."""
        for layer, usage in self.model.moe_usage().items():
            counts = self.expert_usage.setdefault(ds, {})
            counts[layer] = counts[layer] + usage if layer in counts else usage.clone()

    def _expert_usage_shares(self):
        """``{dataset: {layer: [share of the slots per expert]}}`` since the last record (this
        rank's tokens), then the counts restart."""
        out = {ds: {layer: (c.double() / c.sum().clamp_min(1)).tolist() for layer, c in layers.items()}
               for ds, layers in self.expert_usage.items()}
        self.expert_usage = {}
        return out

    def _shared_parameters(self):
        """The trainable parameters no dataset owns (``UniT.dataset_parameters``; rows of MMF's
        task-token tables count as shared): those ``training.aggregator`` aggregates."""
        own = {name for entries in self.model.dataset_parameters().values() for name, row in entries
               if row is None}
        return [p for name, p in self.model.named_parameters() if p.requires_grad and name not in own]

    def _aggregate(self, rows, counts, n):
        """``training.aggregator``: the shared parameters' gradient from the per-task rows.  Each
        micro-batch's backward took ``loss / n``, so a task's row is ``rows[ds] * n / counts[ds]``:
        the gradient of its mean micro-batch loss.  Under DDP the rows and the per-task parameters'
        gradients are averaged over ranks here (the backwards ran under ``no_sync``): the
        aggregators are not linear, so they must see the global per-task gradients."""
        names = list(rows)
        J = torch.stack([rows[ds] * (n / counts[ds]) for ds in names])  # (T, P)
        if self.distributed:
            dist.all_reduce(J)
            J /= self.world
            shared = {id(p) for p in self.shared_params}
            for p in self.model.parameters():  # the same parameters have gradients on every rank
                if p.grad is not None and id(p) not in shared:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        set_flat_grads(self.shared_params, self.aggregator.aggregate(J))

    def _stop_requested(self, stop):
        """Whether to stop now: a signal reached this process (any rank, under DDP: all ranks must
        stop after the same step, or the next collective hangs)."""
        if not self.distributed:
            return stop.requested is not None
        # Summed over ranks in train_step's all-reduce; read after its NaN check already synced.
        return bool(self._signals_seen.item() > 0)

    def train(self, max_updates=None, progress=True):
        """Train to ``max_updates`` (default ``training.max_updates``).  SIGINT / SIGTERM finish
        the current step, write a checkpoint and return with ``self.interrupted`` set to the
        signal's name; a second signal raises ``KeyboardInterrupt`` at once."""
        t = self.cfg["training"]
        max_updates = t["max_updates"] if max_updates is None else max_updates
        bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm  # its own ETA column: remaining steps at the measured rate

            bar = tqdm(total=max_updates, initial=self.step, desc="train", dynamic_ncols=True)
        samples_per_update = t["batch_size"] * t["accumulate"] * t["tasks_per_step"]
        since, samples = time.perf_counter(), 0  # throughput since the last train record
        stop = self._signal = GracefulStop()
        try:
            with stop:
                while self.step < max_updates:
                    tasks, stats = self.train_step()
                    samples += samples_per_update
                    if stats is not None and (self.step % t["log_every"] == 0 or self.step == max_updates):
                        rate = samples / max(1e-9, time.perf_counter() - since)
                        loss = float(stats["loss"])  # host sync, on log steps only
                        record = {"step": self.step, "event": "train", "tasks": tasks, "loss": loss,
                                  "task_loss": {k: float(v) for k, v in stats["task_loss"].items()},
                                  "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate,
                                  "losses": {k: float(v) for k, v in stats["losses"].items()}}
                        if self.weighting.method != "fixed":  # the default run's records stay as they were
                            record["loss_weights"] = self.weighting.weights()
                        if self.expert_usage:
                            record["expert_usage"] = self._expert_usage_shares()
                        self.log.write(record)
                        since, samples = time.perf_counter(), 0
                        if bar is not None:
                            bar.set_postfix(task="+".join(dict.fromkeys(tasks)), loss=f"{record['loss']:.3f}",
                                            lr=f"{record['lr']:.2e}", samples_s=f"{rate:.1f}")
                    if bar is not None:
                        bar.update(1)
                    if self._stop_requested(stop):
                        self.save()
                        self.interrupted = stop.requested or "a signal on another rank"
                        break
                    if t["eval_every"] and self.step % t["eval_every"] == 0:
                        started = time.perf_counter()
                        self.evaluate()
                        since += time.perf_counter() - started  # evaluation time is not training throughput
                    if self.step % t["checkpoint_every"] == 0 or self.step == max_updates:
                        self.save()
        finally:
            self._signal = None
            self.loader.reset()  # stop the workers
            self.log.flush()
            if bar is not None:
                bar.close()

    def evaluate(self, batch_size=None):
        """Score every val dataset now (``evaluate_datasets``; every rank must call it), log an
        ``eval`` record and remember it as ``last_eval``.  Returns ``{dataset: {metric: value}}``
        (complete on rank 0)."""
        results = evaluate_datasets(self.model, self.data, self.cfg, self.device, self.rank, self.world,
                                    batch_size=batch_size)
        self.log.write({"step": self.step, "event": "eval", "metrics": results})
        self.last_eval = (self.step, results)
        return results

    def final_evaluation(self):
        """The run's final metrics: the evaluation of the last step when it already ran."""
        if self.last_eval is not None and self.last_eval[0] == self.step:
            return self.last_eval[1]
        return self.evaluate()

    def skipped_images_total(self):
        """``{dataset: skipped training images}`` summed over ranks (every rank must call it)."""
        return {ds: int(self._sum_over_ranks(n)) for ds, n in self.skipped_images.total.items()}


def setup(args):
    """``(cfg, output_dir, trainer)`` for the parsed command line: a new run, or a resumed one
    whose config is its checkpoint's own with the command line's overrides on top."""
    from unit_fast.training import restore

    if args.resume is None:
        cfg = load_config(args.config, args.overrides)
        out = args.output_dir or cfg["training"]["output_dir"] or os.path.join(
            RUNS, f"{cfg['config_name']}-{time.strftime('%Y%m%d-%H%M%S')}")
        return cfg, out, Trainer(cfg, out, trust_checkpoint=args.trust_checkpoint)
    target = args.resume
    if target == LATEST:
        if args.output_dir:
            target = args.output_dir
        else:
            named = load_config(args.config, args.overrides)
            target = named["training"]["output_dir"] or newest_run(named["config_name"])
    path, state = find_resume(target, trust=args.trust_checkpoint)
    saved = restore.Checkpoint(path, "trainer", state, state.get("meta"), state["step"])
    cfg = restore.checkpoint_config(saved, overrides=args.overrides)
    out = args.output_dir or run_folder_of(path)
    trainer = Trainer(cfg, out, resume=(path, state), trust_checkpoint=args.trust_checkpoint)
    if trainer.rank == 0:
        extra = f"; overrides on top of its config: {' '.join(args.overrides)}" if args.overrides else ""
        print(f"resumed from step {trainer.step} of {cfg['training']['max_updates']} ({path}){extra}")
    return cfg, out, trainer


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Warnings on the command line are one line each (a torn checkpoint skipped, an old format read).
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        cfg, out, trainer = setup(args)
    except (UsageError, ValueError, OSError, KeyError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while reading data or building the model: nothing was written yet
        print("\ninterrupted before the run started; nothing was written", file=sys.stderr)
        return 130
    try:
        trainer.train()
    except KeyboardInterrupt:  # a second signal: stop at once, no checkpoint
        if trainer.rank == 0:
            print(f"\nstopped at once at step {trainer.step} (second signal); to continue from the newest "
                  f"checkpoint: {resume_command(out, trainer.world)}", file=sys.stderr)
        return 130
    if trainer.interrupted is not None:
        if trainer.rank == 0:
            print(f"\ninterrupted by {trainer.interrupted}: checkpoint of step {trainer.step} written; "
                  f"resume with: {resume_command(out, trainer.world)}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 130 if trainer.interrupted == "SIGINT" else 143
    results = trainer.final_evaluation()
    skipped = trainer.skipped_images_total()
    if trainer.rank == 0:
        kinds = trainer.data.kinds
        chance = chance_levels(None if cfg["data"]["datasets"] else trainer.data.root, kinds)
        targets = cfg["training"]["targets"]
        final = {"step": trainer.step, "skipped_steps": trainer.skipped_steps,
                 "skipped_images": skipped, "skipped_records": trainer.skipped_records, "metrics": results,
                 "chance": chance, "targets": targets, "targets_met": targets_met(results, targets, kinds)}
        atomic_write(os.path.join(out, "final_metrics.json"), json.dumps(final, indent=2, default=float),
                     binary=False)
        trainer.log.write({"step": trainer.step, "event": "final", "skipped_steps": trainer.skipped_steps,
                           "skipped_images": skipped, "skipped_records": trainer.skipped_records})
        trainer.log.close()
        plot_log(trainer.log.path, os.path.join(out, "plots"))
        print(format_table(results, chance, targets, kinds))
        print(f"trained {trainer.step} steps; checkpoints, log.jsonl, tensorboard/, plots/ and "
              f"final_metrics.json in {out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
