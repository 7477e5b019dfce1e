"""``python -m unit_fast.predict --checkpoint PATH [--image PATH] [--question TEXT | --hypothesis TEXT
| --text TEXT [--text-pair TEXT]] [--task DATASET] [--threshold 0.5] [--top-k 5]
[--save-image OUT.png] [--json] [--device cpu|cuda|auto] [--config NAME|PATH] [key=value ...]``

One prediction of a trained UniT on one input.  The task follows from the input, by the task
kind that takes exactly those inputs (``predict_inputs`` of ``unit_fast/tasks``):

  ``--image`` alone            ``detection``: every query scoring at least ``--threshold``, as
                               category name, score and box ``x0 y0 x1 y1`` in the original
                               image's pixels; ``--save-image`` draws them;
  ``--image --question``       ``vqa``: the answer and its score (sigmoid of the BCE head), top-k;
  ``--image --hypothesis``     ``image_text_classification``: the label and every probability;
  ``--text [--text-pair]``     ``text_classification``: the label and every probability.

``--task DATASET`` picks the dataset when the model serves several of the kind (or to be
explicit).  The input becomes a batch by the evaluation path itself: the kind's one-record val
dataset (test-time resize, MMF's token layout and the run's max length) and ``BatchCollator``;
so a prediction equals the model's output on the same val item.  Tokenizer, answers, category
and label names, image sizes and text lengths come from the checkpoint's ``"meta"``
(``training/metadata.py``); a checkpoint without it (MMF, or an older trainer) needs the
configured data to rebuild it.  ``--json`` prints the result as one JSON object.

Bad input (a missing checkpoint or image, a task the model does not serve, inputs that do not fit
the task, an unknown config key or malformed override) prints one ``error:`` line and exits 2.
"""

import argparse
import json
import os
import sys

import torch

from unit_fast.atomic import atomic_write, image_format
from unit_fast.config import packaged_configs_epilog
from unit_fast.training import restore
from unit_fast.training.batches import resolve_device

INPUTS = ("image", "question", "hypothesis", "text", "text_pair")
_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


