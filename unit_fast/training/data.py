"""Datasets of a training run, from the config's ``data`` section and the task-kind table.

``data.datasets`` empty (and ``data.root`` null): the synthetic default is generated once (by
seed and size) under ``data.cache_dir`` and read back by the real readers.  Otherwise
``data.datasets`` gives each dataset's kind and files, e.g.::

    data:
      datasets:
        detection_coco: {train: {annotations: .../instances_train2017.json, images: .../train2017},
                         val: {annotations: .../instances_val2017.json, images: .../val2017}}
        widgets: {kind: detection, train: {annotations: ..., images: ...}, val: {...}}
        reviews: {kind: text_classification,
                  train: {tsv: .../train.tsv, text_columns: [sentence], label_column: label},
                  val: {tsv: .../dev.tsv, text_columns: [sentence], label_column: label}}

Which keys a dataset takes is its kind's (``unit_fast/tasks``); ``tasks/resolve.py`` has the rules.
"""

import os
from dataclasses import dataclass, field

from unit_fast.data.datasets import ImageSizes
from unit_fast.data.readers import ReadReport
from unit_fast.data.text import load_tokenizer
from unit_fast.tasks import BUILTIN_DATASETS, ReadContext, dataset_spec


@dataclass
class RunData:
    """A run's datasets.  ``read_reports``: ``{dataset: ReadReport}``, what the readers skipped and
    dropped in that dataset's train and val files; ``report``: their sum (``ReadReport.total``);
    ``kinds``: ``{dataset: TaskKind}``; ``dataset_info``: ``{dataset: dict}``, what the kind
    learnt from the data (class counts, label names, answer vocabulary, categories)."""

    train: dict
    val: dict
    tokenizer: object
    report: ReadReport
    root: str | None = None
    info: dict = field(default_factory=dict)
    read_reports: dict = field(default_factory=dict)
    kinds: dict = field(default_factory=dict)
    dataset_info: dict = field(default_factory=dict)

    @property
    def answer_vocab(self):
        """The answer vocabulary of the run's (first) VQA dataset, or None."""
        return next((i["answers"] for i in self.dataset_info.values() if i.get("answers") is not None), None)


def synthetic_root(data_cfg):
    """Generate (once) and return the synthetic dataset's folder for this config."""
    from unit_fast.data.synthetic import FORMAT_VERSION, generate

    s = data_cfg["synthetic"]
    name = f"synthetic-v{FORMAT_VERSION}-s{s['seed']}-n{s['num_train']}-{s['num_val']}-px{s['image_size']}"
    root = os.path.join(os.path.expanduser(data_cfg["cache_dir"]), name)
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        tmp = f"{root}.tmp-{os.getpid()}"
        generate(tmp, seed=s["seed"], num_train=s["num_train"], num_val=s["num_val"],
                 image_size=s["image_size"])
        open(os.path.join(tmp, ".complete"), "w").close()
        os.makedirs(os.path.dirname(root), exist_ok=True)
        try:
            os.rename(tmp, root)  # atomic: a concurrent run (another rank) may win; both are identical
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return root


def synthetic_paths(root):
    """``data.datasets`` entries for the synthetic layout under ``root``: every built-in dataset."""
    return {ds: {split: {key: os.path.join(root, rel) for key, rel in files.items()}
                 for split, files in row["synthetic"].items()}
            for ds, row in BUILTIN_DATASETS.items()}


def _need(paths, key, ds, split):
    try:
        value = paths[key]
    except KeyError:
        raise ValueError(f"data.datasets.{ds}.{split}.{key} is not set") from None
    if value is None or not os.path.exists(os.path.expanduser(str(value))):
        raise FileNotFoundError(f"data.datasets.{ds}.{split}.{key}: {value!r} does not exist")
    return os.path.expanduser(str(value))


