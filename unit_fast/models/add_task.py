"""``add_task``: a new dataset (queries, task token, head) on a trained ``UniT``, every existing
parameter untouched.  Train only it with ``training.freeze: [shared]``
(``unit_fast.training.freeze.freeze(model, ["shared"], [name])``): the old tasks' outputs stay
bitwise the same."""

from unit_fast.tasks.kind import TaskKind, task_kind

# Count keys the model needs and no data can fill here (``fit_head`` fills them from a
# dataset's labels in a training run).
_COUNTS = ("num_classes", "num_labels")


def add_task(model, name, kind, **head_args):
    """Add dataset ``name`` of task kind ``kind`` (a name of ``unit_fast.tasks.KINDS`` or a
    ``TaskKind``) to ``model`` (a ``UniT``, changed in place).

    ``head_args``: the head's keys of that kind (``num_classes`` for detection, ``num_labels``
    for the classification kinds, ``loss_type``, ``use_attr``, ...: ``kind.head_keys``), plus
    ``num_queries`` (default ``kind.default_queries``) and ``keep_only_cls`` (text kinds;
    default ``kind.keep_only_cls``).  The task token defaults to ``task_token="own"``: a ``(1, H)``
    embedding of its own, so no row of MMF's task-token tables (used by the old tasks) changes.

    Returns the names of the new parameters (as ``model.named_parameters()`` names them).
    """
    if not isinstance(kind, TaskKind):
        kind = task_kind(kind, "add_task kind")
    num_queries = head_args.pop("num_queries", kind.default_queries)
    keep_only_cls = head_args.pop("keep_only_cls", None)
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1:
        raise ValueError(f"add_task {name!r}: num_queries must be an integer >= 1, got {num_queries!r}")
    head = {**kind.head_defaults, "task_token": "own", **head_args, "kind": kind.name}
    if head.get("use_attr", False) is None:  # no data to say whether it has attributes
        head["use_attr"] = False
    unknown = sorted(set(head) - kind.head_keys)
    if unknown:
        takes = ", ".join([*sorted(kind.head_keys - {"kind"}), "num_queries", "keep_only_cls"])
        raise ValueError(f"add_task {name!r}: unknown head argument(s) {unknown} for kind {kind.name} "
                         f"(it takes {takes})")
    missing = [k for k in _COUNTS if k in head and head[k] is None]
    if missing:
        raise ValueError(f"add_task {name!r}: kind {kind.name} needs {missing[0]}=<count>")
    return model.add_dataset(name, head, num_queries, keep_only_cls=keep_only_cls)
