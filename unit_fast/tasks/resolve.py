"""Which datasets a run serves, of which kind, from which files: the config's ``data.datasets``
(or the synthetic default) resolved against the task-kind table.

Rules (README "Train on your own data"):

- ``data.datasets`` declares datasets: the model serves exactly those, in that order, and the
  synthetic default is off.  Declared datasets missing from ``model.base_args.num_queries`` get
  their kind's queries and head defaults; configured ones keep theirs; the rest are dropped
  (queries, sampling ratios, targets).
- ``data.datasets`` empty and ``data.root`` null: the synthetic default, which has UniT's 8
  datasets; the model serves its ``num_queries`` datasets.
- ``data.datasets`` empty and ``data.root`` set: an error naming the datasets without files.

A dataset's kind is its ``kind:``, else its built-in row's (``tasks/builtin.py``), else the
head's ``kind``.  Relative paths are joined to ``data.root`` when it is set.
"""

import os

from unit_fast.tasks.builtin import BUILTIN_DATASETS, ROW_KEYS
from unit_fast.tasks.kind import KINDS, task_kind

SPLITS = ("train", "val")
_DATASET_KEYS = ("kind", *SPLITS)


def served_datasets(cfg):
    """The dataset names the run serves, in order."""
    declared = cfg["data"]["datasets"] or {}
    if declared:
        return list(declared)
    return [ds for qs in cfg["model"]["base_args"]["num_queries"].values() for ds in qs]


def _head_kind(cfg, ds):
    for heads in cfg["model"]["heads"].values():
        if isinstance(heads, dict) and isinstance(heads.get(ds), dict) and heads[ds].get("kind"):
            return heads[ds]["kind"]
    return None


def kind_of_dataset(cfg, ds):
    """The ``TaskKind`` of dataset ``ds`` under ``cfg``."""
    entry = (cfg["data"]["datasets"] or {}).get(ds) or {}
    name = entry.get("kind") or BUILTIN_DATASETS.get(ds, {}).get("kind") or _head_kind(cfg, ds)
    if name is None:
        raise ValueError(f"data.datasets.{ds}.kind is not set; one of: {', '.join(sorted(KINDS))}")
    return task_kind(name, f"data.datasets.{ds}.kind")


def dataset_spec(cfg, ds):
    """``{"kind": TaskKind, "options": {...}, "splits": {split: {path key: path}}}`` of ``ds``:
    kind options are the kind's defaults, then the built-in row's, then the dataset's own keys,
    then a split's own keys (for that split).  Unknown keys are an error naming the key."""
    kind = kind_of_dataset(cfg, ds)
    declared = cfg["data"]["datasets"] or {}
    row = BUILTIN_DATASETS.get(ds, {})
    options = {**kind.options, **{k: v for k, v in row.items() if k not in ROW_KEYS}}
    if declared:
        entry = declared.get(ds)
        if not isinstance(entry, dict):
            raise ValueError(f"data.datasets.{ds} must be a mapping with train and val, got {entry!r}")
        root = cfg["data"]["root"]
        base = os.path.expanduser(str(root)) if root is not None else None
    else:
        if "synthetic" not in row:
            raise ValueError(f"dataset {ds!r} has no synthetic data: declare data.datasets.{ds} with its kind "
                             "and files")
        entry, base = row["synthetic"], None  # joined to the synthetic root by the caller
    for key, value in entry.items():
        if key in kind.options:
            options[key] = value
        elif key not in _DATASET_KEYS:
            raise ValueError(f"unknown key data.datasets.{ds}.{key} (kind {kind.name}: "
                             f"{', '.join([*_DATASET_KEYS, *kind.options])})")
    files = set(kind.path_keys) | set(kind.optional_path_keys)
    splits = {}
    for split in SPLITS:
        given = entry.get(split)
        if given is None:
            raise ValueError(f"data.datasets.{ds}.{split} is not set (its {', '.join(kind.path_keys)})")
        if not isinstance(given, dict):
            raise ValueError(f"data.datasets.{ds}.{split} must be a mapping of {', '.join(kind.path_keys)}")
        split_options, split_paths = dict(options), {}
        for key, value in given.items():
            if key in files:
                path = None if value is None else os.path.expanduser(str(value))
                if path is not None and base is not None and not os.path.isabs(path):
                    path = os.path.join(base, path)
                split_paths[key] = path
            elif key in kind.options:
                split_options[key] = value
            else:
                raise ValueError(f"unknown key data.datasets.{ds}.{split}.{key} (kind {kind.name} reads "
                                 f"{', '.join([*sorted(files), *kind.options])})")
        splits[split] = {"paths": split_paths, "options": split_options}
    return {"kind": kind, "options": options, "splits": splits}


def resolve_run_config(cfg):
    """Fit ``cfg`` (changed in place) to the datasets it serves (module docstring); idempotent.
    Returns ``{dataset: TaskKind}``."""
    declared = cfg["data"]["datasets"] or {}
    if not declared and cfg["data"]["root"] is not None:
        names = served_datasets(cfg)
        raise ValueError(f"no data configured for {names}: set data.datasets.<name>.{{train,val}} paths "
                         "(or data.root: null for the synthetic default)")
    m = cfg["model"]
    old = m["base_args"]["num_queries"]
    queries_of = {ds: q for qs in old.values() for ds, q in qs.items()}
    kinds, queries = {}, {}
    for ds in served_datasets(cfg):
        kind = kinds[ds] = kind_of_dataset(cfg, ds)
        task = kind.model_task
        configured = next((t for t, qs in old.items() if ds in qs), task)
        if configured != task:
            raise ValueError(f"model.base_args.num_queries.{configured}.{ds}: dataset {ds} is of kind "
                             f"{kind.name}, whose queries belong under num_queries.{task}")
        queries.setdefault(task, {})[ds] = queries_of.get(ds, kind.default_queries)
        heads = m["heads"].setdefault(task, {})
        head = {**kind.head_defaults, **(heads.get(ds) or {}), "kind": kind.name}
        if head.get("use_attr", False) is None:  # detection: attributes when the data have them
            head["use_attr"] = bool(dataset_spec(cfg, ds)["options"].get("attributes"))
        if ds not in BUILTIN_DATASETS and head.get("task_idx") is None:
            head.setdefault("task_token", "own")  # its own token: no index to collide with MMF's
        unknown = sorted(set(head) - kind.head_keys)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in model.heads.{task}.{ds} (kind {kind.name} reads "
                             f"{', '.join(sorted(kind.head_keys))})")
        heads[ds] = head
        if kind.keep_only_cls is not None:
            m["keep_only_bert_cls"].setdefault(task, {}).setdefault(ds, kind.keep_only_cls)
    m["base_args"]["num_queries"] = queries
    t = cfg["training"]
    for key in ("sampling", "targets"):
        t[key] = {ds: v for ds, v in (t[key] or {}).items() if ds in kinds}
    return kinds
