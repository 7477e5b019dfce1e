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

from unit_fast.structures import NestedTensor


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
        drop_last: drop each bin's last incomplete batch (else it is yielded, smaller); with
            ``mix_tails``, the last incomplete mixed batch.
        seed: with the epoch (``set_epoch``), fixes the order: same (seed, epoch), same batches.
        shuffle: shuffle the indices each epoch (False: dataset order within each bin).
        bins: sorted aspect-ratio boundaries; bin ``k`` holds the ratios in
            ``[bins[k-1], bins[k])``.  The default ``(1.0,)`` makes two groups, portrait (< 1)
            and landscape or square (>= 1); finer bins pad less but leave more partial batches;
            ``()`` is one group.
        group_by_aspect: False turns the bucketing off: plain (shuffled) batches of any mix of
            shapes, as DETR's sampler gives.
        mix_tails: pool the bins' incomplete buffers, in dealing order, into the last batches,
            mixed in shape (at most ``len(bins)`` full ones): every index is reachable and an
            epoch has as many full batches as a plain cut, ``N // batch_size``.

    Indices are dealt in (shuffled) order into one buffer per bin; a full buffer is yielded as
    a batch, so batches come out in random order, each homogeneous (``batches``: the dealing of
    a given order; ``BatchStream`` deals its own seeded permutation with it).  The partial
    buffers left at the end are yielded last (unless ``drop_last``; pooled with ``mix_tails``).
    Not distributed-aware: shard the indices first, or give each rank its own subset
    (``BatchStream`` cuts one global batch per step instead).
    """

    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, drop_last: bool = False,
                 seed: int = 0, shuffle: bool = True, bins: Sequence[float] = (1.0,),
                 group_by_aspect: bool = True, mix_tails: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if list(bins) != sorted(bins):
            raise ValueError(f"bins must be sorted, got {bins}")
        ratios = np.asarray(aspect_ratios, dtype=np.float64)
        if ratios.ndim != 1 or not np.all(np.isfinite(ratios) & (ratios > 0)):
            raise ValueError("aspect_ratios must be a 1-D sequence of finite positive width/height ratios")
        self.batch_size, self.drop_last, self.seed, self.shuffle = batch_size, drop_last, seed, shuffle
        self.group_by_aspect, self.mix_tails = group_by_aspect, mix_tails
        # (N,) bin id per image; 0 for every image when bucketing is off.
        self.groups = np.searchsorted(np.asarray(bins, dtype=np.float64), ratios, side="right") \
            if group_by_aspect else np.zeros(len(ratios), dtype=np.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's order (call before iterating, as with ``DistributedSampler``)."""
        self.epoch = epoch

    def batches(self, order: Sequence[int]) -> list[np.ndarray]:
        """``order`` (int indices, e.g. an epoch's permutation) dealt into per-bin buffers: the
        batches (int64 arrays) in the order their buffers fill, then the partial ones by bin
        unless ``drop_last`` (pooled in dealing order and cut again with ``mix_tails``).  With
        one bin, or with ``mix_tails`` and no bin that fills a batch, the full batches are
        ``order``'s consecutive slices of ``batch_size``.  Vectorised, as if dealt one by one: a
        batch is complete when its last index is dealt."""
        order = np.asarray(order, dtype=np.int64)
        groups = self.groups[order]  # (N,) bin of each index, in dealing order
        bs = self.batch_size
        full, done, left = [np.zeros((0, bs), dtype=np.int64)], [np.zeros(0, dtype=np.int64)], []
        for group in np.unique(groups):  # sorted bins
            dealt_at = np.flatnonzero(groups == group)  # (M,) positions in order of this bin's indices
            k = len(dealt_at) // bs
            full.append(order[dealt_at[:k * bs]].reshape(k, bs))  # (k, bs)
            done.append(dealt_at[bs - 1:k * bs:bs])  # (k,) where each batch's last index is dealt
            if len(dealt_at) > k * bs:
                left.append(dealt_at[k * bs:])  # positions of the bin's incomplete buffer
        full_batches = np.concatenate(full)[np.argsort(np.concatenate(done))]  # (K, bs), positions unique
        if not self.mix_tails:
            return list(full_batches) + ([] if self.drop_last else [order[at] for at in left])
        rest = order[np.sort(np.concatenate(left))] if left else order[:0]  # (R,) in dealing order
        m = len(rest) // bs
        ragged = [] if self.drop_last or len(rest) == m * bs else [rest[m * bs:]]
        return list(full_batches) + list(rest[:m * bs].reshape(m, bs)) + ragged

    def __iter__(self) -> Iterator[list[int]]:
        # One generator per (seed, epoch): reproducible without touching global RNG state.
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.groups)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        return (batch.tolist() for batch in self.batches(order))

    def __len__(self) -> int:
        if self.mix_tails:  # every index in a batch: as many as a plain cut
            n, bs = len(self.groups), self.batch_size
            return n // bs + (0 if self.drop_last or n % bs == 0 else 1)
        counts = np.bincount(self.groups) if len(self.groups) else np.zeros(0, dtype=np.int64)
        full = counts // self.batch_size
        return int(full.sum() + (0 if self.drop_last else np.count_nonzero(counts % self.batch_size)))