# The --help description: complete sentences, wrapped here (RawDescriptionHelpFormatter).
DESCRIPTION = """\
Predicts with a trained UniT checkpoint on one input. The inputs given choose
the task kind:

  --image                         detection: every box scoring at least
                                  --threshold, as category, score and box in
                                  the image's pixels (--save-image draws them)
  --image --question TEXT         vqa (e.g. vqa2): the answer and the --top-k
                                  best ones
  --image --hypothesis TEXT       image-text classification (e.g.
                                  visual_entailment): the label and every
                                  probability
  --text TEXT [--text-pair TEXT]  text classification (e.g. a GLUE task): the
                                  label and every probability

--task DATASET picks the dataset where the model serves several of one kind
(the embedded default has two GLUE tasks, glue_sst2 and glue_qnli). --json
prints the result as one JSON object. A picture like the synthetic training
images, to try a model on, is written by

  python -m unit_fast.data.sample_image shapes.jpg

Bad input prints one "error:" line and exits with status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m unit_fast.predict", description=DESCRIPTION,
                                epilog=packaged_configs_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    restore.add_checkpoint_arguments(p)
    p.add_argument("--image", default=None, help="a JPEG or PNG image")
    p.add_argument("--question", default=None, help="a question about --image (vqa2)")
    p.add_argument("--hypothesis", default=None, help="a hypothesis about --image (visual_entailment)")
    p.add_argument("--text", default=None, help="a sentence (GLUE)")
    p.add_argument("--text-pair", default=None, help="the second sentence of a GLUE pair task")
    p.add_argument("--task", default=None, help="the dataset to predict for, e.g. detection_coco, glue_qnli")
    p.add_argument("--threshold", type=float, default=0.5, help="detection: lowest score shown (default 0.5)")
    p.add_argument("--top-k", type=int, default=5, help="vqa2: answers listed (default 5)")
    p.add_argument("--save-image", default=None, help="detection: write the image with the boxes drawn here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--config", default=None,
                   help="a packaged config name or a .yaml path (default: the checkpoint's own config)")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p.parse_args(argv)


def served_kinds(cfg):
    """``{dataset: TaskKind}`` of the datasets the configured model serves."""
    from unit_fast.tasks import model_kind

    return {ds: model_kind(ds, task, cfg["model"]["heads"].get(task, {}).get(ds))
            for ds, task in restore.model_datasets(cfg).items()}


def _flag(name):
    return f"--{name.replace('_', '-')}"


def _takes(kind, given):
    required, optional = kind.predict_inputs
    return set(required) <= given <= set(required) | set(optional)


def choose_dataset(args, served):
    """The dataset to predict for, from the inputs given and ``served`` (``{dataset: TaskKind}``):
    ``--task``, else the one served dataset whose kind takes exactly the inputs given."""
    texts = [f"--{name}" for name in ("question", "hypothesis", "text") if getattr(args, name) is not None]
    if len(texts) > 1:
        raise ValueError(f"give one of --question, --hypothesis, --text; got {' and '.join(texts)}")
    given = {n for n in INPUTS if getattr(args, n) is not None}
    if args.task is not None:
        if args.task not in served:
            raise ValueError(f"--task {args.task!r}: this model serves {', '.join(served)}")
        ds = args.task
    else:
        if not given:
            raise ValueError("nothing to predict: give --image (detection), --image with --question "
                             "(vqa) or --hypothesis (image-text classification), or --text (text classification)")
        from unit_fast.tasks import KINDS

        wanted = [k for k in KINDS.values() if _takes(k, given)]
        options = [d for d, k in served.items() if k in wanted]
        flags = " ".join(_flag(n) for n in INPUTS if n in given)
        if not options:
            if not wanted:
                raise ValueError(f"no task kind takes {flags}")
            names = ", ".join(k.name for k in wanted)
            raise ValueError(f"{flags} asks for a {names} task, which this model does not serve; "
                             f"it has: {', '.join(served)}")
        if len(options) > 1:
            raise ValueError(f"this model has several {', '.join(k.name for k in wanted)} datasets "
                             f"({', '.join(options)}): choose one with --task")
        ds = options[0]
    required, optional = served[ds].predict_inputs
    missing = [_flag(n) for n in required if getattr(args, n) is None]
    extra = [_flag(n) for n in INPUTS if getattr(args, n) is not None and n not in required and n not in optional]
    if missing or extra:
        problems = ([f"needs {', '.join(missing)}"] if missing else []) + \
                   ([f"takes no {', '.join(extra)}"] if extra else [])
        raise ValueError(f"{ds}: {'; '.join(problems)}")
    if args.save_image is not None and served[ds].model_task != "detection":
        raise ValueError("--save-image draws detections: it needs a detection task")
    return ds


def _metadata(checkpoint, cfg, ds):
    """The run metadata: the checkpoint's, else rebuilt from the configured data of ``ds``."""
    meta = checkpoint.meta
    if meta is None:
        from unit_fast.training.metadata import run_metadata

        try:
            data = restore.build_eval_data(cfg, [ds])
        except (ValueError, OSError) as exc:
            raise ValueError(f"checkpoint {checkpoint.path!r} has no run metadata (not written by "
                             "unit_fast.train), and the configured data to rebuild it cannot be read: "
                             f"{restore.one_line(exc)}") from None
        meta = run_metadata(cfg, data)
    if ds not in meta.get("datasets", {}):
        raise ValueError(f"checkpoint {checkpoint.path!r}: its metadata has no entry for {ds}")
    return meta


def build_batch(ds, kind, meta, args, decoder=None):
    """The one-item batch of the input, made as evaluation makes one: the kind's one-record val
    dataset (test-time resize, MMF's token layout, the run's max length) and ``BatchCollator``
    (``dataset_type="test"``; ``targets`` None, so no loss is computed).

    Returns ``(batch, size)``: ``batch`` as ``UniT.forward`` takes it (``image`` a NestedTensor
    ``(1, 3, H, W)`` float32 normalised, for detection and vl; ``input_ids``, ``input_mask``,
    ``segment_ids`` ``(1, max_length)`` int64 for vl and glue); ``size`` the original image's
    ``(h, w)`` in pixels, or None without an image."""
    from PIL import Image

    from unit_fast.data import datasets as D
    from unit_fast.training.metadata import image_sizes_from_metadata, tokenizer_from_metadata

    entry = meta["datasets"][ds]
    size = sizes = None
    inputs = {n: getattr(args, n) for n in INPUTS if getattr(args, n) is not None}
    if args.image is not None:
        if not os.path.isfile(args.image):
            raise FileNotFoundError(f"--image {args.image!r} does not exist")
        try:
            with Image.open(args.image) as im:  # the header only
                w, h = im.size
        except OSError as exc:  # PIL's UnidentifiedImageError
            raise ValueError(f"--image: {exc}") from None
        size = inputs["size"] = (h, w)
        sizes = image_sizes_from_metadata(entry)
    tokenizer = None if kind.text_length is None else tokenizer_from_metadata(meta)
    dataset = kind.predict_dataset(ds, entry, inputs, tokenizer, sizes)
    batch = D.BatchCollator(ds, decoder=decoder, dataset_type="test")([dataset[0]])
    batch["targets"] = None  # a prediction: no loss
    return batch, size


