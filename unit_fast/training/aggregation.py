"""Gradient aggregation across the tasks of one update (``training.aggregator``, with
``training.tasks_per_step > 1``): the shared parameters get one vector made from the per-task
gradients by a multi-objective aggregator instead of their mean.

The aggregators are TorchJD's (Quinton & Rey 2024, https://github.com/TorchJD/torchjd), an
optional extra: ``pip install 'unit_fast[mtl]'``.

  ``mean``    the mean of the task gradients: what the trainer does without an aggregator;
  ``upgrad``  UPGrad (Quinton & Rey 2024): each gradient projected onto the dual cone of all;
  ``mgda``    MGDA (Désidéri 2012; Sener & Koltun 2018): the min-norm point of their convex hull;
  ``pcgrad``  PCGrad (Yu et al. 2020): conflicting components projected away;
  ``cagrad``  CAGrad (Liu et al. 2021), ``training.cagrad_c`` (default 0.5).

Scale: TorchJD's PCGrad returns a sum over the rows; it is divided by the number of tasks here,
so that with one task repeated every aggregator but CAGrad gives that task's gradient back, as the
mean does (CAGrad gives ``(1 + c)`` times it, as the method defines).
"""

import torch

AGGREGATORS = ("none", "mean", "upgrad", "mgda", "pcgrad", "cagrad")
EXTRA = "pip install 'unit_fast[mtl]'"


def _torchjd():
    try:
        import torchjd.aggregation as agg
    except ImportError:
        raise ImportError(f"training.aggregator needs TorchJD, an optional extra: {EXTRA}") from None
    return agg


class Aggregator:
    """``aggregate(J)``: ``(P,)`` from the ``(T, P)`` matrix of per-task gradients (rows: tasks)."""

    def __init__(self, name, cagrad_c=0.5):
        if name not in AGGREGATORS or name == "none":
            raise ValueError(f"training.aggregator must be one of {', '.join(AGGREGATORS)}, got {name!r}")
        self.name = name
        self._scale_by_rows = name == "pcgrad"
        if name == "mean":
            self._fn = lambda J: J.mean(0)
            return
        agg = _torchjd()
        try:
            self._fn = {"upgrad": agg.UPGrad, "mgda": agg.MGDA, "pcgrad": agg.PCGrad,
                        "cagrad": lambda: agg.CAGrad(c=float(cagrad_c))}[name]()
        except ImportError as exc:  # an aggregator's own solver (quadprog, cvxpy) is missing
            raise ImportError(f"training.aggregator={name}: {exc} ({EXTRA} installs it)") from None

    def aggregate(self, J):
        """``J``: ``(T, P)`` float tensor; returns ``(P,)`` in ``J``'s dtype."""
        if J.dim() != 2 or J.shape[0] < 1:
            raise ValueError(f"Aggregator.aggregate: J must be (tasks, parameters), got {tuple(J.shape)}")
        if J.shape[0] == 1:
            return J[0].clone()  # one task: nothing to aggregate (and no solver call)
        out = self._fn(J.float()).to(J.dtype)
        return out / J.shape[0] if self._scale_by_rows else out


def build_aggregator(t):
    """The ``training`` section's aggregator, or None (``training.aggregator: none``)."""
    name = t.get("aggregator", "none")
    if name in (None, "none"):
        return None
    if t["tasks_per_step"] < 2:
        raise ValueError(f"training.aggregator={name} aggregates the gradients of the tasks of one update: "
                         f"it needs training.tasks_per_step >= 2, got {t['tasks_per_step']}")
    return Aggregator(name, t.get("cagrad_c", 0.5))


@torch.no_grad()
def flat_grads(params):
    """``(P,)``: the ``.grad`` of ``params`` flattened (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


@torch.no_grad()
def set_flat_grads(params, vector):
    """Write ``vector`` ``(P,)`` back into the ``.grad`` of ``params`` (``flat_grads``' layout)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = vector[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n
