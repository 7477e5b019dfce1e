"""Task sampling by uncertainty (``training.sampling_mode: uncertainty``; CA-MTL, Pilault et al.
2021), fitted to UniT's one task per update:

- task level: every ``training.uncertainty.probe_every`` updates (and before the first) the
  model scores one no-grad probe batch of every dataset; each task kind reports the batch's
  normalised uncertainty in [0, 1] (``TaskKind.uncertainty``); the per-dataset means (summed and
  counted over ranks, so every rank holds the same) go to ``UncertaintySampler.update``;
- example level (``training.uncertainty.pool`` m > 1, text and vision-and-language kinds): the
  loader draws m micro-batches' worth of candidates and the trainer keeps the ``1/m`` most
  uncertain of them (``select_most_uncertain``).  Under DDP each rank selects from its own share
  of the candidates (no gather: the kept examples are the rank's top ``b / world`` of its
  ``m b / world``).

Probe batches come from their own ``BatchStream`` per dataset (seeded apart from the training
streams, so probing never moves what training draws); their state is checkpointed, so a
resumed run probes the same batches.  The probe runs in eval mode (no dropout, no RNG drawn).
"""

import torch
import torch.distributed as dist

from unit_fast.training.batches import to_device
from unit_fast.training.sampling import BASES
from unit_fast.training.streams import BatchStream

PROBE_SEED_OFFSET = 7919  # the probe streams' seed is training.seed + this: apart from the training streams
EXAMPLE_LEVEL_TASKS = ("vl", "glue")  # model task types whose candidates are selected by uncertainty


def _int(x, low):
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def check_options(t):
    """Validate ``training.uncertainty``'s sampling keys (``t``: the ``training`` section) when
    ``sampling_mode`` is ``uncertainty``; a one-line ValueError naming the key."""
    u = t["uncertainty"]
    if not isinstance(u, dict):
        raise ValueError(f"training.uncertainty must be a mapping, got {u!r}")
    if t["sampling_mode"] != "uncertainty":
        if _int(u.get("pool"), 2):
            raise ValueError("training.uncertainty.pool > 1 selects examples by uncertainty: it needs "
                             f"training.sampling_mode=uncertainty, got {t['sampling_mode']}")
        return
    if u.get("base") not in BASES:
        raise ValueError(f"training.uncertainty.base must be one of {', '.join(BASES)}, "
                         f"got {u.get('base')!r}")
    lam = u.get("lambda")
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"training.uncertainty.lambda must be a number in [0, 1], got {lam!r}")
    for key in ("probe_every", "pool", "top_m"):
        if not _int(u.get(key), 1):
            raise ValueError(f"training.uncertainty.{key} must be an integer >= 1, got {u.get(key)!r}")
    size = u.get("probe_batch_size")
    if size is not None and not _int(size, 1):
        raise ValueError(f"training.uncertainty.probe_batch_size must be null or an integer >= 1, "
                         f"got {size!r}")


def example_pools(t, kinds):
    """``{dataset: m}`` for the datasets whose candidates are selected (pool m > 1), else ``{}``;
    ``kinds``: ``{dataset: TaskKind}``."""
    m = t["uncertainty"].get("pool", 1)
    if t["sampling_mode"] != "uncertainty" or m < 2:
        return {}
    return {ds: m for ds, kind in kinds.items() if kind.model_task in EXAMPLE_LEVEL_TASKS}


@torch.no_grad()
def batch_uncertainty(model, batch, top_m=10):
    """``(B,)`` float32: each row's normalised uncertainty under ``model`` (a ``UniT``), scored
    in eval mode without gradients and without the loss (the targets are not passed); the
    model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        sample = {k: v for k, v in batch.items() if k != "targets"}
        out = model(sample)
        ds = batch["dataset_name"]
        kind = model.kinds[ds]
        head = model.heads[kind.model_task][ds]
        options = {"top_m": top_m} if kind.model_task == "detection" else {}
        return kind.uncertainty(out, head, **options).float()
    finally:
        model.train(was_training)


class UncertaintyProbe:
    """The probe of ``training.sampling_mode: uncertainty``: ``due(step)``, ``scores()``.

    Args:
        datasets, collators: ``{dataset: Dataset}`` (the training sets), ``{dataset: BatchCollator}``.
        t: the ``training`` section; rank, world: this process and the number of ranks;
        batch_size: the probe's global batch (``probe_batch_size``, else ``batch_size``).
    """

    def __init__(self, datasets, collators, t, *, rank=0, world=1, aspect_ratio_bins=(1.0,)):
        u = t["uncertainty"]
        self.every, self.top_m = u["probe_every"], u["top_m"]
        size = u["probe_batch_size"] or t["batch_size"]
        self.datasets, self.collators = datasets, collators
        self.distributed = world > 1
        self.streams = {ds: BatchStream(d, ds, size, seed=t["seed"] + PROBE_SEED_OFFSET, rank=rank,
                                        world_size=world, aspect_ratio_bins=aspect_ratio_bins)
                        for ds, d in datasets.items()}
        self.last = None  # {dataset: u} of the latest probe

    def due(self, step):
        """Whether the update after ``step`` updates starts with a probe."""
        return step % self.every == 0

    def _batch(self, ds):
        stream, dataset = self.streams[ds], self.datasets[ds]
        idx = stream.next_indices()
        if hasattr(dataset, "set_epoch"):  # the item transforms are seeded by (seed, epoch, index)
            dataset.set_epoch(stream.epoch)
        batch = self.collators[ds]([dataset[i] for i in idx])
        batch.pop("skipped", None)  # a probe's unreadable images are not training's skips
        return batch

    def scores(self, model, device):
        """``{dataset: mean uncertainty}`` of one probe batch per dataset, averaged over every
        rank's examples (one all-reduce under DDP: every rank must call it).  A dataset whose
        probe kept no example (every image unreadable) keeps its previous value, else 1."""
        names = list(self.streams)
        sums = torch.zeros(2, len(names), dtype=torch.float64, device=device)  # (sum of u, count)
        for j, ds in enumerate(names):
            batch = self._batch(ds)
            if not batch["indices"]:
                continue
            u = batch_uncertainty(model, to_device(batch, device), self.top_m)
            sums[0, j], sums[1, j] = u.double().sum(), u.numel()
        if self.distributed:
            dist.all_reduce(sums)
        sums = sums.cpu()  # host sync: once per probe
        previous = self.last or {}
        self.last = {ds: (float(sums[0, j] / sums[1, j]) if sums[1, j] > 0 else previous.get(ds, 1.0))
                     for j, ds in enumerate(names)}
        return dict(self.last)

    def state_dict(self):
        return {"streams": {ds: s.state_dict() for ds, s in self.streams.items()}, "last": self.last}

    def load_state_dict(self, state):
        for ds, s in state["streams"].items():
            self.streams[ds].load_state_dict(s)
        self.last = state["last"]
