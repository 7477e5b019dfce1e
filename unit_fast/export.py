"""``python -m unit_fast.export --checkpoint RUN --format safetensors|onnx|torch.export [--task DATASET]
--out FILE [--trust-checkpoint] [--config NAME|PATH] [key=value ...]``

One command, three formats (``--output`` is an alias of ``--out``; without ``--format`` the
suffix of ``--out`` says which):

``safetensors`` (``FILE.safetensors``)
    The checkpoint's weights: tensors only, no pickle, so loading it can never run code.  From a
    trainer checkpoint the file also carries the run's config, metadata (tokenizer, answers, label
    names) and step as JSON in its header, so ``python -m unit_fast.evaluate`` and ``python -m
    unit_fast.predict`` take it exactly as they take the checkpoint; from an MMF / DETR checkpoint
    it carries the weights in MMF's layout (``load_mmf_checkpoint`` reads them).  The optimizer
    and RNG states are left out: it serves inference and fine-tuning (``training.init_from``),
    not ``--resume``.
``onnx`` (``FILE.onnx``) and ``torch.export`` (``FILE.pt2``, ``torch.export.save``)
    The trained UniT's graph for one dataset (``--task``; optional when the model serves one),
    traced on the CPU on the kernels' reference path (no ``unit_fast`` custom op in the graph,
    ``unit_fast/export_graph.py`` says how).  The graph takes the preprocessed batch and returns
    the head's raw outputs, with a dynamic batch dim (``unit_fast/task_graph.py``):

    - detection: ``image (B, 3, H, W)`` float32, ``image_mask (B, H, W)`` bool (True on padding)
      -> ``pred_logits (B, Q, C + 1)``, ``pred_boxes (B, Q, 4)`` normalised cxcywh;
    - vl (vqa, image-text classification): ``image``, ``image_mask``, ``input_ids``,
      ``input_mask``, ``segment_ids`` ``(B, L)`` int64 -> ``scores (B, num_labels)`` logits;
    - glue (text classification): ``input_ids``, ``input_mask``, ``segment_ids`` -> ``scores``.

    ``H = W`` = the dataset's test size and ``L`` its max length (the run metadata's) are fixed
    in the graph: pad (images) or pad and truncate (tokens) to them, as ``BatchCollator`` does.
    The names are printed after the export.  ``export_model`` (re-exported here) exports any
    ``nn.Module`` the same way, e.g. a DETR patched with ``unit_fast.patch_attention``.

Bad input prints one ``error:`` line and exits with status 2.
"""

import argparse
import os
import sys

import torch

from unit_fast.checkpoint_io import save_safetensors
from unit_fast.export_graph import FORMATS as GRAPH_FORMATS
from unit_fast.export_graph import SUFFIXES, export_model
from unit_fast.training import restore

__all__ = ["FORMATS", "export", "export_model", "export_task", "main"]

FORMATS = ("safetensors", *GRAPH_FORMATS)

DESCRIPTION = """\
Exports a checkpoint (a unit_fast run folder or checkpoint file, or an MMF /
DETR .pth), in the format --format names (default: by --out's suffix).
--format safetensors writes its weights, which hold
tensors only and so cannot run code when loaded; a trainer checkpoint's config,
metadata and step go into the file's header, so evaluate and predict accept the
exported file as they accept the checkpoint. --format onnx or torch.export
writes the model's graph for one dataset (--task): the preprocessed batch in,
the head's raw outputs out, with a dynamic batch size; the input and output
names are printed. Bad input prints one "error:" line and exits with status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m unit_fast.export", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    restore.add_checkpoint_arguments(p)
    p.add_argument("--out", "--output", dest="out", required=True,
                   help="the file to write: .safetensors, .onnx or .pt2 by --format (--output: the same)")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="what to write (default: by --out's suffix: .safetensors, .onnx, .pt2)")
    p.add_argument("--task", default=None,
                   help="onnx / torch.export: the dataset the graph serves, e.g. glue_sst2")
    p.add_argument("--config", default=None,
                   help="onnx / torch.export: a packaged config name or a .yaml path (default: the "
                        "checkpoint's)")
    p.add_argument("overrides", nargs="*", help="onnx / torch.export: dotted key=value config overrides")
    return p.parse_args(argv)


def export(checkpoint, output):
    """Write the weights of ``checkpoint`` (a ``restore.Checkpoint``) to the ``.safetensors``
    file ``output``; returns ``output``."""
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


def choose_task(served, task):
    """The dataset to export: ``task``, or the model's only one."""
    if task is not None:
        if task not in served:
            raise ValueError(f"--task {task!r}: this model serves {', '.join(served)}")
        return task
    if len(served) != 1:
        raise ValueError(f"--task: this model serves {', '.join(served)}: choose one")
    return next(iter(served))


def export_task(predictor, ds, format, out):
    """Export ``predictor``'s model (a ``unit_fast.Predictor``) for dataset ``ds`` as ``format``
    (``"onnx"`` / ``"torch.export"``) to ``out``, traced on the CPU.  Returns ``(inputs,
    outputs)``: ``"name (B, ...) dtype"`` of each, in the graph's order."""
    from unit_fast.task_graph import INPUT_NAMES, example_inputs, task_graph

    entry = predictor.metadata(ds)["datasets"][ds]
    graph = task_graph(predictor.model.cpu(), ds)
    names_in, names_out = INPUT_NAMES[graph.task], graph.output_names
    examples = example_inputs(graph, entry)
    export_model(graph, examples, format, out, input_names=names_in, output_names=names_out)
    with torch.no_grad():
        results = graph(*examples)
    return _describe(names_in, examples), _describe(names_out, results)


def _describe(names, tensors):
    """``["name (B, 3, 64, 64) float32", ...]``: dim 0 is the dynamic batch."""
    return [f"{n} {('B', *t.shape[1:])} {str(t.dtype).removeprefix('torch.')}".replace("'", "")
            for n, t in zip(names, tensors, strict=True)]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.format is None:  # by the suffix; an unknown one asks for the default's
            args.format = next((f for f in FORMATS if args.out.endswith(SUFFIXES[f])), "safetensors")
            if not args.out.endswith(SUFFIXES[args.format]):
                raise ValueError(f"--out: {args.out!r} must end in .safetensors, .onnx or .pt2 "
                                 "(or pass --format)")
        suffix = SUFFIXES[args.format]
        if not args.out.endswith(suffix):
            raise ValueError(f"--out: {args.out!r} must end in {suffix} (--format {args.format})")
        restore.check_output_folder(args.out, "--out")
        if args.format == "safetensors":
            if args.task is not None or args.config is not None or args.overrides:
                raise ValueError("--task, --config and overrides shape a graph export: --format safetensors "
                                 "writes the checkpoint's weights as they are")
            checkpoint = restore.read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
            export(checkpoint, args.out)
            source = checkpoint.path
        else:
            from unit_fast.predictor import Predictor

            predictor = Predictor.from_checkpoint(args.checkpoint, "cpu", trust=args.trust_checkpoint,
                                                  config=args.config, overrides=args.overrides)
            ds = choose_task(predictor.served, args.task)
            inputs, outputs = export_task(predictor, ds, args.format, args.out)
            source = f"{predictor.checkpoint.path} ({ds})"
    except (ValueError, OSError) as exc:
        print(f"error: {restore.one_line(exc)}", file=sys.stderr)
        return 2
    size = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB) from {source}")
    if args.format != "safetensors":
        print(f"  inputs:  {'; '.join(inputs)}")
        print(f"  outputs: {'; '.join(outputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
