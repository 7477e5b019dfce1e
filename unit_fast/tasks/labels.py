"""Class labels of the classification kinds: from the config, or from the train split's values."""


def sort_labels(values):
    """Label strings in index order: numeric order when every value is an integer ("0", "1",
    "10"), else string order; so labels found in the data get a stable index."""
    values = list(values)
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def label_map(ds, split, options, ctx, found, no_label=()):
    """``{label string: index}`` of a dataset, fixed when train is read and checked for val.

    ``options["labels"]``: the configured label strings in index order, or None: the train
    split's ``found`` values (a set) sorted by ``sort_labels``.  A val label outside train's is a
    one-line error naming the dataset and its ``label_column``/``label_field``."""
    if "labels" not in ctx.info:
        labels = options.get("labels")
        if labels is None:
            labels = sort_labels(v for v in found if v not in no_label)
            if not labels:
                raise ValueError(f"data.datasets.{ds}.{split}: no labels found in the label column")
        ctx.info["labels"] = [str(v) for v in labels]
        ctx.info["label_names"] = [str(v) for v in (options.get("label_names") or ctx.info["labels"])]
        if len(ctx.info["label_names"]) != len(ctx.info["labels"]):
            raise ValueError(f"data.datasets.{ds}.label_names: {len(ctx.info['label_names'])} names for "
                             f"{len(ctx.info['labels'])} labels")
    elif options.get("labels") is None and found is not None:
        extra = sorted(set(found) - set(ctx.info["labels"]) - set(no_label))
        if extra:
            raise ValueError(f"data.datasets.{ds}.{split}: label(s) {extra[:5]} do not occur in train "
                             f"(train has {ctx.info['labels'][:10]})")
    return {v: i for i, v in enumerate(ctx.info["labels"])}


def fit_num_labels(ds, task, head, info):
    """``num_labels`` from the label set unless the config sets it; too few is an error."""
    if info.get("labels") is None:
        return
    n = len(info["labels"])
    if head.get("num_labels") is None:
        head["num_labels"] = n
    elif head["num_labels"] < n:
        raise ValueError(f"model.heads.{task}.{ds}.num_labels={head['num_labels']} is smaller than the "
                         f"{n} labels of data.datasets.{ds}")
