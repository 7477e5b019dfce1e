"""Per-dataset batch streams: seeded shuffles, one rank's share, exact resume.

Each dataset has its own stream of index batches: epoch ``e`` is a permutation seeded by
``(seed, dataset, e)``; a global batch of ``batch_size`` is cut from it and rank ``r`` takes
rows ``r, r + world, ...`` (the same split ``DistributedSampler`` makes).  The state is just
``(epoch, position)``, so a resumed run continues with the very next batch.
"""

import zlib

import numpy as np


class BatchStream:
    def __init__(self, dataset, name, batch_size, *, seed=0, rank=0, world_size=1, shuffle=True):
        if batch_size < world_size:
            raise ValueError(f"batch size {batch_size} is smaller than the world size {world_size}")
        if len(dataset) == 0:
            raise ValueError(f"dataset {name!r} is empty")
        self.dataset, self.name = dataset, name
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch, self.position = 0, 0
        self._order = None

    def _permutation(self):
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        key = [self.seed, zlib.crc32(self.name.encode()), self.epoch]
        return np.random.default_rng(key).permutation(n)

    def next_indices(self):
        """The next global batch's indices for this rank (wraps into the next epoch)."""
        if self._order is None:
            self._order = self._permutation()
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
        if self.position + self.batch_size > len(self._order):  # drop the ragged tail, next epoch
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
            return self.next_indices()
        batch = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch[self.rank::self.world].tolist()

    def fork(self):
        """A stream at the same position that advances independently (the dataset is shared):
        what a prefetcher reads ahead from while this one marks what was consumed."""
        other = BatchStream(self.dataset, self.name, self.batch_size, seed=self.seed, rank=self.rank,
                            world_size=self.world, shuffle=self.shuffle)
        other.load_state_dict(self.state_dict())
        return other

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
