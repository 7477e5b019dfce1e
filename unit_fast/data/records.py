"""What the dataset readers return: one record per sample, before any image is decoded.

Readers (``unit_fast/data/readers/``) parse the real annotation formats into these; the image
pipeline (``decode.py``, ``transforms.py``) and the tokenizer (``text.py``) turn them into model
inputs.  Boxes are absolute pixel ``xyxy`` in the original image here; the transforms convert
them to DETR's normalised ``cxcywh`` at the end.
"""

from dataclasses import dataclass, field

import numpy as np

# Visual Genome attribute slots per box (MMF: max_attribute_num 16); -1 = empty slot.
MAX_ATTRIBUTES = 16


@dataclass
class DetectionRecord:
    """One image of a COCO-format detection dataset (COCO, or Visual Genome with attributes).

    ``boxes (N, 4)`` float32 absolute xyxy in the original image, crowd boxes removed;
    ``labels (N,)`` int64 raw category ids (COCO: 1..90, so ``num_classes`` 91);
    ``attributes (N, 16)`` int64, -1 padded, or None when the dataset has none;
    ``area (N,)`` float32 as annotated.
    """

    image_path: str
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    area: np.ndarray
    attributes: np.ndarray | None = None


@dataclass
class VQARecord:
    """One VQAv2 question: ``scores (num_answers,)`` float32 soft scores over the answer
    vocabulary by the standard VQA accuracy rule (``min(1, #humans who said it / 3)``, averaged
    over the 10 leave-one-out subsets); ``answers`` the raw human answers (may be empty at test)."""

    image_path: str
    image_id: int
    question_id: int
    question: str
    answers: list = field(default_factory=list)
    scores: np.ndarray | None = None


@dataclass
class EntailmentRecord:
    """One SNLI-VE pair: a Flickr30k image premise and a text hypothesis; ``label`` 0 =
    entailment, 1 = neutral, 2 = contradiction (``ENTAILMENT_LABELS``)."""

    image_path: str
    image_id: str
    hypothesis: str
    label: int


ENTAILMENT_LABELS = ("entailment", "neutral", "contradiction")


@dataclass
class TextRecord:
    """One GLUE example: ``text_a`` (and ``text_b`` for pair tasks); ``label`` the class index
    (-1 when the split has no labels, e.g. GLUE test files)."""

    text_a: str
    text_b: str | None
    label: int
    index: str