def configure_model(cfg, data):
    """Fit the model config to ``data`` in place: a from-scratch BERT's vocabulary size, and each
    head's class or label count from the data where the config leaves it unset (the kind's
    ``fit_head``; VQA: the answer vocabulary's size)."""
    m = cfg["model"]
    if data.tokenizer is not None and m["bert"]["pretrained"] is None:
        m["bert"]["config"]["vocab_size"] = len(data.tokenizer)
    for ds, kind in data.kinds.items():
        head = m["heads"].setdefault(kind.model_task, {}).setdefault(ds, {})
        kind.fit_head(ds, head, data.dataset_info.get(ds, {}), m)


def _tokenizer(cfg, root, synthetic, needed):
    data_cfg = cfg["data"]
    tok_path = data_cfg["tokenizer"] or (os.path.join(root, "vocab.txt") if synthetic else None)
    if tok_path is None:
        tok_path = cfg["model"]["bert"]["pretrained"]
    if tok_path is None:
        if not needed:
            return None
        raise ValueError(f"no tokenizer for {', '.join(needed)}: set data.tokenizer (a vocab.txt or tokenizer "
                         "folder) or model.bert.pretrained (a local BERT folder) when data.datasets is set")
    return load_tokenizer(tok_path)


def _text_length(ds, kind, lengths, positions):
    """Tokens per text of ``ds``: ``data.text_max_length.<ds>``, else the kind's default, capped
    by BERT's ``positions`` when known (a longer configured length is an error naming the key)."""
    if kind.text_length is None:
        return None
    if ds in lengths:
        if positions is not None and lengths[ds] > positions:
            raise ValueError(f"data.text_max_length.{ds}={lengths[ds]} exceeds model.bert.config."
                             f"max_position_embeddings={positions}")
        return lengths[ds]
    return kind.text_length if positions is None else min(kind.text_length, positions)


def build_data(cfg, dataset_names):
    """``RunData`` with train and val datasets for ``dataset_names`` (the model's datasets)."""
    data_cfg = cfg["data"]
    synthetic = not data_cfg["datasets"]
    if synthetic and data_cfg["root"] is not None:
        raise ValueError(f"no data configured for {list(dataset_names)}: set data.datasets.<name>.{{train,val}} "
                         "paths (or data.root: null for the synthetic default)")
    root = synthetic_root(data_cfg) if synthetic else data_cfg["root"]
    specs = {ds: dataset_spec(cfg, ds) for ds in dataset_names}
    needed = [ds for ds, spec in specs.items() if spec["kind"].text_length is not None]
    tokenizer = _tokenizer(cfg, root, synthetic, needed)
    sizes = ImageSizes(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in data_cfg["image_sizes"].items()})
    reports = {ds: ReadReport() for ds in dataset_names}  # train and val of a dataset share one
    lengths = data_cfg["text_max_length"] or {}
    # A from-scratch BERT's position table bounds the text length (a pretrained one has 512).
    positions = (cfg["model"]["bert"].get("config") or {}).get("max_position_embeddings")
    train, val, info = {}, {}, {}
    for ds, spec in specs.items():
        kind = spec["kind"]
        info[ds] = {}
        for split, out in (("train", train), ("val", val)):
            given = spec["splits"][split]
            files = {k: os.path.join(root, v) if synthetic and v is not None else v
                     for k, v in given["paths"].items()}
            paths = {k: _need(files, k, ds, split) for k in kind.path_keys}
            paths.update({k: _need(files, k, ds, split) for k in kind.optional_path_keys if files.get(k)})
            ctx = ReadContext(tokenizer, sizes, cfg["training"]["seed"], data_cfg["on_error"], reports[ds],
                              _text_length(ds, kind, lengths, positions), given["options"], info[ds])
            out[ds] = kind.read(ctx, ds, split, paths)
    return RunData(train, val, tokenizer, ReadReport.total(reports.values()), root, read_reports=reports,
                   kinds={ds: spec["kind"] for ds, spec in specs.items()}, dataset_info=info)
