"""``python -m unit_fast.predict --checkpoint PATH [--image PATH] [--question TEXT | --hypothesis TEXT
| --text TEXT [--text-pair TEXT]] [--task DATASET] [--threshold 0.5] [--top-k 5]
[--save-image OUT.png] [--json] [--device cpu|cuda|auto] [--config NAME|PATH] [key=value ...]``

One prediction of a trained UniT on one input.  The task follows from the input:

  ``--image`` alone            detection (the model's detection dataset): every query scoring at
                               least ``--threshold``, as category name, score and box ``x0 y0 x1
                               y1`` in the original image's pixels; ``--save-image`` draws them;
  ``--image --question``       ``vqa2``: the answer and its score (sigmoid of the BCE head), top-k;
  ``--image --hypothesis``     ``visual_entailment``: the label and the three probabilities;
  ``--text [--text-pair]``     the model's GLUE dataset: the sentence (pair) label and probabilities.

``--task DATASET`` picks the dataset when the model serves several of the kind (or to be
explicit).  The input becomes a batch by the evaluation path itself: a record of the dataset's
type, the val dataset class (test-time resize, MMF's token layout and the run's max length) and
``BatchCollator``; so a prediction equals the model's output on the same val item.  Tokenizer,
answers, category and label names, image sizes and text lengths come from the checkpoint's
``"meta"`` (``training/metadata.py``); a checkpoint without it (MMF, or an older trainer) needs
the configured data to rebuild it.  ``--json`` prints the result as one JSON object.

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
# What each kind of dataset takes: (required inputs, optional inputs).
_NEEDS = {"detection": (("image",), ()), "vqa2": (("image", "question"), ()),
          "visual_entailment": (("image", "hypothesis"), ()), "glue": (("text",), ("text_pair",))}
_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


# The --help description: complete sentences, wrapped here (RawDescriptionHelpFormatter).
DESCRIPTION = """\
Predicts with a trained UniT checkpoint on one input. The inputs given choose
the task:

  --image                         detection: every box scoring at least
                                  --threshold, as category, score and box in
                                  the image's pixels (--save-image draws them)
  --image --question TEXT         vqa2: the answer and the --top-k best ones
  --image --hypothesis TEXT       visual_entailment: the label and the three
                                  probabilities
  --text TEXT [--text-pair TEXT]  a GLUE task: the label and its probabilities

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


def _kind(ds, task):
    """The ``_NEEDS`` key of a dataset."""
    return "detection" if task == "detection" else "glue" if task == "glue" else ds


def choose_dataset(args, served):
    """The dataset to predict for, from the inputs given and ``served`` (``{dataset: task}``)."""
    texts = [f"--{name}" for name in ("question", "hypothesis", "text") if getattr(args, name) is not None]
    if len(texts) > 1:
        raise ValueError(f"give one of --question, --hypothesis, --text; got {' and '.join(texts)}")
    if args.task is not None:
        if args.task not in served:
            raise ValueError(f"--task {args.task!r}: this model serves {', '.join(served)}")
        ds = args.task
    else:
        wanted = {"--question": "vqa2", "--hypothesis": "visual_entailment"}.get(texts[0]) if texts else None
        if wanted is not None:
            if wanted not in served:
                raise ValueError(f"{texts[0]} asks for {wanted}, which this model does not serve; "
                                 f"it has: {', '.join(served)}")
            ds = wanted
        else:
            task = "glue" if texts else "detection" if args.image is not None else None
            if task is None:
                raise ValueError("nothing to predict: give --image (detection), --image with --question "
                                 "(vqa2) or --hypothesis (visual_entailment), or --text (GLUE)")
            options = [d for d, t in served.items() if t == task]
            if not options:
                raise ValueError(f"this model has no {task} dataset; it serves {', '.join(served)}")
            if len(options) > 1:
                raise ValueError(f"this model has several {task} datasets ({', '.join(options)}): choose one "
                                 "with --task")
            ds = options[0]
    required, optional = _NEEDS.get(_kind(ds, served[ds]), ((), ()))
    missing = [f"--{n.replace('_', '-')}" for n in required if getattr(args, n) is None]
    extra = [f"--{n.replace('_', '-')}" for n in INPUTS
             if getattr(args, n) is not None and n not in required and n not in optional]
    if missing or extra:
        problems = ([f"needs {', '.join(missing)}"] if missing else []) + \
                   ([f"takes no {', '.join(extra)}"] if extra else [])
        raise ValueError(f"{ds}: {'; '.join(problems)}")
    if args.save_image is not None and served[ds] != "detection":
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


