"""Images the collator skipped (unreadable files with ``data.on_error: skip``), counted per dataset:
in total and per epoch of that dataset's stream, for ``log.jsonl`` and ``final_metrics.json``."""


class SkippedImages:
    """Counts of skipped training images per dataset.

    ``add(dataset, epoch, n)`` is called for every consumed micro-batch with the batch's stream
    epoch; when a dataset's epoch moves on, the finished epoch is returned as
    ``(dataset, epoch, skipped)`` so the trainer can log it.  Counts are this process's; under DDP
    the trainer sums them over ranks (every rank crosses an epoch at the same micro-batch).
    """

    def __init__(self, datasets):
        self.total = dict.fromkeys(datasets, 0)
        self.epoch = dict.fromkeys(datasets, 0)
        self.in_epoch = dict.fromkeys(datasets, 0)

    def add(self, dataset, epoch, n):
        """Count ``n`` skipped images of a ``dataset`` batch from ``epoch``; returns the finished
        ``(dataset, epoch, skipped)`` when this batch opens a new epoch, else None."""
        finished = None
        if epoch != self.epoch[dataset]:
            finished = (dataset, self.epoch[dataset], self.in_epoch[dataset])
            self.epoch[dataset], self.in_epoch[dataset] = epoch, 0
        self.total[dataset] += int(n)
        self.in_epoch[dataset] += int(n)
        return finished

    def state_dict(self):
        return {"total": dict(self.total), "epoch": dict(self.epoch), "in_epoch": dict(self.in_epoch)}

    def load_state_dict(self, state):
        for name in ("total", "epoch", "in_epoch"):
            getattr(self, name).update(state[name])
