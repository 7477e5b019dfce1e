"""Datasets over reader records, and the collator that turns a list of items into the batch
``UniT.forward`` takes.

Items are cheap (a path, a transform plan, the target or the token ids): images are decoded a
whole batch at a time by the collator (``decode.load_batch``: DALI, torchvision or PIL), so DALI
sees batches and the work can run in DataLoader workers or in the main process alike.

Random transforms are seeded by ``(seed, epoch, index)``: an item is the same whichever worker
makes it and however a run was resumed (``set_epoch`` as with ``DistributedSampler``).
"""

import logging
import random
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from unit_fast.data import decode
from unit_fast.data.collate import collate_images
from unit_fast.data.readers.vqa2 import soft_scores
from unit_fast.data.text import encode
from unit_fast.data.transforms import (
    DETR_CROP_SCALES,
    DETR_CROP_SIZE,
    DETR_MAX_SIZE,
    DETR_TEST_SIZE,
    DETR_TRAIN_SCALES,
    plan_detr_test,
    plan_detr_train,
)


@dataclass(frozen=True)
class ImageSizes:
    """DETR's resize settings; smaller for small images (the synthetic default uses ~160 px)."""

    train_scales: tuple = DETR_TRAIN_SCALES
    max_size: int = DETR_MAX_SIZE
    test_size: int = DETR_TEST_SIZE
    crop_scales: tuple = DETR_CROP_SCALES
    crop_size: tuple = DETR_CROP_SIZE


class _Base(Dataset):
    def __init__(self, records, dataset_name, *, train=False, sizes=ImageSizes(), seed=0):
        self.records = list(records)
        self.dataset_name = dataset_name
        self.train = train
        self.sizes = sizes
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.records)

    def _plan(self, index, height, width):
        if not self.train:
            return plan_detr_test(height, width, self.sizes.test_size, self.sizes.max_size)
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")  # str seeds hash with sha512: stable
        s = self.sizes
        return plan_detr_train(rng, height, width, scales=s.train_scales, max_size=s.max_size,
                               crop_scales=s.crop_scales, crop_size=s.crop_size)


class DetectionDataset(_Base):
    """COCO / Visual Genome detection: DETR's train transform (flip, multi-scale resize, the
    resize-crop-resize branch) when ``train``, else the test resize."""

    def __getitem__(self, index):
        r = self.records[index]
        target = {"boxes": r.boxes, "labels": r.labels, "area": r.area,
                  "image_id": torch.tensor(r.image_id, dtype=torch.int64)}
        if r.attributes is not None:
            target["attributes"] = r.attributes
        return {"index": index, "image_path": r.image_path, "plan": self._plan(index, r.height, r.width),
                "target": target}

    def aspect_ratios(self):
        """``width / height`` of every image, from the annotations: what ``AspectRatioBatchSampler``
        (and ``BatchStream``'s grouping) bins, as torchvision's ``compute_aspect_ratios``."""
        return [r.width / r.height for r in self.records]


class _TextBase(_Base):
    """A dataset with text: ``tokenizer`` and ``max_length`` tokens (MMF's BERT layout)."""

    def __init__(self, records, dataset_name, tokenizer, *, max_length, **kw):
        super().__init__(records, dataset_name, **kw)
        self.tokenizer, self.max_length = tokenizer, max_length

    def _text(self, text_a, text_b=None):
        return encode(self.tokenizer, text_a, text_b, max_length=self.max_length)


class VQADataset(_TextBase):
    """VQAv2: the test resize (MMF applies no augmentation), question tokens (``max_length`` 25),
    soft answer scores ``(num_answers,)`` as targets: the record's, or computed per item from its
    raw answers and ``answer_vocab`` (records read with ``dense_scores=False``: 12.5 KB less per
    question).  Image sizes are read from the file header (no full decode), per item: the records
    carry none, so there is no ``aspect_ratios()`` and training batches are not grouped by aspect
    ratio (reading every header up front costs a pass over all images before the first step)."""

    def __init__(self, records, dataset_name, tokenizer, *, max_length=25, answer_vocab=None, **kw):
        super().__init__(records, dataset_name, tokenizer, max_length=max_length, **kw)
        self.vocab_index = None if answer_vocab is None else {a: i for i, a in enumerate(answer_vocab)}

    def __getitem__(self, index):
        r = self.records[index]
        scores = r.scores
        if scores is None:
            if self.vocab_index is None:
                raise ValueError(f"{self.dataset_name}: record {r.question_id} has no scores and no "
                                 "answer_vocab was given")
            scores = soft_scores(r.answers, self.vocab_index)
        item = {"index": index, "image_path": r.image_path, **self._text(r.question),
                "target": torch.as_tensor(scores, dtype=torch.float32)}
        item.update(_test_plan_from_file(r.image_path, self.sizes))
        return item


