"""``python -m unit_fast.train [--config NAME|PATH] [--output-dir DIR] [--resume [PATH]] [key=value ...]``

One linear loop (nanoGPT's ``train.py`` shape), numbered:
  1. config, output folder, logging;  2. distributed set-up (torchrun) and seeds;
  3. data (the synthetic default is generated once when ``data.root`` is null);
  4. model, optimizer, schedule, task sampler;  5. resume;  6. the training loop;
  7. evaluation and the per-task table.
Bad input (an unknown key, a malformed override, a missing path) prints one ``error:`` line
and exits with status 2, no traceback.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from unit_fast.config import load_config
from unit_fast.training import checkpoint as ckpt
from unit_fast.training.batches import to_device
from unit_fast.training.evaluation_loop import chance_levels, evaluate_datasets, format_table
from unit_fast.training.optim import build_optimizer, warmup_cosine
from unit_fast.training.sampling import TaskSampler, task_probabilities
from unit_fast.training.streams import BatchStream


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m unit_fast.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="default", help="a packaged config name or a .yaml path")
    p.add_argument("--output-dir", default=None, help="default: training.output_dir or runs/<config>-<time>")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from the output folder's newest checkpoint, or from PATH")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p.parse_args(argv)


def _device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("training.device=cuda but no CUDA device is available")
    return torch.device(name)


def _configure_model(cfg, data):
    """The model config fitted to the data: vocabulary size, VQA answers."""
    m = cfg["model"]
    if data.tokenizer is not None and m["bert"]["pretrained"] is None:
        m["bert"]["config"]["vocab_size"] = len(data.tokenizer)
    if data.answer_vocab is not None and "vqa2" in m["heads"].get("vl", {}):
        m["heads"]["vl"]["vqa2"]["num_labels"] = len(data.answer_vocab)


def _datasets_of(cfg):
    return [ds for qs in cfg["model"]["base_args"]["num_queries"].values() for ds in qs]


class Trainer:
    def __init__(self, cfg, output_dir, resume=None):
        # 1-2. output, distributed, seeds
        self.cfg, self.out = cfg, output_dir
        t = cfg["training"]
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = _device(t["device"])
        if self.distributed and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                self.device = torch.device("cuda", torch.cuda.current_device())
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        torch.manual_seed(t["seed"] + self.rank)
        os.makedirs(output_dir, exist_ok=True)

        # 3. data
        from unit_fast.training.data import build_data

        self.data = build_data(cfg, _datasets_of(cfg))
        _configure_model(cfg, self.data)

        # 4. model, optimizer, schedule, sampler
        from unit_fast.models.unit import build_model

        torch.manual_seed(t["seed"])  # identical initial weights on every rank
        self.model = build_model(cfg).to(self.device)
        self.model.set_backend(cfg["model"]["backend"])
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
                    if self.distributed else None)
        lr_backbone = cfg["model"]["base_args"]["lr_backbone"]
        self.optimizer = build_optimizer(self.model, t["lr"], lr_backbone, t["weight_decay"], t["eps"])
        self.scheduler = warmup_cosine(self.optimizer, t["warmup_steps"], t["max_updates"])
        sizes = {ds: len(d) for ds, d in self.data.train.items()}
        mode = t["sampling_mode"]
        if mode == "ratios" and not t["sampling"]:
            mode = "proportional"  # MMF's fallback when a config has no multitasking ratios
        self.sampler = TaskSampler(task_probabilities(sizes, mode, t["sampling"], t["temperature"]), seed=t["seed"])
        self.streams = {ds: BatchStream(d, ds, t["batch_size"], seed=t["seed"], rank=self.rank, world_size=self.world)
                        for ds, d in self.data.train.items()}
        from unit_fast.data.datasets import BatchCollator

        d = cfg["data"]
        self.collators = {ds: BatchCollator(ds, backend=d["decode_backend"], on_error=d["on_error"])
                          for ds in self.data.train}
        self.step, self.skipped_steps, self.skipped_images = 0, 0, 0
        self.log_path = os.path.join(output_dir, "log.jsonl")

        # 5. resume
        if resume is not None:
            path = ckpt.latest(os.path.join(output_dir, "checkpoints")) if resume == "latest" else resume
            if path is None:
                raise UsageError(f"--resume: no checkpoint in {os.path.join(output_dir, 'checkpoints')}")
            if not os.path.isfile(path):
                raise UsageError(f"--resume: {path} does not exist")
            self._load(path)

    # -- checkpoints ---------------------------------------------------------------------------

    def _payload(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "streams": {k: s.state_dict() for k, s in self.streams.items()}, "step": self.step,
                "skipped_steps": self.skipped_steps, "rng": ckpt.rng_state(), "config": self.cfg}

    def save(self):
        if self.rank == 0:
            ckpt.save(os.path.join(self.out, "checkpoints"), self.step, self._payload(),
                      keep=self.cfg["training"]["keep_checkpoints"])

    def _load(self, path):
        state = ckpt.load(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        for k, s in state["streams"].items():
            self.streams[k].load_state_dict(s)
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        ckpt.set_rng_state(state["rng"])

    # -- training ------------------------------------------------------------------------------

    def _batch(self, ds):
        idx = self.streams[ds].next_indices()
        dataset = self.data.train[ds]
        batch = self.collators[ds]([dataset[i] for i in idx])
        self.skipped_images += batch.pop("skipped", 0)
        return to_device(batch, self.device)

    def train_step(self):
        """One optimizer update (``accumulate`` micro-batches of one task).  Returns the task and the
        loss dict (floats), or None for a step skipped by the NaN policy."""
        t = self.cfg["training"]
        model = self.ddp or self.model
        model.train()
        ds = next(self.sampler)
        losses_log = {}
        for _ in range(t["accumulate"]):
            batch = self._batch(ds)
            losses = model(batch)["losses"]
            loss = sum(losses.values()) / t["accumulate"]
            (loss).backward()
            for k, v in losses.items():
                losses_log[k] = losses_log.get(k, 0.0) + v.detach() / t["accumulate"]
        total = sum(losses_log.values())
        if not torch.isfinite(total):  # host sync: the one per step, for the NaN policy
            self.optimizer.zero_grad(set_to_none=True)
            msg = f"non-finite loss {total.item()} at step {self.step + 1} on task {ds}"
            if t["nan_policy"] == "stop":
                raise FloatingPointError(msg)
            self.skipped_steps += 1
            self._log({"step": self.step + 1, "event": "nan_skipped", "task": ds, "message": msg})
            self.step += 1
            self.scheduler.step()
            return ds, None
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t["max_grad_l2_norm"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return ds, losses_log

    def _log(self, record):
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def train(self, max_updates=None, progress=True):
        t = self.cfg["training"]
        max_updates = t["max_updates"] if max_updates is None else max_updates
        bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=max_updates, initial=self.step, desc="train", dynamic_ncols=True)
        start, samples = time.perf_counter(), 0
        while self.step < max_updates:
            ds, losses = self.train_step()
            samples += t["batch_size"] * t["accumulate"]
            if losses is not None and (self.step % t["log_every"] == 0 or self.step == max_updates):
                record = {"step": self.step, "task": ds, "lr": self.scheduler.get_last_lr()[0],
                          **{k: float(v) for k, v in losses.items()}}
                self._log(record)
                if bar is not None:
                    rate = samples / max(1e-9, time.perf_counter() - start)
                    bar.set_postfix(task=ds, loss=f"{sum(float(v) for v in losses.values()):.3f}",
                                    lr=f"{record['lr']:.2e}", samples_s=f"{rate:.1f}")
            if bar is not None:
                bar.update(1)
            if self.step % t["checkpoint_every"] == 0 or self.step == max_updates:
                self.save()
        if bar is not None:
            bar.close()


def evaluate(trainer, batch_size=None):
    """``evaluate_datasets`` on the trainer's model and val data."""
    return evaluate_datasets(trainer.model, trainer.data, trainer.cfg, trainer.device, trainer.rank, trainer.world,
                             batch_size=batch_size)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        out = args.output_dir or cfg["training"]["output_dir"] or os.path.join(
            "runs", f"{cfg['config_name']}-{time.strftime('%Y%m%d-%H%M%S')}")
        trainer = Trainer(cfg, out, resume=args.resume)
    except (UsageError, ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trainer.train()
    results = evaluate(trainer)
    if trainer.rank == 0:
        chance = chance_levels(trainer.data.root if cfg["data"]["root"] is None else None)
        final = {"step": trainer.step, "skipped_steps": trainer.skipped_steps,
                 "skipped_images": trainer.skipped_images, "metrics": results, "chance": chance}
        tmp = os.path.join(out, "final_metrics.json.tmp")
        with open(tmp, "w") as f:
            json.dump(final, f, indent=2, default=float)
        os.replace(tmp, os.path.join(out, "final_metrics.json"))
        print(format_table(results, chance))
        print(f"trained {trainer.step} steps; checkpoints, log.jsonl and final_metrics.json in {out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
