"""``python -m unit_fast.predict --checkpoint PATH [--image PATH | --images DIR|GLOB] [--question TEXT |
--hypothesis TEXT | --text TEXT [--text-pair TEXT]] [--task DATASET] [--threshold 0.5] [--top-k 5]
[--batch-size 8] [--output FILE] [--save-image OUT.png] [--json] [--device cpu|cuda|auto]
[--config NAME|PATH] [--trust-checkpoint] [key=value ...]``

Predictions of a trained UniT (``unit_fast.Predictor``, which holds the model-running logic) on
one input, or on many images (``--images``: a folder's image files or a glob, in batches of
``--batch-size``, with a progress bar on stderr; a ``--question`` / ``--hypothesis`` is asked of
every image).  The task follows from the input, by the task
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
configured data to rebuild it.  ``--json`` prints the result as one JSON object (with
``--images``: one line per image, with its ``"image"`` path).

``--output FILE`` writes the results atomically: for detection in COCO's results format
(``[{"image_id", "category_id", "bbox": [x, y, w, h] original pixels, "score"}]``; the
``image_id`` is the file's stem as an int where it is one, as COCO names its files
(``000000397133.jpg`` -> 397133), else the file name; ``category_id`` the raw category id;
only detections scoring at least ``--threshold``, so use ``--threshold 0`` for COCO AP), for the
other kinds JSON Lines: one result per input, with its ``"image"`` file where it has one.

Bad input (a missing checkpoint or image, a task the model does not serve, inputs that do not fit
the task, an unknown config key or malformed override) prints one ``error:`` line and exits 2.
"""

import argparse
import json
import os
import sys

from unit_fast.atomic import atomic_write, image_format
from unit_fast.config import packaged_configs_epilog
from unit_fast.predictor import INPUTS, KEYWORDS, Predictor, served_kinds
from unit_fast.predictor import choose_dataset as choose_dataset_of
from unit_fast.training import restore
from unit_fast.training.batches import resolve_device

__all__ = ["choose_dataset", "coco_results", "draw_detections", "list_images", "main", "served_kinds"]
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
prints the result as one JSON object. --images DIR|GLOB predicts every image
of a folder (or a quoted glob) in batches of --batch-size; --output FILE
writes COCO results JSON for detection, JSON Lines for the other kinds. A picture like the synthetic training
images, to try a model on, is written by

  python -m unit_fast.data.sample_image shapes.jpg

Bad input prints one "error:" line and exits with status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m unit_fast.predict", description=DESCRIPTION,
                                epilog=packaged_configs_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    restore.add_checkpoint_arguments(p)
    p.add_argument("--image", default=None, help="a JPEG or PNG image")
    p.add_argument("--images", default=None, metavar="DIR|GLOB",
                   help="many images, predicted in batches: a folder's image files, or a quoted glob")
    p.add_argument("--batch-size", type=int, default=8, help="--images: images per forward (default 8)")
    p.add_argument("--output", default=None,
                   help="write the results: COCO results JSON for detection, else JSON Lines (one per input)")
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


def _flag(name):
    return f"--{name.replace('_', '-')}"


def _namer(args):
    """How errors name an input: its flag (``--images`` for the images of ``--images``)."""
    return lambda n: "--images" if n == "image" and args.images is not None else _flag(n)


def choose_dataset(args, served):
    """The dataset to predict for, from the inputs given and ``served`` (``{dataset: TaskKind}``):
    ``--task``, else the one served dataset whose kind takes exactly the inputs given."""
    given = {n for n in INPUTS if getattr(args, n) is not None}
    if getattr(args, "images", None) is not None:
        given.add("image")
    ds = choose_dataset_of(given, args.task, served, _namer(args))
    if args.save_image is not None and served[ds].model_task != "detection":
        raise ValueError("--save-image draws detections: it needs a detection task")
    return ds


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(pattern):
    """The image files ``--images`` names, sorted: a folder's files with an image suffix
    (``IMAGE_SUFFIXES``, any case; not its subfolders), or the files a glob matches."""
    import glob

    if os.path.isdir(pattern):
        files = [os.path.join(pattern, f) for f in os.listdir(pattern)
                 if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(pattern, f))]
        where = f"folder {pattern!r} has no {', '.join(IMAGE_SUFFIXES)} files"
    else:
        files = [f for f in glob.glob(pattern) if os.path.isfile(f)]
        where = f"{pattern!r} is no folder and matches no file"
    if not files:
        raise FileNotFoundError(f"--images: {where}")
    return sorted(files)