@torch.no_grad()
def predict(model, batch, ds, kind, meta, cfg, size, device, threshold=0.5, top_k=5):
    """The model's prediction on ``batch`` as a JSON-like dict with ``dataset``, ``kind`` and
    ``task``, and: detection ``image_size [w, h]``, ``threshold``, ``detections`` (label, name,
    score, box in original-image pixels); vqa ``answer``, ``score``, ``top [{answer, score}]``;
    classification kinds ``label``, ``index``, ``probabilities {label: p}``."""
    from unit_fast.training.batches import to_device

    out = model(to_device(batch, device))
    head = cfg["model"]["heads"][kind.model_task][ds]
    return kind.predict_result(ds, out, meta["datasets"][ds], head, size, {"threshold": threshold, "top_k": top_k})


def drawing_scale(width, height):
    """``(line_width, font_size, padding)`` in pixels for drawing on a ``width x height`` image:
    proportional to its short side, so that a 64 px picture (the synthetic default's) keeps most
    of itself visible and a photo gets captions large enough to read. 8 px is the smallest font
    that stays legible; 1 px the thinnest line."""
    short = min(width, height)
    return max(1, round(short / 200)), max(8, round(short / 25)), round(short / 160)


def _caption_font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size: its one bitmap font (about 11 px)
        return ImageFont.load_default()


def draw_detections(image_path, detections, out_path):
    """Write ``image_path`` with each detection's box and ``name score`` caption drawn, to
    ``out_path`` (same size; the format from its extension). Line width, font and caption box
    scale with the image (``drawing_scale``). A caption sits above its box, or inside the box's
    top edge where there is no room above, shifted left where it would leave the image; where
    captions overlap, the better detection's (earlier in ``detections``) is on top."""
    from PIL import Image, ImageDraw

    with Image.open(image_path) as im:
        canvas = im.convert("RGB")
    line, size, pad = drawing_scale(*canvas.size)
    font = _caption_font(size)
    draw = ImageDraw.Draw(canvas)
    for d in detections:  # every box first, so that no box line crosses a caption
        draw.rectangle(d["box"], outline=_COLORS[d["label"] % len(_COLORS)], width=line)
    for d in reversed(detections):  # the best (first) caption drawn last: on top where they overlap
        color = _COLORS[d["label"] % len(_COLORS)]
        x0, y0 = d["box"][:2]
        caption = f"{d['name']} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)  # ink extent at the origin
        w, h = right - left + 2 * pad, bottom - top + 2 * pad  # the caption box
        bx = min(max(0.0, x0), max(0.0, canvas.width - w))
        by = y0 - h if y0 - h >= 0 else max(0.0, y0)
        draw.rectangle([bx, by, bx + w - 1, by + h - 1], fill=color)
        draw.text((bx + pad - left, by + pad - top), caption, fill="white", font=font)
    atomic_write(out_path, lambda f: canvas.save(f, format=image_format(out_path, "--save-image")))


def format_result(r, args):
    """The human-readable lines of a prediction (its kind's)."""
    from unit_fast.tasks import task_kind

    return task_kind(r["kind"]).format_result(r, {n: getattr(args, n) for n in INPUTS})


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not 0.0 <= args.threshold <= 1.0:
            raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
        if args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
        if args.save_image is not None:
            restore.check_output_folder(args.save_image, "--save-image")
        device = resolve_device(args.device)
        checkpoint = restore.read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        cfg = restore.checkpoint_config(checkpoint, args.config, args.overrides)
        served = served_kinds(cfg)
        ds = choose_dataset(args, served)
        meta = _metadata(checkpoint, cfg, ds)
        batch, size = build_batch(ds, served[ds], meta, args, cfg["data"]["decoder"])
        model = restore.restore_model(checkpoint, cfg, device)
        result = predict(model, batch, ds, served[ds], meta, cfg, size, device, args.threshold, args.top_k)
        if args.save_image is not None:
            draw_detections(args.image, result["detections"], args.save_image)
    except (ValueError, OSError) as exc:  # ImageDecodeError and PIL's UnidentifiedImageError included
        print(f"error: {restore.one_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_result(result, args))
    if args.save_image is not None and not args.json:
        print(f"image with boxes written to {args.save_image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
