"""The ``detection`` task kind: COCO-format boxes (COCO, and MMF's Visual Genome with
``attribute_ids``), DETR's heads and set loss, COCO AP."""

import json
import math

import numpy as np
import torch

from unit_fast.tasks.kind import TaskKind, register_task_kind


def image_sizes_entry(dataset):
    """The ``image_sizes`` of a dataset's metadata entry (lists, JSON-safe)."""
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(dataset.sizes).items()}


def _categories(path):
    """``[{"id", "name"}]`` of a COCO annotations file's ``categories``, or None without them."""
    with open(path, "rb") as f:
        categories = json.load(f).get("categories")  # the whole file: COCO val is ~25 MB, read once
    if not isinstance(categories, list):
        return None
    return [{"id": int(c["id"]), "name": str(c["name"])} for c in categories
            if isinstance(c, dict) and isinstance(c.get("id"), int) and "name" in c]


class DetectionKind(TaskKind):
    name = "detection"
    model_task = "detection"
    path_keys = ("annotations", "images")
    options = {"attributes": False}  # Visual Genome: annotations carry attribute_ids (MMF's VG layout)
    default_queries = 100
    head_defaults = {"num_classes": None, "use_attr": None}
    head_keys = frozenset({"kind", "task_idx", "task_token", "num_classes", "use_attr"})
    headline = "AP50"
    predict_inputs = (("image",), ())

    def read(self, ctx, ds, split, paths):
        from unit_fast.data.datasets import DetectionDataset
        from unit_fast.data.readers.coco import read_coco_detection

        # labelled: train and val have boxes, so a file without `annotations` is an error.
        recs = read_coco_detection(paths["annotations"], paths["images"], with_attributes=ctx.options["attributes"],
                                   labelled=True, on_error=ctx.on_error, report=ctx.report)
        top = max((int(r.labels.max()) for r in recs if len(r.labels)), default=-1)
        ctx.info["max_label"] = max(ctx.info.get("max_label", -1), top)
        if ctx.options["attributes"]:
            top = max((int(r.attributes.max()) for r in recs if r.attributes is not None and r.attributes.size),
                      default=-1)
            ctx.info["max_attribute"] = max(ctx.info.get("max_attribute", -1), top)
        if split == "val":
            ctx.info["categories"] = _categories(paths["annotations"])
        return DetectionDataset(recs, ds, train=split == "train", sizes=ctx.sizes, seed=ctx.seed)

    def fit_head(self, ds, head, info, model_cfg=None):
        attrs = info.get("max_attribute", -1)
        if model_cfg is not None and head.get("use_attr") and attrs >= model_cfg["base_args"]["attribute_class_num"]:
            raise ValueError(f"model.base_args.attribute_class_num={model_cfg['base_args']['attribute_class_num']} "
                             f"cannot hold data.datasets.{ds}'s attribute ids (largest {attrs}): set it to {attrs + 1}")
        ids = [c["id"] for c in info.get("categories") or []] + [info.get("max_label", -1)]
        needed = max(ids) + 1  # raw category ids index the classes (COCO: 1..90, so 91)
        if head.get("num_classes") is None:
            head["num_classes"] = needed
        elif head["num_classes"] < needed:
            raise ValueError(f"model.heads.detection.{ds}.num_classes={head['num_classes']} cannot hold "
                             f"data.datasets.{ds}'s category ids (largest {needed - 1}): set it to {needed}")

    def uncertainty(self, out, head, top_m=10):
        """``(B,)``: the mean class entropy (softmax over the C + 1 classes, / log(C + 1)) of the
        ``top_m`` queries with the highest object score (1 - p(no-object)), so the many
        no-object queries of an image do not swamp it."""
        log_p = out["pred_logits"].float().log_softmax(-1)  # (B, Q, C + 1)
        entropy = -(log_p.exp() * log_p).sum(-1) / math.log(log_p.shape[-1])  # (B, Q)
        objectness = 1 - log_p[..., -1].exp()
        top = objectness.topk(min(top_m, objectness.shape[1]), dim=1).indices  # (B, m)
        return entropy.gather(1, top).mean(1)

    def evaluator(self, ds, dataset, info):
        from unit_fast.evaluation import DetectionEvaluator

        return DetectionEvaluator(dataset.records)

    def eval_update(self, ev, out, batch, dataset):
        ev.update(out, batch["targets"])

    def chance(self, summary_entry):
        return (summary_entry or {}).get("chance", {}).get("AP50")

    def metadata(self, ds, dataset, info):
        return {"image_sizes": image_sizes_entry(dataset), "categories": info.get("categories")}

    def predict_dataset(self, ds, entry, inputs, tokenizer, sizes):
        from unit_fast.data import datasets as D
        from unit_fast.data import records as R

        h, w = inputs["size"]
        rec = R.DetectionRecord(inputs["image"], 0, w, h, boxes=np.zeros((0, 4), np.float32),
                                labels=np.zeros(0, np.int64), area=np.zeros(0, np.float32))
        return D.DetectionDataset([rec], ds, train=False, sizes=sizes)

    def predict_result(self, ds, out, entry, head, size, options):
        """Queries scoring at least ``options["threshold"]``, best first: ``{"label": raw category
        id, "name", "score": softmax probability, "box": [x0, y0, x1, y1] original-image pixels}``."""
        from unit_fast.postprocess import PostProcess

        threshold = options.get("threshold", 0.5)
        names = {c["id"]: c["name"] for c in entry.get("categories") or []}
        r = PostProcess()(out, torch.tensor([size]))[0]  # boxes in original-image pixels
        scores, labels, boxes = r["scores"].float().cpu(), r["labels"].cpu(), r["boxes"].float().cpu()
        order = torch.argsort(scores, descending=True)
        found = [{"label": int(labels[i]), "name": names.get(int(labels[i]), f"class {int(labels[i])}"),
                  "score": float(scores[i]), "box": [float(v) for v in boxes[i]]}
                 for i in order.tolist() if scores[i] >= threshold]
        return {"dataset": ds, "kind": self.name, "task": "detection", "image_size": [size[1], size[0]],
                "threshold": threshold, "detections": found}

    def format_result(self, r, inputs):
        w, h = r["image_size"]
        lines = [f"{r['dataset']}: {len(r['detections'])} detection(s) with score >= {r['threshold']:.2f} "
                 f"in {inputs.get('image')} ({w}x{h} px)"]
        if r["detections"]:
            width = max(len(d["name"]) for d in r["detections"])
            lines.append(f"  {'category'.ljust(width)}  score  box x0 y0 x1 y1 (px)")
            for d in r["detections"]:
                box = " ".join(f"{v:.1f}" for v in d["box"])
                lines.append(f"  {d['name'].ljust(width)}  {d['score']:.3f}  {box}")
        return "\n".join(lines)


DETECTION = register_task_kind(DetectionKind())
