"""The ``text_classification`` kind: a TSV with a header row, one sentence or a pair, one label
(GLUE's files; any other by ``text_columns`` and ``label_column``), a CE head, accuracy."""

from unit_fast.tasks.kind import TaskKind, register_task_kind
from unit_fast.tasks.labels import fit_num_labels, label_map
from unit_fast.tasks.vqa import need_tokenizer


class TextClassificationKind(TaskKind):
    name = "text_classification"
    model_task = "glue"
    path_keys = ("tsv",)
    # text_columns: one column (a sentence) or two (a pair); label_column; labels: the label
    # strings in index order (null: the train file's, sorted); label_names: how predict prints
    # them; no_label: label values left out by design (MNLI's "-").
    options = {"text_columns": ["sentence"], "label_column": "label", "labels": None, "label_names": None,
               "no_label": []}
    text_length = 128  # mmf/configs/datasets/glue/defaults.yaml
    keep_only_cls = True
    head_defaults = {"num_labels": None, "loss_type": "ce"}
    head_keys = frozenset({"kind", "task_idx", "task_token", "num_labels", "loss_type"})
    predict_inputs = (("text",), ("text_pair",))

    def read(self, ctx, ds, split, paths):
        from unit_fast.data.datasets import TextDataset
        from unit_fast.data.readers.glue import read_text_tsv, tsv_label_values

        tokenizer = need_tokenizer(ctx, ds, self.name)
        o = ctx.options
        if not isinstance(o["text_columns"], (list, tuple)) or len(o["text_columns"]) not in (1, 2):
            raise ValueError(f"data.datasets.{ds}.{split}.text_columns must list 1 or 2 column names, "
                             f"got {o['text_columns']!r}")
        found = None if o["labels"] is not None else tsv_label_values(paths["tsv"], o["label_column"])
        labels = label_map(ds, split, o, ctx, found, no_label=tuple(o["no_label"]))
        ctx.info["pair"] = len(o["text_columns"]) == 2
        recs = read_text_tsv(paths["tsv"], list(o["text_columns"]), o["label_column"], labels,
                             no_label=tuple(o["no_label"]), on_error=ctx.on_error, report=ctx.report,
                             what=f"data.datasets.{ds}")
        return TextDataset(recs, ds, tokenizer, max_length=ctx.text_length)

    def fit_head(self, ds, head, info, model_cfg=None):
        fit_num_labels(ds, self.model_task, head, info)

    def metadata(self, ds, dataset, info):
        return {"max_length": int(dataset.max_length), "pair": bool(info.get("pair")),
                "labels": info.get("label_names")}

    def predict_dataset(self, ds, entry, inputs, tokenizer, sizes):
        from unit_fast.data import datasets as D
        from unit_fast.data import records as R

        if entry.get("pair") and inputs.get("text_pair") is None:
            raise ValueError(f"{ds} is a sentence-pair task: give --text-pair too")
        if entry.get("pair") is False and inputs.get("text_pair") is not None:
            raise ValueError(f"{ds} is a single-sentence task: it takes no --text-pair")
        rec = R.TextRecord(inputs["text"], inputs.get("text_pair"), 0, "0")
        return D.TextDataset([rec], ds, tokenizer, max_length=entry["max_length"])


TEXT_CLASSIFICATION = register_task_kind(TextClassificationKind())
