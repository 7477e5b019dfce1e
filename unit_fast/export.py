"""``python -m unit_fast.export --checkpoint PATH --output FILE.safetensors [--trust-checkpoint]``

Writes a checkpoint's weights as a ``.safetensors`` file: tensors only, no pickle, so loading it
can never run code.  From a trainer checkpoint the file also carries the run's config, metadata
(tokenizer, answers, label names) and step as JSON in its header, so ``python -m unit_fast.evaluate``
and ``python -m unit_fast.predict`` take it exactly as they take the checkpoint; from an MMF / DETR
checkpoint it carries the weights in MMF's layout (``load_mmf_checkpoint`` reads them).  The
optimizer and RNG states are left out: a ``.safetensors`` file serves inference and fine-tuning
(``training.init_from``), not ``--resume``.

Bad input prints one ``error:`` line and exits with status 2.
"""

import argparse
import os
import sys

import torch

from unit_fast.checkpoint_io import save_safetensors
from unit_fast.training import restore

DESCRIPTION = """\
Writes the weights of a checkpoint (a unit_fast run folder or checkpoint file,
or an MMF / DETR .pth) as a .safetensors file, which holds tensors only and so
cannot run code when it is loaded. A trainer checkpoint's config, metadata and
step go into the file's header, so evaluate and predict accept the exported
file as they accept the checkpoint. Bad input prints one "error:" line and
exits with status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m unit_fast.export", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    restore.add_checkpoint_arguments(p)
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    return p.parse_args(argv)


def export(checkpoint, output):
    """Write ``checkpoint`` (a ``restore.Checkpoint``) to ``output``; returns ``output``."""
    state = checkpoint.state
    weights = state["model"] if "model" in state else state
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {checkpoint.path!r}: 'model' entries that are not tensors: {bad[:5]}")
    metadata = {"format": "unit_fast"}
    if checkpoint.kind == "trainer":
        metadata.update(config=restore.plain_config(state["config"]), meta=state.get("meta"),
                        step=state.get("step"))
    return save_safetensors(output, weights, metadata)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.output.endswith(".safetensors"):
            raise ValueError(f"--output: {args.output!r} must end in .safetensors")
        restore.check_output_folder(args.output, "--output")
        checkpoint = restore.read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        export(checkpoint, args.output)
    except (ValueError, OSError) as exc:
        print(f"error: {restore.one_line(exc)}", file=sys.stderr)
        return 2
    size = os.path.getsize(args.output) / 2**20
    print(f"wrote {args.output} ({size:.1f} MiB) from {checkpoint.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
