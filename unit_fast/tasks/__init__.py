"""Task kinds and the datasets that use them (``kind.py`` says what a kind is).

``KINDS``: the table, ``{name: TaskKind}``; ``register_task_kind(kind)`` adds one;
``BUILTIN_DATASETS``: UniT's 8 datasets as rows; ``resolve_run_config(cfg)``: the datasets a
config serves, its model config fitted to them.  (``unit_fast.add_task`` adds a dataset of a
kind to a trained UniT: ``models/add_task.py``.)
"""

from unit_fast.tasks.kind import KINDS, ReadContext, TaskKind, register_task_kind, task_kind  # noqa: I001
from unit_fast.tasks import detection, image_text, text, vqa  # noqa: F401  (register the kinds)
from unit_fast.tasks.builtin import BUILTIN_DATASETS
from unit_fast.tasks.resolve import dataset_spec, kind_of_dataset, resolve_run_config, served_datasets

__all__ = ["BUILTIN_DATASETS", "KINDS", "ReadContext", "TaskKind", "dataset_spec", "kind_of_dataset",
           "model_kind", "register_task_kind", "resolve_run_config", "served_datasets", "task_kind"]

_DEFAULT_KIND = {"detection": "detection", "vl": "image_text_classification", "glue": "text_classification"}


def model_kind(ds, model_task, head):
    """The kind of a model's dataset ``ds`` from its head config alone (a model built from a
    bare MMF model config has no ``data`` section): the head's ``kind``, else the built-in row's,
    else the head family's plain kind."""
    name = (head or {}).get("kind") or BUILTIN_DATASETS.get(ds, {}).get("kind") or _DEFAULT_KIND[model_task]
    return task_kind(name, f"model.heads.{model_task}.{ds}.kind")