def build_batch(ds, task, meta, args, decoder=None):
    """The one-item batch of the input, made as evaluation makes one: a record, the val dataset
    class of ``ds`` (test-time resize, MMF's token layout, the run's max length) and
    ``BatchCollator`` (``dataset_type="test"``; ``targets`` None, so no loss is computed).

    Returns ``(batch, size)``: ``batch`` as ``UniT.forward`` takes it (``image`` a NestedTensor
    ``(1, 3, H, W)`` float32 normalised, for detection and vl; ``input_ids``, ``input_mask``,
    ``segment_ids`` ``(1, max_length)`` int64 for vl and glue); ``size`` the original image's
    ``(h, w)`` in pixels, or None without an image."""
    import numpy as np
    from PIL import Image

    from unit_fast.data import datasets as D
    from unit_fast.data import records as R
    from unit_fast.training.metadata import image_sizes_from_metadata, tokenizer_from_metadata

    entry = meta["datasets"][ds]
    size = sizes = None
    if args.image is not None:
        if not os.path.isfile(args.image):
            raise FileNotFoundError(f"--image {args.image!r} does not exist")
        try:
            with Image.open(args.image) as im:  # the header only
                w, h = im.size
        except OSError as exc:  # PIL's UnidentifiedImageError
            raise ValueError(f"--image: {exc}") from None
        size = (h, w)
        sizes = image_sizes_from_metadata(entry)
    tokenizer = None if task == "detection" else tokenizer_from_metadata(meta)
    if task == "detection":
        rec = R.DetectionRecord(args.image, 0, w, h, boxes=np.zeros((0, 4), np.float32),
                                labels=np.zeros(0, np.int64), area=np.zeros(0, np.float32))
        dataset = D.DetectionDataset([rec], ds, train=False, sizes=sizes)
    elif ds == "vqa2":
        if not entry.get("answers"):
            raise ValueError(f"checkpoint metadata has no VQA answer vocabulary for {ds}")
        rec = R.VQARecord(args.image, 0, 0, args.question, answers=[])
        dataset = D.VQADataset([rec], ds, tokenizer, max_length=entry["max_length"],
                               answer_vocab=entry["answers"], sizes=sizes)
    elif ds == "visual_entailment":
        rec = R.EntailmentRecord(args.image, "0", args.hypothesis, 0)
        dataset = D.EntailmentDataset([rec], ds, tokenizer, max_length=entry["max_length"], sizes=sizes)
    elif task == "glue":
        if entry.get("pair") and args.text_pair is None:
            raise ValueError(f"{ds} is a sentence-pair task: give --text-pair too")
        if entry.get("pair") is False and args.text_pair is not None:
            raise ValueError(f"{ds} is a single-sentence task: it takes no --text-pair")
        rec = R.TextRecord(args.text, args.text_pair, 0, "0")
        dataset = D.TextDataset([rec], ds, tokenizer, max_length=entry["max_length"])
    else:
        raise ValueError(f"predict does not know how to make an input for dataset {ds!r}")
    batch = D.BatchCollator(ds, decoder=decoder, dataset_type="test")([dataset[0]])
    batch["targets"] = None  # a prediction: no loss
    return batch, size


