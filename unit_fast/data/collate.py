"""Padded image batches, and batches of similar aspect ratio so the padding stays small.

DETR pads every image of a batch to the batch's largest height and width; a landscape and a
portrait image in one batch waste nearly half of each (detr#150: OOM from exactly that).
``AspectRatioBatchSampler`` groups landscape with landscape and portrait with portrait (the idea
of torchvision's detection reference ``GroupedBatchSampler``; written here from scratch, without
its padding of the last batches with repeated samples).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch import Tensor

from unit_fast.models.misc import NestedTensor


def collate_images(images: Sequence[Tensor], size_divisibility: int = 0) -> NestedTensor:
    """Zero-pads ``(3, H_i, W_i)`` images into a ``NestedTensor``: ``tensors (B, 3, H, W)``
    (same dtype/device) and ``mask (B, H, W)`` bool, True on padding, each image at the
    top-left; ``H, W`` the maxima, rounded up to a multiple of ``size_divisibility`` if > 0."""
    return NestedTensor.from_tensor_list(list(images), size_divisibility=size_divisibility)


class AspectRatioBatchSampler:
    """Batches of indices whose images share an aspect-ratio bin; every index once per epoch.

    Args:
        aspect_ratios: width / height of each image (``len(dataset)`` floats; the original
            size is enough: DETR's resizes keep the aspect ratio up to a pixel).
        batch_size: images per batch.
        drop_last: drop each bin's last incomplete batch (else it is yielded, smaller).
        seed: with the epoch (``set_epoch``), fixes the order: same (seed, epoch), same batches.
        shuffle: shuffle the indices each epoch (False: dataset order within each bin).
        bins: sorted aspect-ratio boundaries; the default ``(1.0,)`` makes two groups,
            portrait (< 1) and landscape (>= 1); finer bins pad less but leave more partial
            batches.
        group_by_aspect: False turns the bucketing off: plain (shuffled) batches of any mix of
            shapes, as DETR's sampler gives.

    Indices are dealt in (shuffled) order into one buffer per bin; a full buffer is yielded as
    a batch, so batches come out in random order, each homogeneous.  The partial buffers left
    at the end are yielded last (unless ``drop_last``).  Not distributed-aware: shard the
    indices first, or give each rank its own subset.
    """

    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, drop_last: bool = False,
                 seed: int = 0, shuffle: bool = True, bins: Sequence[float] = (1.0,),
                 group_by_aspect: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if list(bins) != sorted(bins):
            raise ValueError(f"bins must be sorted, got {bins}")
        ratios = np.asarray(aspect_ratios, dtype=np.float64)
        if ratios.ndim != 1 or not np.all(np.isfinite(ratios) & (ratios > 0)):
            raise ValueError("aspect_ratios must be a 1-D sequence of finite positive width/height ratios")
        self.batch_size, self.drop_last, self.seed, self.shuffle = batch_size, drop_last, seed, shuffle
        self.group_by_aspect = group_by_aspect
        # (N,) bin id per image; 0 for every image when bucketing is off.
        self.groups = np.searchsorted(np.asarray(bins, dtype=np.float64), ratios, side="right") \
            if group_by_aspect else np.zeros(len(ratios), dtype=np.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's order (call before iterating, as with ``DistributedSampler``)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.groups)
        # One generator per (seed, epoch): reproducible without touching global RNG state.
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        buffers: dict[int, list[int]] = {}
        for idx in order.tolist():
            buf = buffers.setdefault(int(self.groups[idx]), [])
            buf.append(idx)
            if len(buf) == self.batch_size:
                yield buf
                buffers[int(self.groups[idx])] = []
        if not self.drop_last:
            for group in sorted(buffers):
                if buffers[group]:
                    yield buffers[group]

    def __len__(self) -> int:
        counts = np.bincount(self.groups) if len(self.groups) else np.zeros(0, dtype=np.int64)
        full = counts // self.batch_size
        return int(full.sum() + (0 if self.drop_last else np.count_nonzero(counts % self.batch_size)))
