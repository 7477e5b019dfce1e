"""The ``image_text_classification`` kind: an image and a sentence, one label (SNLI-VE's JSONL
layout; other label sets and field names by option), a CE head, accuracy."""

from unit_fast.tasks.detection import image_sizes_entry
from unit_fast.tasks.kind import TaskKind, register_task_kind
from unit_fast.tasks.labels import fit_num_labels, label_map
from unit_fast.tasks.vqa import need_tokenizer


class ImageTextClassificationKind(TaskKind):
    name = "image_text_classification"
    model_task = "vl"
    path_keys = ("jsonl", "images")
    # labels: label strings in index order (null: the train file's, sorted); label_names: how
    # predict prints them; the JSONL field names of the image file, the text and the label.
    options = {"labels": None, "label_names": None, "image_field": "Flikr30kID", "text_field": "sentence2",
               "label_field": "gold_label"}
    text_length = 25  # MMF projects/unit/configs/visual_entailment_dataset_cfg.yaml
    keep_only_cls = True
    head_defaults = {"num_labels": None, "loss_type": "ce"}
    head_keys = frozenset({"kind", "task_idx", "task_token", "num_labels", "loss_type"})
    predict_inputs = (("image", "hypothesis"), ())

    def read(self, ctx, ds, split, paths):
        from unit_fast.data.datasets import EntailmentDataset
        from unit_fast.data.readers.snli_ve import jsonl_label_values, read_snli_ve

        tokenizer = need_tokenizer(ctx, ds, self.name)
        o = ctx.options
        found = None if o["labels"] is not None else jsonl_label_values(paths["jsonl"], o["label_field"])
        labels = label_map(ds, split, o, ctx, found, no_label=("-",))
        recs = read_snli_ve(paths["jsonl"], paths["images"], label_map=labels,
                            fields=(o["image_field"], o["text_field"], o["label_field"]),
                            on_error=ctx.on_error, report=ctx.report)
        return EntailmentDataset(recs, ds, tokenizer, max_length=ctx.text_length, sizes=ctx.sizes)

    def fit_head(self, ds, head, info, model_cfg=None):
        fit_num_labels(ds, self.model_task, head, info)

    def metadata(self, ds, dataset, info):
        return {"image_sizes": image_sizes_entry(dataset), "max_length": int(dataset.max_length),
                "labels": info.get("label_names")}

    def predict_dataset(self, ds, entry, inputs, tokenizer, sizes):
        from unit_fast.data import datasets as D
        from unit_fast.data import records as R

        rec = R.EntailmentRecord(inputs["image"], "0", inputs["hypothesis"], 0)
        return D.EntailmentDataset([rec], ds, tokenizer, max_length=entry["max_length"], sizes=sizes)


IMAGE_TEXT_CLASSIFICATION = register_task_kind(ImageTextClassificationKind())
