"""Run metadata: what ``python -m unit_fast.predict`` needs to turn raw input into a batch and the
model's output into names, without reading any dataset.  The trainer stores it in every
checkpoint as ``"meta"``, so a checkpoint is self-contained.

``run_metadata(cfg, data)`` returns a small JSON-serialisable dict::

    {"version": 1,
     "tokenizer": {"vocab": ["[PAD]", "[UNK]", ...],    # token by id
                   "lowercase": true},                   # load_tokenizer always lower-cases
     "datasets": {
       "detection_coco": {"task": "detection", "image_sizes": {...ImageSizes fields...},
                          "categories": [{"id": 1, "name": "circle"}, ...]},   # or null
       "vqa2": {"task": "vl", "image_sizes": {...}, "max_length": 24, "answers": ["yes", ...]},
       "visual_entailment": {"task": "vl", "image_sizes": {...}, "max_length": 24,
                             "labels": ["entailment", "neutral", "contradiction"]},
       "glue_sst2": {"task": "glue", "max_length": 32, "pair": false,
                     "labels": ["negative", "positive"]}}}

Image sizes and text lengths are read off the built val datasets themselves, so predict prepares
an input exactly as evaluation does.  Detection category names come from the ``categories`` of
the val annotations file (``null`` when the file has none: predict then prints raw ids).  Class
labels are named by index as the readers assign indices (``records.ENTAILMENT_LABELS``,
``readers/glue.py``).
"""

import dataclasses
import json
import os

# Light imports only: the trainer imports this module at start-up (transformers and the image
# stack are imported where they are used).
from unit_fast.data.readers.glue import GLUE_TASKS as GLUE_COLUMNS
from unit_fast.data.records import ENTAILMENT_LABELS

VERSION = 1

# Class names by label index, as the readers assign them.
LABEL_NAMES = {
    "visual_entailment": ENTAILMENT_LABELS,
    "glue_sst2": ("negative", "positive"),
    "glue_qnli": ("entailment", "not_entailment"),
    "glue_qqp": ("not_duplicate", "duplicate"),
    "glue_mnli_mismatched": ENTAILMENT_LABELS,
}
_CACHE_KEY = "run_metadata"


def _task_of(cfg, ds):
    for task, queries in cfg["model"]["base_args"]["num_queries"].items():
        if ds in queries:
            return task
    return None


def _glue_key(ds):
    """``glue_sst2`` -> ``sst2``, ``glue_mnli_mismatched`` -> ``mnli`` (readers/glue.py keys)."""
    return ds.removeprefix("glue_").split("_")[0]


def tokenizer_vocab(tokenizer):
    """The tokenizer's tokens as a list indexed by id.  Raises ValueError when the ids are not
    exactly ``0 .. n-1`` (such a vocabulary cannot be written as a list)."""
    vocab = tokenizer.get_vocab()  # {token: id}
    by_id = [None] * len(vocab)
    for token, i in vocab.items():
        if not 0 <= i < len(by_id) or by_id[i] is not None:
            raise ValueError(f"tokenizer ids are not 0..{len(vocab) - 1} (token {token!r} has id {i})")
        by_id[i] = token
    return by_id


def _categories(cfg, data, ds):
    """``[{"id", "name"}]`` from the val annotations file of detection dataset ``ds``, or None."""
    from unit_fast.training.data import synthetic_paths

    paths = synthetic_paths(data.root) if cfg["data"]["root"] is None else cfg["data"]["datasets"]
    path = paths.get(ds, {}).get("val", {}).get("annotations")
    if path is None or not os.path.isfile(os.path.expanduser(str(path))):
        return None
    with open(os.path.expanduser(str(path)), "rb") as f:
        categories = json.load(f).get("categories")  # the whole file: COCO val is ~25 MB, read once
    if not isinstance(categories, list):
        return None
    return [{"id": int(c["id"]), "name": str(c["name"])} for c in categories
            if isinstance(c, dict) and "id" in c and "name" in c]


def _dataset_entry(cfg, data, ds, dataset):
    entry = {"task": _task_of(cfg, ds)}
    if ds.startswith("detection") or ds in ("vqa2", "visual_entailment"):
        entry["image_sizes"] = {k: list(v) if isinstance(v, tuple) else v
                                for k, v in dataclasses.asdict(dataset.sizes).items()}
    if hasattr(dataset, "max_length"):
        entry["max_length"] = int(dataset.max_length)
    if ds.startswith("detection"):
        entry["categories"] = _categories(cfg, data, ds)
    elif ds == "vqa2":
        entry["answers"] = None if data.answer_vocab is None else list(data.answer_vocab)
    else:
        names = LABEL_NAMES.get(ds)
        entry["labels"] = None if names is None else list(names)
    if ds.startswith("glue_"):
        columns = GLUE_COLUMNS.get(_glue_key(ds))
        entry["pair"] = columns is not None and columns[1] is not None
    return entry


def run_metadata(cfg, data):
    """The ``"meta"`` entry of a checkpoint (module docstring) for a run's config and ``RunData``.

    Computed once per ``data`` and cached in ``data.info`` (the trainer calls it at every
    checkpoint; the category names cost one read of each detection val annotations file)."""
    cached = data.info.get(_CACHE_KEY)
    if cached is not None:
        return cached
    meta = {
        "version": VERSION,
        "tokenizer": None if data.tokenizer is None else {"vocab": tokenizer_vocab(data.tokenizer),
                                                          "lowercase": True},
        "datasets": {ds: _dataset_entry(cfg, data, ds, dataset) for ds, dataset in data.val.items()},
    }
    data.info[_CACHE_KEY] = meta
    return meta


def tokenizer_from_metadata(meta):
    """The run's ``BertTokenizerFast`` rebuilt from ``meta["tokenizer"]`` (the same WordPiece
    vocabulary and lower-casing that ``data.text.load_tokenizer`` gives)."""
    from transformers import BertTokenizerFast

    tok = meta.get("tokenizer")
    if not tok or not tok.get("vocab"):
        raise ValueError("checkpoint metadata has no tokenizer vocabulary")
    vocab = {token: i for i, token in enumerate(tok["vocab"])}
    return BertTokenizerFast(vocab=vocab, do_lower_case=tok.get("lowercase", True))


def image_sizes_from_metadata(entry):
    """``ImageSizes`` of one dataset entry of the metadata."""
    from unit_fast.data.datasets import ImageSizes

    return ImageSizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry["image_sizes"].items()})


def check_data_matches(meta, data):
    """Raise ValueError when ``data`` (built for evaluation) tokenizes or indexes answers unlike
    the run that wrote ``meta``: the model's embeddings and VQA head would be read wrongly."""
    tok = meta.get("tokenizer")
    if tok and data.tokenizer is not None and tokenizer_vocab(data.tokenizer) != tok["vocab"]:
        raise ValueError("the configured tokenizer's vocabulary differs from the one the checkpoint was "
                         "trained with (set data.tokenizer to the run's)")
    answers = meta.get("datasets", {}).get("vqa2", {}).get("answers")
    if answers is not None and data.answer_vocab is not None and list(data.answer_vocab) != answers:
        raise ValueError("the VQA answer vocabulary built from the configured data differs from the "
                         "checkpoint's (set data.datasets.vqa2.answer_vocab to the run's answers)")
