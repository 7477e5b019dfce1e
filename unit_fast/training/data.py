"""Datasets and loaders of a training run, from the config's ``data`` section.

With ``data.root: null`` the synthetic default is generated once (by seed and size) under
``data.cache_dir`` and read back by the real readers.  Otherwise ``data.datasets`` gives each
dataset's files, e.g.::

    data:
      datasets:
        detection_coco: {train: {annotations: .../instances_train2017.json, images: .../train2017},
                         val: {annotations: .../instances_val2017.json, images: .../val2017}}
        vqa2: {train: {questions: ..., annotations: ..., images: ...}, val: {...}, answer_vocab: null}
        visual_entailment: {train: {jsonl: ..., images: ...}, val: {...}}
        glue_sst2: {train: {tsv: .../SST-2/train.tsv}, val: {tsv: .../SST-2/dev.tsv}}
"""

import os
from dataclasses import dataclass, field

from unit_fast.data.datasets import DetectionDataset, EntailmentDataset, ImageSizes, TextDataset, VQADataset
from unit_fast.data.readers import ReadReport
from unit_fast.data.readers.coco import read_coco_detection
from unit_fast.data.readers.glue import read_glue
from unit_fast.data.readers.snli_ve import read_snli_ve
from unit_fast.data.readers.vqa2 import read_vqa2
from unit_fast.data.text import load_tokenizer

GLUE_TASKS = {"glue_sst2": "SST-2", "glue_qnli": "QNLI", "glue_qqp": "QQP", "glue_mnli_mismatched": "MNLI"}
DEFAULT_TEXT_LENGTH = {"vqa2": 25, "visual_entailment": 25}


@dataclass
class RunData:
    """A run's datasets.  ``read_reports``: ``{dataset: ReadReport}``, what the readers skipped and
    dropped in that dataset's train and val files; ``report``: their sum (``ReadReport.total``)."""

    train: dict
    val: dict
    tokenizer: object
    answer_vocab: list | None
    report: ReadReport
    root: str | None = None
    info: dict = field(default_factory=dict)
    read_reports: dict = field(default_factory=dict)


def synthetic_root(data_cfg):
    """Generate (once) and return the synthetic dataset's folder for this config."""
    from unit_fast.data.synthetic import generate

    s = data_cfg["synthetic"]
    name = f"synthetic-s{s['seed']}-n{s['num_train']}-{s['num_val']}-px{s['image_size']}"
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
    """``data.datasets`` entries for the synthetic layout under ``root``."""
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    splits = (("train", "train"), ("val", "dev"))  # (split, file stem)
    return {
        "detection_coco": {s: {"annotations": j("coco/annotations", f"instances_{s}2017.json"),
                               "images": j("coco", f"{s}2017")} for s in ("train", "val")},
        "vqa2": {s: {"questions": j("vqa2", f"v2_OpenEnded_mscoco_{s}2014_questions.json"),
                     "annotations": j("vqa2", f"v2_mscoco_{s}2014_annotations.json"),
                     "images": j("coco", f"{s}2017")}
                 for s in ("train", "val")},
        "visual_entailment": {s: {"jsonl": j("snli_ve", f"snli_ve_{d}.jsonl"), "images": j("snli_ve/images")}
                              for s, d in splits},
        "glue_sst2": {s: {"tsv": j("glue/SST-2", f"{d}.tsv")} for s, d in splits},
        "glue_qnli": {s: {"tsv": j("glue/QNLI", f"{d}.tsv")} for s, d in splits},
    }


def _need(paths, key, ds, split):
    try:
        value = paths[key]
    except KeyError:
        raise ValueError(f"data.datasets.{ds}.{split}.{key} is not set") from None
    if value is None or not os.path.exists(os.path.expanduser(str(value))):
        raise FileNotFoundError(f"data.datasets.{ds}.{split}.{key}: {value!r} does not exist")
    return os.path.expanduser(str(value))


