"""A trained ``UniT`` for one dataset as a module of tensors in, tensors out: what
``python -m unit_fast.export`` traces.

Inputs are the already-preprocessed batch, as ``BatchCollator`` makes it (``dataset_type="test"``);
outputs are the task head's raw outputs.  By the dataset's head family (``TaskKind.model_task``):

- ``detection``: inputs ``image (B, 3, H, W)`` float32 (normalised, zero on padding) and
  ``image_mask (B, H, W)`` bool (True on padding); outputs ``pred_logits (B, Q, C + 1)`` (class
  logits, the last class "no object") and ``pred_boxes (B, Q, 4)`` (sigmoid, normalised cxcywh
  of the unpadded image); with an attribute head (Visual Genome) also ``attr_logits (B, Q, A)``.
- ``vl`` (vqa, image-text classification): inputs ``image``, ``image_mask`` as above, then
  ``input_ids``, ``input_mask`` (1 = token, 0 = padding), ``segment_ids``, each ``(B, L)`` int64;
  output ``scores (B, num_labels)`` logits.
- ``glue`` (text classification): inputs ``input_ids``, ``input_mask``, ``segment_ids`` ``(B, L)``
  int64; output ``scores (B, num_labels)`` logits.

``L`` is the run's max length of the dataset (its metadata's ``max_length``): the tokens are
padded to it, as evaluation pads them.
"""

import torch
from torch import nn

from unit_fast.structures import NestedTensor

IMAGE_INPUTS = ("image", "image_mask")
TEXT_INPUTS = ("input_ids", "input_mask", "segment_ids")
INPUT_NAMES = {"detection": IMAGE_INPUTS, "vl": IMAGE_INPUTS + TEXT_INPUTS, "glue": TEXT_INPUTS}
OUTPUT_NAMES = {"detection": ("pred_logits", "pred_boxes"), "vl": ("scores",), "glue": ("scores",)}


class _TaskGraph(nn.Module):
    """``model`` for dataset ``ds`` only; subclasses fix the forward's signature (the exporters
    name the graph's inputs after it)."""

    def __init__(self, model, ds):
        super().__init__()
        self.model, self.ds = model, ds
        self.task = model.task_type(ds)
        self.output_names = output_names(model, ds)

    def _run(self, **inputs):
        # "test": no auxiliary decoder outputs, no loss (targets None).
        out = self.model({"dataset_name": self.ds, "dataset_type": "test", "targets": None, **inputs})
        return tuple(out[name] for name in self.output_names)


class DetectionGraph(_TaskGraph):
    def forward(self, image, image_mask):
        return self._run(image=NestedTensor(image, image_mask))


class VisionLanguageGraph(_TaskGraph):
    def forward(self, image, image_mask, input_ids, input_mask, segment_ids):
        return self._run(image=NestedTensor(image, image_mask), input_ids=input_ids, input_mask=input_mask,
                         segment_ids=segment_ids)


class TextGraph(_TaskGraph):
    def forward(self, input_ids, input_mask, segment_ids):
        return self._run(input_ids=input_ids, input_mask=input_mask, segment_ids=segment_ids)


def output_names(model, ds):
    """The graph's outputs for dataset ``ds``: ``OUTPUT_NAMES`` of its head family, plus
    ``attr_logits (B, Q, A)`` for a detection dataset with an attribute head (Visual Genome) when
    the model predicts attributes, as its eager forward does."""
    names = OUTPUT_NAMES[model.task_type(ds)]
    det = model.det_losses[ds] if names == OUTPUT_NAMES["detection"] else None
    if det is not None and det.attribute_head is not None and model.predict_attributes:
        names += ("attr_logits",)
    return names


GRAPHS = {"detection": DetectionGraph, "vl": VisionLanguageGraph, "glue": TextGraph}


def task_graph(model, ds):
    """The module of ``model`` (a ``UniT``) for dataset ``ds``; ValueError for a dataset it lacks."""
    return GRAPHS[model.task_type(ds)](model, ds)


def example_inputs(graph, entry, batch=2):
    """Example inputs of ``graph`` (a ``task_graph``) in the shapes of the dataset's metadata
    ``entry``: images ``test_size`` square (the test-time short side), tokens ``max_length``
    long.  Values are arbitrary (the graph has no data-dependent branches); one image of the
    batch is half padding, so the mask path is traced."""
    g = torch.Generator().manual_seed(0)
    inputs = []
    if graph.task in ("detection", "vl"):
        side = int(entry["image_sizes"]["test_size"])
        mask = torch.zeros(batch, side, side, dtype=torch.bool)
        mask[-1, :, side // 2:] = True
        image = torch.randn(batch, 3, side, side, generator=g).masked_fill(mask[:, None], 0.0)
        inputs += [image, mask]
    if graph.task in ("vl", "glue"):
        length = int(entry["max_length"])
        vocab = graph.model.bert_model.module.embeddings.word_embeddings.num_embeddings
        ids = torch.randint(1, vocab, (batch, length), generator=g)
        input_mask = torch.ones(batch, length, dtype=torch.long)
        input_mask[-1, length // 2:] = 0
        inputs += [ids * input_mask, input_mask, torch.zeros(batch, length, dtype=torch.long)]
    return tuple(inputs)
