"""UniT's 8 datasets as rows of the task-kind table: each row's kind, its reader options (MMF's
settings, the real files' columns and label order) and where the synthetic default writes it.

Label indices follow MMF, which reads GLUE through HF ``datasets`` (``readers/glue.py``) and
SNLI-VE as ``records.ENTAILMENT_LABELS``; so UniT checkpoints' heads keep their meaning.
``synthetic``: ``{split: {path key: path relative to the synthetic root}}``
(``unit_fast.data.synthetic``); ``summary``: the dataset's key in the synthetic summary.json.
"""

from unit_fast.data.readers.glue import GLUE_TASKS
from unit_fast.data.records import ENTAILMENT_LABELS

_NLI = list(ENTAILMENT_LABELS)  # entailment 0, neutral 1, contradiction 2


def _glue(task, folder, summary, names=None, dev="dev"):
    """A GLUE row from the reader's table of the real files' columns and label order."""
    col_a, col_b, label_column, label_map = GLUE_TASKS[task]
    labels = sorted(label_map, key=label_map.get)
    row = {"kind": "text_classification", "text_columns": [c for c in (col_a, col_b) if c],
           "label_column": label_column, "labels": labels, "summary": summary,
           "synthetic": {"train": {"tsv": f"glue/{folder}/train.tsv"}, "val": {"tsv": f"glue/{folder}/{dev}.tsv"}}}
    if names is not None:
        row["label_names"] = list(names)
    if label_column == "gold_label":
        row["no_label"] = ["-"]  # no annotator majority (MNLI)
    return row


BUILTIN_DATASETS = {
    "detection_coco": {
        "kind": "detection", "summary": "detection_coco",
        "synthetic": {s: {"annotations": f"coco/annotations/instances_{s}2017.json", "images": f"coco/{s}2017"}
                      for s in ("train", "val")}},
    "detection_visual_genome": {
        "kind": "detection", "attributes": True, "summary": "detection_visual_genome",
        "synthetic": {s: {"annotations": f"visual_genome/annotations/instances_{s}.json",
                          "images": "visual_genome/images"} for s in ("train", "val")}},
    "vqa2": {
        "kind": "vqa", "summary": "vqa2",
        "synthetic": {s: {"questions": f"vqa2/v2_OpenEnded_mscoco_{s}2014_questions.json",
                          "annotations": f"vqa2/v2_mscoco_{s}2014_annotations.json", "images": f"coco/{s}2017"}
                      for s in ("train", "val")}},
    "visual_entailment": {
        "kind": "image_text_classification", "labels": _NLI, "summary": "snli_ve",
        "synthetic": {s: {"jsonl": f"snli_ve/snli_ve_{d}.jsonl", "images": "snli_ve/images"}
                      for s, d in (("train", "train"), ("val", "dev"))}},
    "glue_sst2": _glue("sst2", "SST-2", "glue_sst2", ("negative", "positive")),
    "glue_qnli": _glue("qnli", "QNLI", "glue_qnli"),
    "glue_qqp": _glue("qqp", "QQP", "glue_qqp", ("not_duplicate", "duplicate")),
    # MMF trains and scores MNLI on the mismatched dev set; the synthetic data also write
    # dev_matched.tsv, to evaluate on by declaring it as the val tsv.
    "glue_mnli_mismatched": _glue("mnli", "MNLI", "glue_mnli", dev="dev_mismatched"),
}

# Row keys that are not kind options.
ROW_KEYS = ("kind", "summary", "synthetic")