class EntailmentDataset(_TextBase):
    """SNLI-VE: image premise, hypothesis tokens, label 0/1/2.  Like ``VQADataset``, image sizes come
    from the file header per item, so there is no ``aspect_ratios()``: batches are not grouped."""

    def __init__(self, records, dataset_name, tokenizer, *, max_length=25, **kw):
        super().__init__(records, dataset_name, tokenizer, max_length=max_length, **kw)

    def __getitem__(self, index):
        r = self.records[index]
        return {"index": index, "image_path": r.image_path, **self._text(r.hypothesis),
                "target": torch.tensor(r.label, dtype=torch.int64),
                **_test_plan_from_file(r.image_path, self.sizes)}


class TextDataset(_TextBase):
    """GLUE: ``text_a`` (and ``text_b``) tokens (``max_length`` 128, MMF's GLUE setting), label."""

    def __init__(self, records, dataset_name, tokenizer, *, max_length=128, **kw):
        super().__init__(records, dataset_name, tokenizer, max_length=max_length, **kw)

    def __getitem__(self, index):
        r = self.records[index]
        return {"index": index, **self._text(r.text_a, r.text_b),
                "target": torch.tensor(r.label, dtype=torch.int64)}


def _test_plan_from_file(path, sizes):
    """``{"plan": ...}``: the test plan of an image whose size the annotations do not give (VQAv2,
    SNLI-VE). PIL parses the header only, so the file is not read twice (the collator reads it
    whole when it decodes). An unreadable header gives ``{"plan": None, "image_error": exc}``
    instead: the collator raises it or skips the item, like any other unreadable image."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError) as exc:  # missing, truncated, not an image
        return {"plan": None, "image_error": exc}
    return {"plan": plan_detr_test(h, w, sizes.test_size, sizes.max_size)}


log = logging.getLogger(__name__)


class BatchCollator:
    """``collate_fn``: a list of items of one dataset -> the ``sample`` dict of ``UniT.forward``.

    Args:
        dataset_name: the batch's ``dataset_name``.
        decoder: image decoder (``"dali"``, ``"torchvision"``, ``"pil"``; default: DALI when
            installed).
        device: where images are decoded (``"cuda"``: DALI mixed / nvJPEG; default CPU).
        on_error: ``"raise"`` (a bad image raises, naming the file) or ``"skip"``: the batch
            drops it, logs a warning naming the file and reports ``batch["skipped"]`` (a count
            the trainer adds up per epoch); a batch with no readable image raises ValueError.
        dataset_type: ``"train"`` / ``"val"`` / ``"test"`` (loss-key prefix).

    Items are dicts with ``"index"`` (their dataset index), the text keys, ``"target"`` and, for
    image tasks, ``"image_path"`` and ``"plan"``.  The batch adds ``"indices"``: a list of ints, the
    dataset indices of the items it kept, in batch order, so row ``i`` of ``image``, the text
    tensors and ``targets`` is item ``indices[i]`` (every item of a text batch; under ``"skip"``
    the unreadable images' items are gone): match records by it, never by the items handed in.
    """

    def __init__(self, dataset_name, *, decoder=None, device="cpu", on_error="raise", dataset_type="train"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.dataset_name, self.decoder, self.device = dataset_name, decoder, device
        self.on_error, self.dataset_type = on_error, dataset_type

    def _images(self, items):
        unread = [it for it in items if "image_error" in it]  # the dataset could not read the header
        if unread and self.on_error == "raise":
            raise unread[0]["image_error"]
        good = [it for it in items if "image_error" not in it]
        try:
            images = decode.load_batch([it["image_path"] for it in good], [it["plan"] for it in good],
                                       decoder=self.decoder, device=self.device)
            errors = [(it, it["image_error"]) for it in unread]
        except (ValueError, OSError):
            if self.on_error == "raise":
                raise
            # Find the bad files one by one; keep the rest.
            errors, images, decoded = [(it, it["image_error"]) for it in unread], [], []
            for it in good:
                try:
                    images += decode.load_batch([it["image_path"]], [it["plan"]], decoder=self.decoder,
                                                device=self.device)
                    decoded.append(it)
                except (ValueError, OSError) as exc:
                    errors.append((it, exc))
            good = decoded
        for it, exc in errors:
            log.warning("%s: skipped unreadable image %s (%s)", self.dataset_name, it["image_path"], exc)
        if not good and items:
            raise ValueError(f"{self.dataset_name}: every image of this batch is unreadable, e.g. "
                             f"{errors[0][0]['image_path']} ({errors[0][1]})")
        return images, good, len(errors)

    def __call__(self, items):
        from unit_fast.data.transforms import apply_plan_to_target

        batch = {"dataset_name": self.dataset_name, "dataset_type": self.dataset_type, "skipped": 0}
        if items and "image_path" in items[0]:
            images, items, skipped = self._images(items)
            batch["skipped"] = skipped
            batch["image"] = collate_images(images) if images else None
        batch["indices"] = [int(it["index"]) for it in items]  # after the skips: aligned with the rows
        if not items:
            return batch
        if "input_ids" in items[0]:
            for key in ("input_ids", "input_mask", "segment_ids"):
                batch[key] = torch.stack([it[key] for it in items])  # (B, L)
        if isinstance(items[0]["target"], dict):  # detection
            batch["targets"] = [apply_plan_to_target(it["plan"], it["target"]) for it in items]
        else:
            batch["targets"] = torch.stack([it["target"] for it in items])
        return batch