def coco_image_id(path):
    """The COCO ``image_id`` of an image file: its stem as an int where it is one
    (``000000397133.jpg`` -> 397133, as COCO names its files), else the file name."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else os.path.basename(path)


def coco_results(results, paths):
    """Detections in COCO's results format: ``[{"image_id", "category_id", "bbox": [x, y, w, h]
    original-image pixels, "score"}]``, image by image, best first."""
    return [{"image_id": coco_image_id(path), "category_id": d["label"],
             "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]],
             "score": d["score"]}
            for r, path in zip(results, paths, strict=True) for d in r["detections"]]


def write_output(path, results, paths):
    """``--output``: COCO results JSON for detection, else JSON Lines (one result per input,
    with its ``"image"`` file where it has one); written atomically."""
    if results and results[0]["kind"] == "detection":
        text = json.dumps(coco_results(results, paths)) + "\n"
    else:
        text = "".join(json.dumps({**({"image": p} if p is not None else {}), **r}) + "\n"
                       for r, p in zip(results, paths, strict=True))
    atomic_write(path, text.encode())


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


def format_result(r, args, image=None):
    """The human-readable lines of a prediction (its kind's); ``image``: the file, for ``--images``."""
    from unit_fast.tasks import task_kind

    inputs = {n: getattr(args, n) for n in INPUTS}
    if image is not None:
        inputs["image"] = image
    return task_kind(r["kind"]).format_result(r, inputs)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not 0.0 <= args.threshold <= 1.0:
            raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
        if args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.images is not None and args.image is not None:
            raise ValueError("give --image or --images, not both")
        if args.images is not None and args.save_image is not None:
            raise ValueError("--save-image draws one --image: it does not take --images")
        for path, option in ((args.save_image, "--save-image"), (args.output, "--output")):
            if path is not None:
                restore.check_output_folder(path, option)
        paths = list_images(args.images) if args.images is not None else [args.image]
        device = resolve_device(args.device)
        predictor = Predictor.from_checkpoint(args.checkpoint, device, trust=args.trust_checkpoint,
                                              config=args.config, overrides=args.overrides)
        choose_dataset(args, predictor.served)
        inputs = {KEYWORDS[n]: getattr(args, n) for n in INPUTS if getattr(args, n) is not None}
        if args.images is not None:
            inputs["images"] = paths
        results = predictor(**inputs, task=args.task, threshold=args.threshold, top_k=args.top_k,
                            batch_size=args.batch_size, progress=args.images is not None, name=_namer(args))
        if args.save_image is not None:
            draw_detections(args.image, results[0]["detections"], args.save_image)
        if args.output is not None:
            write_output(args.output, results, paths)
    except (ValueError, OSError) as exc:  # ImageDecodeError and PIL's UnidentifiedImageError included
        print(f"error: {restore.one_line(exc)}", file=sys.stderr)
        return 2
    if args.images is None:
        result = results[0]
        print(json.dumps(result, indent=2) if args.json else format_result(result, args))
    else:  # one result per image: JSON Lines, or each image's lines
        for r, path in zip(results, paths, strict=True):
            print(json.dumps({"image": path, **r}) if args.json else format_result(r, args, image=path))
    if args.save_image is not None and not args.json:
        print(f"image with boxes written to {args.save_image}")
    if args.output is not None and not args.json:
        print(f"{len(results)} result(s) written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
