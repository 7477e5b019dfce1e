"""DETR's image transforms as per-sample *plans*: drawn once in Python, executed by any backend.

DETR (``datasets/transforms.py``, MMF ``detr_image_and_target``) trains with
  RandomHorizontalFlip(0.5);
  RandomSelect(RandomResize(scales, max_size=1333),
               Compose(RandomResize([400, 500, 600]), RandomSizeCrop(384, 600),
                       RandomResize(scales, max_size=1333)));
  ToTensor; Normalize(ImageNet)
with ``scales = 480, 512, ..., 800``, and tests with a resize of the shorter side to 800 (longer
side at most 1333).  Here every random choice is made by ``plan_detr_train`` and recorded in a
``Plan``; the decoders (``decode.py``: DALI, torchvision, PIL) only execute plans, so they agree
up to JPEG-decoder and resize-filter rounding, and boxes follow from the plan alone
(``apply_plan_to_target``), never from the pixels.

Every plan is executed as: crop a window of the *original* image, resize it to ``size``, then
mirror if ``flip``.  Two deliberate differences from DETR, both invisible to training:
- DETR crops after its first resize; the plan maps that window back to original pixels (rounded
  to whole pixels) and resizes once.  The geometry and the size distribution are DETR's, but the
  image is resampled once instead of twice (sharper, cheaper, and it lets DALI decode only the
  window).
- DETR flips first and draws the crop in the flipped image; the plan draws it in the original
  image and mirrors last.  Flip and crop position are independent and uniform, so the
  distribution is the same.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from unit_fast.box_ops import box_xyxy_to_cxcywh

# ImageNet statistics of RGB in [0, 1] (torchvision / DETR Normalize).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DETR_TRAIN_SCALES = tuple(range(480, 801, 32))  # 480, 512, ..., 800
DETR_MAX_SIZE = 1333
DETR_TEST_SIZE = 800
DETR_CROP_SCALES = (400, 500, 600)  # the first resize of the resize-crop-resize branch
DETR_CROP_SIZE = (384, 600)  # RandomSizeCrop(min_size, max_size): side lengths, inclusive

BRANCHES = ("test", "resize", "resize_crop_resize")

# Target keys holding one row per box: filtered with the boxes when a crop drops some.
PER_BOX_KEYS = ("labels", "area", "iscrowd", "attributes", "orig_boxes", "orig_area")


@dataclass(frozen=True)
class Plan:
    """What one sample's transform does, in the order every backend executes it.

    ``orig_size (h, w)``: the decoded image's size (checked against the file);
    ``crop (top, left, height, width)``: window of the original image, whole pixels, the full
    image unless ``branch == "resize_crop_resize"``;
    ``size (h, w)``: the output size the window is resized to (bilinear, antialiased);
    ``flip``: mirror left-right after the resize;
    ``branch``: ``"test"``, ``"resize"`` or ``"resize_crop_resize"`` (DETR's two train branches).
    """

    orig_size: tuple[int, int]
    crop: tuple[int, int, int, int]
    size: tuple[int, int]
    flip: bool = False
    branch: str = "test"

    def __post_init__(self):
        # Plain int tuples (lists or numpy ints from a reader would break equality and hashing).
        for key in ("orig_size", "crop", "size"):
            object.__setattr__(self, key, tuple(int(v) for v in getattr(self, key)))
        object.__setattr__(self, "flip", bool(self.flip))
        H, W = self.orig_size
        top, left, ch, cw = self.crop
        if not (0 <= top and 0 <= left and ch >= 1 and cw >= 1 and top + ch <= H and left + cw <= W):
            raise ValueError(f"crop window {self.crop} (top, left, h, w) is outside the {H}x{W} image")
        if min(self.size) < 1:
            raise ValueError(f"output size {self.size} must be at least 1x1")
        if self.branch not in BRANCHES:
            raise ValueError(f"branch {self.branch!r} is not one of {BRANCHES}")

    @property
    def cropped(self) -> bool:
        """True when the window is smaller than the image (boxes are clipped and may vanish)."""
        return self.crop != (0, 0, *self.orig_size)


def resized_shape(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """DETR's ``RandomResize`` output ``(h, w)``: the shorter side becomes ``size`` unless the
    longer side would then exceed ``max_size``, in which case the longer side is capped near it.

    The longer side is truncated (``int``), as DETR's ``get_size`` does, so the aspect ratio can
    shift by under a pixel; boxes are scaled per axis and stay exact.
    """
    short, long = min(h, w), max(h, w)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def plan_detr_test(orig_h: int, orig_w: int, size: int = DETR_TEST_SIZE,
                   max_size: int = DETR_MAX_SIZE) -> Plan:
    """The deterministic test (and VQA / SNLI-VE) transform: shorter side ``size``, longer at most
    ``max_size``; no crop, no flip."""
    return Plan((orig_h, orig_w), (0, 0, orig_h, orig_w), resized_shape(orig_h, orig_w, size, max_size),
                False, "test")


def plan_detr_train(
    rng: random.Random | int,
    orig_h: int,
    orig_w: int,
    *,
    scales: Sequence[int] = DETR_TRAIN_SCALES,
    max_size: int = DETR_MAX_SIZE,
    crop_scales: Sequence[int] = DETR_CROP_SCALES,
    crop_size: tuple[int, int] = DETR_CROP_SIZE,
    flip_prob: float = 0.5,
    crop_prob: float = 0.5,
) -> Plan:
    """Draws one sample's DETR train transform (see the module docstring).

    Args:
        rng: a ``random.Random`` (or an int seed for a fresh one); the plan depends only on it
            and the arguments, so a seeded rng reproduces the plan on any backend.
        orig_h, orig_w: the original image size in pixels.
        scales: shorter-side sizes drawn uniformly (DETR: 480..800 by 32); ``max_size`` caps the
            longer side.  Small images can use small scales (tests do).
        crop_scales, crop_size: the resize-crop-resize branch: resize to a shorter side drawn
            from ``crop_scales``, crop a window whose sides are drawn from
            ``crop_size = (min, max)`` (clamped to the resized image), then resize as above.
        flip_prob, crop_prob: probabilities of the mirror and of the crop branch (DETR: 0.5).
    """
    if isinstance(rng, int):
        rng = random.Random(rng)
    flip = rng.random() < flip_prob
    if rng.random() >= crop_prob:  # DETR's RandomSelect: the plain RandomResize branch
        size = resized_shape(orig_h, orig_w, rng.choice(list(scales)), max_size)
        return Plan((orig_h, orig_w), (0, 0, orig_h, orig_w), size, flip, "resize")

    # RandomResize(crop_scales) -> (h1, w1); RandomSizeCrop in those coordinates.
    h1, w1 = resized_shape(orig_h, orig_w, rng.choice(list(crop_scales)))
    lo, hi = crop_size
    ch1 = rng.randint(min(lo, h1), min(h1, hi))
    cw1 = rng.randint(min(lo, w1), min(w1, hi))
    top1 = rng.randint(0, h1 - ch1)
    left1 = rng.randint(0, w1 - cw1)
    # Back to original pixels, rounded to whole pixels (every backend crops the same pixels).
    sy, sx = orig_h / h1, orig_w / w1
    top, left = min(round(top1 * sy), orig_h - 1), min(round(left1 * sx), orig_w - 1)
    bottom = min(max(round((top1 + ch1) * sy), top + 1), orig_h)
    right = min(max(round((left1 + cw1) * sx), left + 1), orig_w)
    crop = (top, left, bottom - top, right - left)
    size = resized_shape(crop[2], crop[3], rng.choice(list(scales)), max_size)
    return Plan((orig_h, orig_w), crop, size, flip, "resize_crop_resize")


def transform_boxes(plan: Plan, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Maps absolute xyxy boxes of the original image through ``plan``.

    Args:
        boxes: ``(N, 4)`` float absolute xyxy in original pixels.

    Returns:
        ``(boxes (N, 4) float64 absolute xyxy in output pixels, keep (N,) bool, scale float)``
        where ``scale`` is the factor areas grow by (``sx * sy``).  On a cropping plan boxes are
        clipped to the window and ``keep`` drops those with no width or height left (DETR's
        RandomSizeCrop); otherwise every box is kept as it is, unclipped, as DETR does.
    """
    b = boxes.to(torch.float64).reshape(-1, 4)
    top, left, ch, cw = plan.crop
    oh, ow = plan.size
    keep = torch.ones(b.shape[0], dtype=torch.bool)
    if plan.cropped:
        b = b - torch.tensor([left, top, left, top], dtype=torch.float64)
        b = torch.minimum(b.clamp(min=0), torch.tensor([cw, ch, cw, ch], dtype=torch.float64))
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    sx, sy = ow / cw, oh / ch
    b = b * torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
    if plan.flip:  # x -> ow - x swaps the two x coordinates
        b = torch.stack([ow - b[:, 2], b[:, 1], ow - b[:, 0], b[:, 3]], dim=1)
    return b, keep, sx * sy


def _as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def apply_plan_to_target(plan: Plan, target: dict) -> dict:
    """The DETR target after ``plan``: what the criterion and ``PostProcess`` expect.

    Args:
        target: ``boxes (N, 4)`` absolute xyxy in the original image (tensor or numpy), and any
            of ``PER_BOX_KEYS`` (``labels (N,)``, ``area (N,)``, ``iscrowd``, ``attributes
            (N, 16)``, ...), plus per-image keys (``image_id``...), which are passed through.

    Returns:
        A new dict with ``boxes (M, 4)`` float32 cxcywh normalised by the output size, in [0, 1]
        where the box lies inside the image; per-box keys filtered to the ``M`` kept boxes;
        ``area`` float32 in output pixels (the clipped box area after a crop, as DETR);
        ``orig_size`` and ``size`` int64 ``[h, w]`` of the original and the output image.
    """
    out = {k: v for k, v in target.items() if k not in PER_BOX_KEYS and k != "boxes"}
    xyxy, keep, scale = transform_boxes(plan, _as_tensor(target["boxes"]).reshape(-1, 4))
    for k in PER_BOX_KEYS:
        if k in target:
            out[k] = _as_tensor(target[k])[keep]
    if "area" in out:
        area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]) if plan.cropped else None
        out["area"] = (area[keep] if area is not None else out["area"].to(torch.float64) * scale).float()
    oh, ow = plan.size
    norm = torch.tensor([ow, oh, ow, oh], dtype=torch.float64)
    out["boxes"] = (box_xyxy_to_cxcywh(xyxy[keep]) / norm).float()  # (M, 4)
    out["orig_size"] = torch.tensor(plan.orig_size, dtype=torch.int64)
    out["size"] = torch.tensor(plan.size, dtype=torch.int64)
    return out


@functools.cache
def _imagenet_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    """``(255 * mean, 1 / (255 * std))``, each ``(3, 1, 1)`` float32 on ``device``: made once per
    device, since building them on a GPU is a blocking host-to-device copy."""
    mean = torch.tensor(IMAGENET_MEAN).mul_(255).view(3, 1, 1)
    inv_std = torch.tensor(IMAGENET_STD).mul_(255).reciprocal_().view(3, 1, 1)
    return mean.to(device), inv_std.to(device)


def normalize_uint8(images: Tensor) -> Tensor:
    """``(..., 3, H, W)`` uint8 RGB -> float32 ``(x / 255 - mean) / std`` (ImageNet)."""
    mean, inv_std = _imagenet_stats(images.device)
    return (images.to(torch.float32) - mean).mul_(inv_std)