def configure_model(cfg, data):
    """Fit the model config to ``data`` in place: a from-scratch BERT's vocabulary size, the VQA
    head's number of answers."""
    m = cfg["model"]
    if data.tokenizer is not None and m["bert"]["pretrained"] is None:
        m["bert"]["config"]["vocab_size"] = len(data.tokenizer)
    if data.answer_vocab is not None and "vqa2" in m["heads"].get("vl", {}):
        m["heads"]["vl"]["vqa2"]["num_labels"] = len(data.answer_vocab)


def build_data(cfg, dataset_names):
    """``RunData`` with train and val datasets for ``dataset_names`` (the model's datasets)."""
    data_cfg = cfg["data"]
    root = data_cfg["root"]
    if root is None:
        root = synthetic_root(data_cfg)
        paths = synthetic_paths(root)
    else:
        paths = data_cfg["datasets"]
    missing = [ds for ds in dataset_names if ds not in paths]
    if missing:
        raise ValueError(f"no data configured for {missing}: set data.datasets.<name>.{{train,val}} paths "
                         "(or data.root: null for the synthetic default)")
    synthetic_vocab = os.path.join(root, "vocab.txt") if data_cfg["root"] is None else None
    tok_path = data_cfg["tokenizer"] or synthetic_vocab
    if tok_path is None:
        tok_path = cfg["model"]["bert"]["pretrained"]
    if tok_path is None:
        raise ValueError("no tokenizer: set data.tokenizer (a vocab.txt or tokenizer folder) or "
                         "model.bert.pretrained (a local BERT folder) when data.root is set")
    tokenizer = load_tokenizer(tok_path)
    sizes = ImageSizes(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in data_cfg["image_sizes"].items()})
    reports = {ds: ReadReport() for ds in dataset_names}  # train and val of a dataset share one
    on_error = data_cfg["on_error"]
    lengths = {**DEFAULT_TEXT_LENGTH, **data_cfg["text_max_length"]}
    train, val, vocab = {}, {}, None
    for ds in dataset_names:
        if ds not in paths:
            raise ValueError(f"no data configured for dataset {ds!r}: set data.datasets.{ds}")
        report = reports[ds]
        for split, out in (("train", train), ("val", val)):
            p = paths[ds][split]
            is_train = split == "train"
            if ds.startswith("detection"):
                # labelled: train and val have boxes, so a file without `annotations` is an error.
                recs = read_coco_detection(_need(p, "annotations", ds, split), _need(p, "images", ds, split),
                                           with_attributes=ds == "detection_visual_genome", labelled=True,
                                           on_error=on_error, report=report)
                out[ds] = DetectionDataset(recs, ds, train=is_train, sizes=sizes,
                                           seed=cfg["training"]["seed"])
            elif ds == "vqa2":
                recs, vocab_out = read_vqa2(_need(p, "questions", ds, split),
                                            _need(p, "annotations", ds, split), _need(p, "images", ds, split),
                                            answer_vocab=vocab or paths[ds].get("answer_vocab"),
                                            dense_scores=False, on_error=on_error, report=report)
                vocab = vocab or vocab_out
                out[ds] = VQADataset(recs, ds, tokenizer, max_length=lengths.get(ds, 25), answer_vocab=vocab,
                                     sizes=sizes)
            elif ds == "visual_entailment":
                recs = read_snli_ve(_need(p, "jsonl", ds, split), _need(p, "images", ds, split),
                                    on_error=on_error, report=report)
                out[ds] = EntailmentDataset(recs, ds, tokenizer, max_length=lengths.get(ds, 25), sizes=sizes)
            elif ds in GLUE_TASKS:
                recs = read_glue(GLUE_TASKS[ds], _need(p, "tsv", ds, split), on_error=on_error, report=report)
                out[ds] = TextDataset(recs, ds, tokenizer, max_length=lengths.get(ds, 128))
            else:
                raise ValueError(f"no reader for dataset {ds!r}")
    return RunData(train, val, tokenizer, vocab, ReadReport.total(reports.values()), root,
                   read_reports=reports)
