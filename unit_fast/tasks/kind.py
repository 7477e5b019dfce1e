"""The table of task kinds: everything the project knows about one kind of task, in one place.

A *task kind* (``detection``, ``vqa``, ``image_text_classification``, ``text_classification``)
is one ``TaskKind`` object in ``KINDS``.  It says:

- how a dataset of the kind is read: its per-split path keys, its options, its dataset class and
  default text length (``read``);
- its head: UniT's head family (``model_task``: ``detection``, ``vl`` or ``glue``, MMF's
  state-dict layout), the head's defaults and how counts come from the data (``fit_head``), and
  the loss (``loss``);
- how it is scored: evaluator, headline metric, chance level (``evaluator``, ``eval_update``,
  ``headline``, ``chance``);
- what ``predict`` takes and prints (``predict_inputs``, ``predict_dataset``,
  ``predict_result``, ``format_result``);
- what a checkpoint stores about a dataset of it (``metadata``: label names, vocabulary).

Datasets are rows that *use* a kind (``unit_fast.tasks.builtin`` for UniT's 8; any name in
``data.datasets`` with ``kind:``).  Nothing outside this package branches on dataset names.
``register_task_kind(kind)`` adds a kind from user code.
"""

import abc
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

KINDS = {}


def _entropy(log_p):
    """``(...)`` entropy (nats) of the distributions ``exp(log_p)`` over the last dimension."""
    return -(log_p.exp() * log_p).sum(-1)


def _binary_entropy(p):
    """Elementwise binary entropy (nats) of probabilities ``p``; 0 at 0 and 1."""
    q = p.clamp(1e-12, 1 - 1e-12)
    return torch.where((p > 0) & (p < 1), -(q * q.log() + (1 - q) * (1 - q).log()), torch.zeros_like(p))


@dataclass
class ReadContext:
    """What reading one dataset needs: ``tokenizer`` (None when no dataset has text),
    ``sizes`` (``ImageSizes``), ``seed``, ``on_error``, ``report`` (the dataset's ``ReadReport``,
    shared by its splits), ``text_length`` (tokens), ``options`` (the dataset's merged kind
    options), ``info`` (a dict the kind fills while reading train and reads back for val: class
    counts, label names, vocabularies; kept in ``RunData.dataset_info``)."""

    tokenizer: object
    sizes: object
    seed: int
    on_error: str
    report: object
    text_length: int | None
    options: dict
    info: dict = field(default_factory=dict)