def _detections(ds, out, size, entry, threshold):
    """Queries scoring at least ``threshold``, best first: ``{"label": raw category id, "name",
    "score": softmax probability, "box": [x0, y0, x1, y1] original-image pixels}``."""
    from unit_fast.models.postprocess import PostProcess

    names = {c["id"]: c["name"] for c in entry.get("categories") or []}
    r = PostProcess()(out, torch.tensor([size]))[0]  # boxes in original-image pixels
    scores, labels, boxes = r["scores"].float().cpu(), r["labels"].cpu(), r["boxes"].float().cpu()
    order = torch.argsort(scores, descending=True)
    found = [{"label": int(labels[i]), "name": names.get(int(labels[i]), f"class {int(labels[i])}"),
              "score": float(scores[i]), "box": [float(v) for v in boxes[i]]}
             for i in order.tolist() if scores[i] >= threshold]
    return {"dataset": ds, "task": "detection", "image_size": [size[1], size[0]], "threshold": threshold,
            "detections": found}


def _classification(ds, task, out, entry, loss_type, top_k):
    """vqa2: the ``top_k`` answers by sigmoid score (the head is trained with BCE); other
    classifiers: the argmax label and every label's probability (softmax for CE heads)."""
    logits = out["scores"][0].float().cpu()  # (num_labels,)
    probs = logits.sigmoid() if loss_type == "bce" else logits.softmax(-1)
    if ds == "vqa2":
        answers = entry["answers"]
        if len(answers) != len(probs):
            raise ValueError(f"{len(answers)} answers in the metadata for a head of {len(probs)} labels")
        top = torch.topk(probs, min(top_k, len(probs)))
        ranked = [{"answer": answers[i], "score": float(p)}
                  for p, i in zip(top.values, top.indices.tolist(), strict=True)]
        return {"dataset": ds, "task": task, "answer": ranked[0]["answer"], "score": ranked[0]["score"],
                "top": ranked}
    names = entry.get("labels") or [str(i) for i in range(len(probs))]
    if len(names) != len(probs):
        raise ValueError(f"{len(names)} label names in the metadata for a head of {len(probs)} labels")
    index = int(probs.argmax())
    return {"dataset": ds, "task": task, "label": names[index], "index": index,
            "probabilities": {n: float(p) for n, p in zip(names, probs, strict=True)}}


@torch.no_grad()
def predict(model, batch, ds, task, meta, cfg, size, device, threshold=0.5, top_k=5):
    """The model's prediction on ``batch`` as a JSON-like dict with ``dataset`` and ``task``, and:
    detection ``image_size [w, h]``, ``threshold``, ``detections`` (``_detections``); vqa2
    ``answer``, ``score``, ``top [{answer, score}]``; other classifiers ``label``, ``index``,
    ``probabilities {label: p}``."""
    from unit_fast.training.batches import to_device

    out = model(to_device(batch, device))
    entry = meta["datasets"][ds]
    if task == "detection":
        return _detections(ds, out, size, entry, threshold)
    loss_type = cfg["model"]["heads"][task][ds].get("loss_type", "ce")
    return _classification(ds, task, out, entry, loss_type, top_k)


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
    """The human-readable lines of a prediction."""
    if r["task"] == "detection":
        w, h = r["image_size"]
        lines = [f"{r['dataset']}: {len(r['detections'])} detection(s) with score >= {r['threshold']:.2f} "
                 f"in {args.image} ({w}x{h} px)"]
        if r["detections"]:
            width = max(len(d["name"]) for d in r["detections"])
            lines.append(f"  {'category'.ljust(width)}  score  box x0 y0 x1 y1 (px)")
            for d in r["detections"]:
                box = " ".join(f"{v:.1f}" for v in d["box"])
                lines.append(f"  {d['name'].ljust(width)}  {d['score']:.3f}  {box}")
        return "\n".join(lines)
    if "answer" in r:
        top = ", ".join(f"{a['answer']} {a['score']:.3f}" for a in r["top"])
        return f"{r['dataset']}: answer {r['answer']!r} (score {r['score']:.3f})\n  top: {top}"
    probs = ", ".join(f"{n} {p:.3f}" for n, p in r["probabilities"].items())
    return f"{r['dataset']}: {r['label']}\n  probabilities: {probs}"


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
        served = restore.model_datasets(cfg)
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
