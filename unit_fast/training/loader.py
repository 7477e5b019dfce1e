"""The micro-batches of each optimizer update, loaded in the main process or in DataLoader workers.

An update draws ``tasks_per_step`` tasks from the ``TaskSampler`` and, for each, ``accumulate``
index batches from that task's ``BatchStream`` (``plan_update``); the trainer consumes them in
that order.

With ``num_workers > 0`` one ``torch.utils.data.DataLoader`` reads items and collates batches in
worker processes, ahead of time.  Exact resume needs the checkpointed sampler and stream state to
be the *consumed* position, not the prefetched one, so the workers are fed from copies of the
sampler and streams that run ahead, while the trainer's own sampler and streams advance only when
a batch is consumed; each prefetched batch is checked against the trainer's own draw.
"""

import copy
import os

import torch
from torch.utils.data import DataLoader, Dataset


def plan_update(sampler, streams, tasks_per_step=1, accumulate=1, pools=None):
    """Draw one update: ``(tasks, plan)``; ``tasks`` the ``tasks_per_step`` dataset names drawn
    (repeats possible), ``plan`` the micro-batches in consumption order,
    ``[(dataset, epoch, indices), ...]`` of length ``tasks_per_step * accumulate``.  ``pools``:
    ``{dataset: m}``: that dataset's micro-batches are candidate pools of ``m`` batches' worth of
    indices (the trainer keeps the most uncertain ``1/m``; ``training/probe.py``)."""
    pools = pools or {}
    tasks = [next(sampler) for _ in range(tasks_per_step)]
    plan = []
    for ds in tasks:
        for _ in range(accumulate):
            idx = [i for _ in range(pools.get(ds, 1)) for i in streams[ds].next_indices()]
            plan.append((ds, streams[ds].epoch, idx))  # the epoch after the draw is the batch's
    return tasks, plan


class _Items(Dataset):
    """Every training dataset's items keyed by ``(dataset, epoch, index)``.  The epoch travels with
    the key because ``set_epoch`` in the main process never reaches a worker's copy of a dataset
    (the random transforms are seeded by ``(seed, epoch, index)``)."""

    def __init__(self, datasets):
        self.datasets = datasets

    def __getitem__(self, key):
        ds, epoch, index = key
        dataset = self.datasets[ds]
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        return key, dataset[index]


class _Collate:
    """``[(key, item), ...]`` of one micro-batch -> ``((dataset, epoch, indices), batch)``."""

    def __init__(self, collators):
        self.collators = collators

    def __call__(self, keyed):
        ds, epoch, _ = keyed[0][0]
        return (ds, epoch, [k[2] for k, _ in keyed]), self.collators[ds]([item for _, item in keyed])


class _Ahead:
    """The DataLoader's ``batch_sampler``: the keys of every future micro-batch, drawn from copies
    of the sampler and streams taken when iteration starts."""

    def __init__(self, sampler, streams, tasks_per_step, accumulate, pools):
        self.args = sampler, streams, tasks_per_step, accumulate, pools

    def __iter__(self):
        sampler, streams, tasks_per_step, accumulate, pools = self.args
        # Copied now, not when the generator first runs: the trainer's own draw comes next.
        return self._keys(copy.deepcopy(sampler), {k: s.fork() for k, s in streams.items()}, tasks_per_step,
                          accumulate, pools)

    @staticmethod
    def _keys(sampler, streams, tasks_per_step, accumulate, pools):
        while True:
            for ds, epoch, idx in plan_update(sampler, streams, tasks_per_step, accumulate, pools)[1]:
                yield [(ds, epoch, i) for i in idx]


class UpdateLoader:
    """Loads the micro-batches of each update (CPU batches; the trainer moves them).

    Args:
        datasets, collators: ``{dataset: Dataset}``, ``{dataset: BatchCollator}``.
        sampler, streams: the trainer's ``TaskSampler`` and ``{dataset: BatchStream}``; they are
            advanced by exactly what ``next_update`` returns.
        num_workers: 0 loads in the calling process; N > 0 in N DataLoader workers, up to
            ``2 * N`` micro-batches ahead.
        pools: ``{dataset: m}`` candidate pools (``plan_update``).
        seed: seeds the DataLoader's own generator, so starting workers leaves torch's global RNG
            (and with it dropout, and bitwise resume) untouched.
    """

    def __init__(self, datasets, collators, sampler, streams, *, tasks_per_step=1, accumulate=1,
                 num_workers=0, pin_memory=False, seed=0, pools=None):
        if tasks_per_step < 1 or accumulate < 1:
            raise ValueError(f"training.tasks_per_step and training.accumulate must be >= 1, "
                             f"got {tasks_per_step} and {accumulate}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.items, self.collate = _Items(datasets), _Collate(collators)
        self.sampler, self.streams = sampler, streams
        self.tasks_per_step, self.accumulate, self.pools = tasks_per_step, accumulate, dict(pools or {})
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self._it = None

    def next_update(self):
        """``(tasks, [(dataset, epoch, batch), ...])``: the next update's tasks and micro-batches
        (``batch`` as the collator makes it, with its ``"skipped"`` count and ``"indices"``, the
        dataset indices of the rows kept)."""
        if self.num_workers and self._it is None:
            self._start()  # before drawing: the copies start from the not-yet-consumed position
        tasks, plan = plan_update(self.sampler, self.streams, self.tasks_per_step, self.accumulate,
                                  self.pools)
        if not self.num_workers:
            return tasks, [(ds, epoch, self.collate([self.items[(ds, epoch, i)] for i in idx])[1])
                           for ds, epoch, idx in plan]
        out = []
        for ds, epoch, idx in plan:
            key, batch = next(self._it)
            if key != (ds, epoch, idx):
                raise RuntimeError(f"prefetched micro-batch {key} is not the planned {(ds, epoch, idx)}: the "
                                   "sampler or a stream changed without UpdateLoader.reset()")
            out.append((ds, epoch, batch))
        return tasks, out

    def _start(self):
        # Worker processes inherit the tokenizer; HF tokenizers warn (and disable their
        # threads) after a fork unless told up front.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(self.items, batch_sampler=_Ahead(self.sampler, self.streams, self.tasks_per_step,
                                                             self.accumulate, self.pools),
                            collate_fn=self.collate, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.seed))
        self._it = iter(loader)

    def reset(self):
        """Stop the workers and drop what they prefetched: call after loading the sampler or
        streams from a checkpoint, and when training ends.  The next update starts afresh."""
        self._it = None  # the iterator's finaliser shuts its workers down