class TaskKind(abc.ABC):
    """One row of the table.  Subclasses set the class attributes and the methods below; ``read``
    and ``predict_dataset`` have no default (a kind without them cannot be instantiated)."""

    name = None                # the kind's name in configs (``kind: detection``)
    model_task = None          # UniT's head family: "detection" | "vl" | "glue"
    path_keys = ()             # files each split must name (data.datasets.<ds>.<split>.<key>)
    optional_path_keys = ()    # files a split may name
    options = {}               # other keys a dataset (or a split) may set, with their defaults
    text_length = None         # default max tokens (None: no text)
    default_queries = 25       # decoder queries when model.base_args.num_queries does not say
    head_defaults = {}         # model.heads.<model_task>.<ds> defaults
    head_keys = frozenset()    # the head keys this kind reads (others are a config error)
    keep_only_cls = None       # keep_only_bert_cls default for text kinds (MMF: true but for VQA)
    headline = "accuracy"      # the headline metric, a key of the evaluator's ``compute()``
    predict_inputs = ((), ())  # (required, optional) predict arguments, of predict.INPUTS

    # -- data ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def read(self, ctx, ds, split, paths):
        """The ``torch.utils.data.Dataset`` of one split (``"train"`` read first, then ``"val"``).
        ``paths``: ``{path key: existing file or folder}`` (``path_keys`` checked already)."""

    def fit_head(self, ds, head, info, model_cfg=None):
        """Fill the head's counts in ``head`` (a dict, changed in place) from the data's
        ``info`` where the config leaves them unset; raise ValueError naming the key when a
        configured count cannot hold the data's labels.  ``model_cfg``: the ``model`` section
        (for settings shared by every head, e.g. ``base_args.attribute_class_num``)."""

    # -- model ---------------------------------------------------------------------------------

    def loss(self, scores, targets, head):
        """The classification loss of one decoder layer's ``scores (B, num_labels)``:
        cross-entropy on ``(B,)`` indices, or mean BCE on ``(B, num_labels)`` soft scores with
        ``loss_type: bce``.  Detection kinds use the set criterion instead."""
        if head.get("loss_type", "ce") == "bce":
            return F.binary_cross_entropy_with_logits(scores, targets.to(scores.dtype))
        return F.cross_entropy(scores, targets)

    def probabilities(self, logits, head):
        """``(num_labels,)`` probabilities of one prediction: sigmoid for BCE heads, softmax else."""
        return logits.sigmoid() if head.get("loss_type", "ce") == "bce" else logits.softmax(-1)

    def uncertainty(self, out, head):
        """``(B,)`` normalised uncertainty in [0, 1] of a batch's predictions (task sampling by
        uncertainty, CA-MTL): the entropy of the softmax over the labels / log C for CE heads;
        for BCE heads, the mean binary entropy of the labels / log 2."""
        scores = out["scores"].float()  # (B, C)
        if head.get("loss_type", "ce") == "bce":
            return _binary_entropy(scores.sigmoid()).mean(-1) / math.log(2.0)
        return _entropy(scores.log_softmax(-1)) / math.log(max(2, scores.shape[-1]))

    # -- evaluation ----------------------------------------------------------------------------

    def evaluator(self, ds, dataset, info):
        from unit_fast.evaluation import AccuracyEvaluator

        return AccuracyEvaluator()

    def eval_update(self, ev, out, batch, dataset):
        """Feed one val batch's model output to the evaluator.  ``batch["indices"]``: the dataset
        indices of the items the batch kept (unreadable images skipped)."""
        ev.update(out["scores"].float().cpu(), batch["targets"].cpu())

    def chance(self, summary_entry):
        """The headline metric's chance level from the synthetic ``summary.json`` entry, or None."""
        return (summary_entry or {}).get("chance", {}).get("majority_accuracy")

    # -- checkpoint metadata and predict -------------------------------------------------------

    def metadata(self, ds, dataset, info):
        """The kind's part of a dataset's checkpoint metadata entry (JSON values)."""
        return {}

    @abc.abstractmethod
    def predict_dataset(self, ds, entry, inputs, tokenizer, sizes):
        """A one-item val dataset of the input: ``inputs`` ``{name: value}`` of predict's inputs,
        ``entry`` the dataset's metadata entry."""

    def predict_result(self, ds, out, entry, head, size, options):
        """The prediction as a JSON-like dict with ``dataset``, ``kind`` and ``task``."""
        logits = out["scores"][0].float().cpu()  # (num_labels,)
        probs = self.probabilities(logits, head)
        names = entry.get("labels") or [str(i) for i in range(len(probs))]
        if len(names) != len(probs):
            raise ValueError(f"{len(names)} label names in the metadata for a head of {len(probs)} labels")
        index = int(probs.argmax())
        return {"dataset": ds, "kind": self.name, "task": self.model_task, "label": names[index],
                "index": index, "probabilities": {n: float(p) for n, p in zip(names, probs, strict=True)}}

    def format_result(self, r, inputs):
        """The human-readable lines of ``predict_result``'s dict."""
        probs = ", ".join(f"{n} {p:.3f}" for n, p in r["probabilities"].items())
        return f"{r['dataset']}: {r['label']}\n  probabilities: {probs}"

    def __repr__(self):
        return f"<task kind {self.name}>"


def register_task_kind(kind, *, replace=False):
    """Add ``kind`` (a ``TaskKind`` instance) to the table under ``kind.name``; an existing name
    is an error unless ``replace``.  Returns ``kind``."""
    if not isinstance(kind, TaskKind):
        raise TypeError(f"register_task_kind: expected a TaskKind instance, got {type(kind).__name__}")
    if not kind.name or kind.model_task not in ("detection", "vl", "glue"):
        raise ValueError(f"register_task_kind: {kind!r} needs a name and a model_task of detection, vl, glue")
    if kind.name in KINDS and not replace:
        raise ValueError(f"task kind {kind.name!r} is already registered (pass replace=True)")
    KINDS[kind.name] = kind
    return kind


def task_kind(name, where="kind"):
    """The registered kind ``name``; an unknown one is a ValueError naming ``where``."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: unknown task kind {name!r}; known: {', '.join(sorted(KINDS))}") from None
