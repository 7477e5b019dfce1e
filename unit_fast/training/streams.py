"""Per-dataset batch streams: seeded shuffles, image batches of one aspect ratio, one rank's share,
exact resume.

Each dataset has its own stream of global index batches: epoch ``e`` is a permutation seeded by
``(seed, dataset, e)``, cut into batches of ``batch_size``; rank ``r`` takes rows
``r, r + world, ...`` of each (the split ``DistributedSampler`` makes), so every rank sees its
share of the same batch.  A dataset with ``aspect_ratios()`` (detection) is cut by aspect ratio
(``data.aspect_ratio_bins``): the permutation is dealt into one buffer per bin by
``AspectRatioBatchSampler.batches`` and each buffer that fills is the next batch; the buffers
left incomplete at the end are pooled, in permutation order, into the epoch's last batches
(mixed shapes, at most ``len(bins)`` of them) and the ragged rest is dropped.  That design,
rather than cutting each bin apart, dropping each bin's tail and shuffling the batch order:

- with every image in one bin it *is* the plain cut, batch for batch (the same runs as before
  the grouping existed), and it needs no second random stream;
- the bins interleave in proportion to their sizes through the epoch;
- an epoch has exactly the plain cut's ``N // batch_size`` batches and every image is drawn,
  even one in a bin too small to fill a batch (a tiny dataset with no bin that fills one
  streams the plain cut);
- every batch is full, so ``position`` (indices handed out this epoch) is ``batch_size``
  times the batches handed out, and ``batches[position // batch_size]`` is the next one.

The state is ``{epoch, position, aspect_ratio_bins}``, the last the bins the epoch in progress
was cut with (``[]``: plain).  A resumed stream finishes that epoch with them, so it continues
with the very next batch even when the configured bins changed; states written before grouping
existed (``{epoch, position}``) were plain, and load as such.
"""

import copy
import math
import zlib

import numpy as np

from unit_fast.data.collate import AspectRatioBatchSampler


def check_aspect_ratio_bins(bins):
    """``bins`` (``data.aspect_ratio_bins``) as a tuple of floats; ValueError naming the key
    unless a sorted list of positive finite numbers (``None`` or ``[]``: no grouping)."""
    if bins is None:
        return ()
    numbers = isinstance(bins, (list, tuple)) and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0
        for b in bins)
    if not numbers or list(bins) != sorted(bins):
        raise ValueError(f"data.aspect_ratio_bins must be a sorted list of positive width/height boundaries "
                         f"(e.g. [1.0]; [] = no grouping), got {bins!r}")
    return tuple(float(b) for b in bins)


class BatchStream:
    """The endless stream of one dataset's index batches for this rank.

    Args:
        dataset: its items; grouped by aspect ratio when it has ``aspect_ratios()`` (width /
            height per item) and ``aspect_ratio_bins`` is not empty.
        name: the dataset's name (seeds its shuffles).
        batch_size: the global batch (over all ranks); ``world_size`` must divide into it.
        aspect_ratio_bins: sorted width/height boundaries (``data.aspect_ratio_bins``); ``()``
            cuts plain batches of any shape mix.
    """

    def __init__(self, dataset, name, batch_size, *, seed=0, rank=0, world_size=1, shuffle=True,
                 aspect_ratio_bins=()):
        bins = check_aspect_ratio_bins(aspect_ratio_bins)
        if batch_size < world_size:
            raise ValueError(f"batch size {batch_size} is smaller than the world size {world_size}")
        if len(dataset) == 0:
            raise ValueError(f"dataset {name!r} is empty")
        if len(dataset) < batch_size:  # else no full batch: the plain cut would never yield one
            raise ValueError(f"dataset {name!r} has {len(dataset)} items, fewer than one batch of "
                             f"{batch_size} (training.batch_size)")
        self.dataset, self.name = dataset, name
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.shuffle = shuffle
        self._ratios = dataset.aspect_ratios() if bins and hasattr(dataset, "aspect_ratios") else None
        self.bins = bins if self._ratios is not None else ()  # () for datasets without image sizes
        self._samplers = {}  # {bins: AspectRatioBatchSampler}
        self.epoch, self.position = 0, 0
        self._epoch_bins = self.bins  # the bins the epoch in progress is cut with
        self._order = None  # the epoch's plain permutation (N,), or its grouped batches (K, batch_size)

    def _sampler(self, bins):
        if bins not in self._samplers:
            ratios = self._ratios if self._ratios is not None else self.dataset.aspect_ratios()
            self._samplers[bins] = AspectRatioBatchSampler(ratios, self.batch_size, drop_last=True, bins=bins,
                                                           mix_tails=True)
        return self._samplers[bins]

    def _permutation(self):
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        key = [self.seed, zlib.crc32(self.name.encode()), self.epoch]
        return np.random.default_rng(key).permutation(n)

    def _batch(self):
        """The global batch at ``position`` of the current epoch, or None when the epoch is over."""
        if not self._epoch_bins:  # plain: slices of the permutation
            if self.position + self.batch_size > len(self._order):  # drop the ragged tail
                return None
            return self._order[self.position:self.position + self.batch_size]
        k = self.position // self.batch_size
        return self._order[k] if k < len(self._order) else None

    def next_indices(self):
        """The next global batch's indices for this rank (wraps into the next epoch)."""
        if self._order is None:
            order = self._permutation()
            if self._epoch_bins:  # (N // batch_size, batch_size): all full (drop_last), so one array
                batches = self._sampler(self._epoch_bins).batches(order)
                order = np.array(batches, dtype=np.int64).reshape(len(batches), self.batch_size)
            self._order = order
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
        batch = self._batch()
        if batch is None:  # next epoch, cut with the configured bins
            self.epoch, self.position, self._order, self._epoch_bins = self.epoch + 1, 0, None, self.bins
            return self.next_indices()
        self.position += self.batch_size
        return batch[self.rank::self.world].tolist()

    def fork(self):
        """A stream at the same position that advances independently (the dataset is shared):
        what a prefetcher reads ahead from while this one marks what was consumed."""
        other = copy.copy(self)  # shares the dataset, its aspect ratios and the (read-only) samplers
        other._samplers = self._samplers.copy()
        other.load_state_dict(self.state_dict())
        return other

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "aspect_ratio_bins": list(self._epoch_bins)}

    def load_state_dict(self, state):
        """Loads ``state_dict()``'s output, or a state written before grouping (``{epoch, position}``:
        that epoch was cut plain)."""
        bins = tuple(float(b) for b in state.get("aspect_ratio_bins", ()))
        if bins and not hasattr(self.dataset, "aspect_ratios"):  # no image sizes: not this stream's state
            raise ValueError(f"dataset {self.name!r}: the stream state is cut by aspect ratio {list(bins)}, "
                             "but the dataset has no aspect_ratios()")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
        self._epoch_bins = bins
