"""Run metadata: what ``python -m unit_fast.predict`` needs to turn raw input into a batch and the
model's output into names, without reading any dataset.  The trainer stores it in every
checkpoint as ``"meta"``, so a checkpoint is self-contained.

``run_metadata(cfg, data)`` returns a small JSON-serialisable dict::

    {"version": 1,
     "tokenizer": {"vocab": ["[PAD]", "[UNK]", ...],    # token by id
                   "lowercase": true},                   # load_tokenizer always lower-cases
     "datasets": {
       "detection_coco": {"task": "detection", "kind": "detection", "image_sizes": {...ImageSizes fields...},
                          "categories": [{"id": 1, "name": "circle"}, ...]},   # or null
       "vqa2": {"task": "vl", "kind": "vqa", "image_sizes": {...}, "max_length": 24, "answers": ["yes", ...]},
       "visual_entailment": {"task": "vl", "kind": "image_text_classification", "image_sizes": {...},
                             "max_length": 24, "labels": ["entailment", "neutral", "contradiction"]},
       "glue_sst2": {"task": "glue", "kind": "text_classification", "max_length": 32, "pair": false,
                     "labels": ["negative", "positive"]}}}

Each dataset's entry beyond ``task`` and ``kind`` is its kind's ``metadata`` (``unit_fast/tasks``).
Metadata written before kinds existed has no ``kind``: ``entry_kind`` infers it.

Image sizes and text lengths are read off the built val datasets themselves, so predict prepares
an input exactly as evaluation does.  Detection category names come from the ``categories`` of
the val annotations file (``null`` when the file has none: predict then prints raw ids).  Class
labels are named by index as the readers assign indices (the built-in rows' ``label_names``,
else the label strings themselves).
"""

# Light imports only: the trainer imports this module at start-up (transformers and the image
# stack are imported where they are used).
VERSION = 1
_CACHE_KEY = "run_metadata"


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


def _dataset_entry(data, ds, dataset):
    kind = data.kinds[ds]
    return {"task": kind.model_task, "kind": kind.name,
            **kind.metadata(ds, dataset, data.dataset_info.get(ds, {}))}


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
        "datasets": {ds: _dataset_entry(data, ds, dataset) for ds, dataset in data.val.items()},
    }
    data.info[_CACHE_KEY] = meta
    return meta


def entry_kind(ds, entry):
    """The ``TaskKind`` of a metadata entry: its ``kind``, else (older metadata) the built-in
    row's or the head family's plain kind."""
    from unit_fast.tasks import model_kind

    return model_kind(ds, entry.get("task"), {"kind": entry.get("kind")})


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
    for ds, entry in meta.get("datasets", {}).items():
        answers, info = entry.get("answers"), data.dataset_info.get(ds, {})
        if answers is not None and info.get("answers") is not None and list(info["answers"]) != answers:
            raise ValueError(f"the {ds} answer vocabulary built from the configured data differs from the "
                             f"checkpoint's (set data.datasets.{ds}.answer_vocab to the run's answers)")
