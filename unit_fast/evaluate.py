"""``python -m unit_fast.evaluate --checkpoint PATH [--config NAME|PATH] [--datasets a,b]
[--output FILE.json] [--batch-size N] [--device cpu|cuda|auto] [key=value ...]``

Scores a checkpoint on the val split of every dataset its model serves (or of ``--datasets``),
by the trainer's evaluation loop, and prints the per-task table (with the synthetic dataset's
chance levels when the data is the synthetic default).

  1. the checkpoint: a file, or a run folder (its newest checkpoint);
  2. the config: the trainer checkpoint's own, with the ``key=value`` overrides on top (e.g. the
     real datasets' paths on this machine), or ``--config`` (required for MMF checkpoints);
  3. the val data, checked against the checkpoint's tokenizer and VQA answers;
  4. the model and its weights;  5. evaluation, the table, and ``--output`` JSON::

       {"checkpoint": path, "step": int|null, "config_name": str,
        "metrics": {dataset: {metric: float}}, "chance": {dataset: float}}

Bad input (a missing checkpoint, an unknown dataset or config key, a malformed override, a
missing dataset path) prints one ``error:`` line and exits with status 2, no traceback.
"""

import argparse
import json
import os
import sys

from unit_fast.atomic import atomic_write
from unit_fast.config import packaged_configs_epilog
from unit_fast.training import restore
from unit_fast.training.batches import resolve_device

# The --help description: complete sentences, wrapped here (RawDescriptionHelpFormatter).
DESCRIPTION = """\
Scores a trained UniT checkpoint on the val split of every dataset its model
serves (or of --datasets) with the trainer's evaluation loop, and prints one
table row per dataset: its metric, with the chance level where the data is the
synthetic default.

The config is the checkpoint's own with the key=value overrides on top (for
example the real datasets' paths on this machine); an MMF checkpoint has none,
so it needs --config. --output also writes the metrics as JSON: "checkpoint",
"step", "config_name", "metrics" {dataset: {metric: value}} and "chance"
{dataset: value}. Bad input prints one "error:" line and exits with status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m unit_fast.evaluate", description=DESCRIPTION,
                                epilog=packaged_configs_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    restore.add_checkpoint_arguments(p)
    p.add_argument("--config", default=None,
                   help="a packaged config name or a .yaml path (default: the checkpoint's own config)")
    p.add_argument("--datasets", default=None, help="comma-separated dataset names (default: the model's)")
    p.add_argument("--output", default=None, help="write the metrics to this JSON file")
    p.add_argument("--batch-size", type=int, default=None, help="default: training.batch_size")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p.parse_args(argv)


def select_datasets(cfg, names):
    """The model's datasets, or ``names`` (comma-separated) after checking each is one of them."""
    available = list(restore.model_datasets(cfg))
    if names is None:  # the declared datasets the model serves (data.datasets), else all of them
        declared = [ds for ds in cfg["data"]["datasets"] or {} if ds in available]
        return declared or available
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in available]
    if unknown or not chosen:
        raise ValueError(f"--datasets: {unknown or names!r} not served by this model; "
                         f"it has: {', '.join(available)}")
    return chosen


def prepare(args):
    """Steps 1-4: ``(checkpoint, cfg, data, model, device, datasets)``."""
    from unit_fast.training.metadata import check_data_matches

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output:
        restore.check_output_folder(args.output, "--output")
    device = resolve_device(args.device)
    checkpoint = restore.read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    cfg = restore.checkpoint_config(checkpoint, args.config, args.overrides)
    datasets = select_datasets(cfg, args.datasets)
    data = restore.build_eval_data(cfg, datasets)
    if checkpoint.meta is not None:
        check_data_matches(checkpoint.meta, data)
    model = restore.restore_model(checkpoint, cfg, device)
    return checkpoint, cfg, data, model, device, datasets


def _write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, default=float), binary=False)


def main(argv=None):
    from unit_fast.training.evaluation_loop import chance_levels, evaluate_datasets, format_table

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        checkpoint, cfg, data, model, device, datasets = prepare(args)
        # Unreadable images surface only while evaluating: the same one-line report.
        results = evaluate_datasets(model, data, cfg, device, batch_size=args.batch_size, datasets=datasets)
    except (ValueError, OSError) as exc:  # ImageDecodeError is a ValueError
        print(f"error: {restore.one_line(exc)}", file=sys.stderr)
        return 2
    chance = chance_levels(None if cfg["data"]["datasets"] else data.root, data.kinds)
    print(format_table(results, chance, kinds=data.kinds))
    step = "" if checkpoint.step is None else f" (step {checkpoint.step})"
    print(f"evaluated {checkpoint.path}{step} on {len(results)} dataset(s)")
    if args.output:
        _write_json(args.output, {"checkpoint": os.path.abspath(checkpoint.path), "step": checkpoint.step,
                                  "config_name": cfg.get("config_name"), "metrics": results,
                                  "chance": chance})
        print(f"metrics written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
