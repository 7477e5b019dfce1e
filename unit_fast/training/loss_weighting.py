"""Multitask loss weighting (``training.loss_weighting``): each micro-batch's loss ``L_t`` (the sum
of its terms, task ``t`` = its dataset) is replaced by a weighted one before the backward.

``fixed``: ``L_t`` itself (MMF; the default, bitwise today's run).
``uncertainty``: Kendall, Gal & Cipolla 2018: ``exp(-s_t) * L_t + s_t``, ``s_t`` a learned
    log-variance per dataset (``Uncertainty``).
``dwa``: Liu, Johns & Davison 2019, Dynamic Weight Average: ``w_t * L_t`` with
    ``w = T * softmax(r / temperature)``, ``r_t`` the ratio of task ``t``'s two latest loss
    windows (``DWA``).
``rlw``: Lin et al. 2021, Random Loss Weighting: ``w_t * L_t`` with ``w = T * softmax(z)``,
    ``z ~ N(0, I_T)`` drawn per update from the run seed and step (``RLW``).

``T`` is the number of trained datasets (sampling probability > 0).  UniT trains one task per
update (``training.tasks_per_step: 1``), whereas the three papers weight all tasks' losses in every
step; each class says how it adapts.  Under DDP every rank uses the same weights (each class says
how).  The trainer calls, per update: ``start(step)``, ``weigh(ds, loss)`` per micro-batch,
``sync_grads()`` (DDP), then ``observe(task_loss)`` once the update is taken.  ``state_dict`` /
``load_state_dict`` make ``--resume`` exact; ``weights()`` is the logged view.
"""

import math

import numpy as np
import torch
import torch.distributed as dist

METHODS = ("fixed", "uncertainty", "dwa", "rlw")


def check_options(t):
    """Validate ``training.loss_weighting`` and its sub-options (``t``: the ``training`` section);
    a bad value is a one-line ValueError naming the key."""
    method = t["loss_weighting"]
    if method not in METHODS:
        raise ValueError(f"training.loss_weighting must be one of {', '.join(METHODS)}, got {method!r}")
    # training.uncertainty also holds sampling_mode uncertainty's keys (checked in training/probe.py).
    for section, keys in (("uncertainty", {"lr"}), ("dwa", {"temperature", "window"})):
        exact = section == "dwa"
        ok = isinstance(t[section], dict) and (set(t[section]) == keys if exact else keys <= set(t[section]))
        if not ok:
            raise ValueError(f"training.{section} must be a mapping with keys {sorted(keys)}, "
                             f"got {t[section]!r}")
    lr = t["uncertainty"]["lr"]
    if lr is not None and (not _is_number(lr) or lr < 0):
        raise ValueError(f"training.uncertainty.lr must be null (training.lr) or a number >= 0, got {lr!r}")
    temperature, window = t["dwa"]["temperature"], t["dwa"]["window"]
    if not _is_number(temperature) or not temperature > 0:
        raise ValueError(f"training.dwa.temperature must be a number > 0, got {temperature!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"training.dwa.window must be an integer >= 1, got {window!r}")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def build_loss_weighting(t, datasets, device, distributed=False):
    """The weighting of ``training`` section ``t`` over ``datasets`` (the trained ones, in config
    order); ``device``: where ``uncertainty``'s parameters live."""
    check_options(t)
    method = t["loss_weighting"]
    if method == "uncertainty":
        lr = t["lr"] if t["uncertainty"]["lr"] is None else t["uncertainty"]["lr"]
        return Uncertainty(datasets, device, lr, distributed)
    if method == "dwa":
        return DWA(datasets, t["dwa"]["temperature"], t["dwa"]["window"], distributed)
    if method == "rlw":
        return RLW(datasets, t["seed"])
    return Fixed(datasets)


class Fixed:
    """Every weight 1: ``weigh`` returns the loss tensor itself (no op, no parameter, no RNG)."""

    method = "fixed"

    def __init__(self, datasets):
        self.datasets = list(datasets)

    def start(self, step):
        """Begin update ``step`` (1-based): fix this update's weights."""

    def weigh(self, ds, loss):
        """The weighted loss of one micro-batch of dataset ``ds`` (``loss``: scalar tensor)."""
        return loss

    def sync_grads(self):
        """Under DDP, after the backward of the update's last micro-batch (every rank calls it)."""

    def observe(self, task_loss):
        """After a taken update: ``{ds: mean loss of ds's micro-batches}`` (scalar tensors, this
        rank's; every rank calls it)."""

    def param_group(self):
        """The optimizer param group of the weighting's own parameters, or None."""
        return None

    def weights(self):
        """``{dataset: weight}`` (floats) of the latest update; may sync the host (log steps only)."""
        return {ds: 1.0 for ds in self.datasets}

    def state_dict(self):
        return {"method": self.method}

    def load_state_dict(self, state):
        if state.get("method") != self.method:
            theirs = state.get("method")
            raise ValueError(f"training.loss_weighting is {self.method} but the checkpoint's is {theirs!r}: "
                             f"resume with training.loss_weighting={theirs}")
        self._load(state)

    def _load(self, state):
        """Restore the method's own state (``fixed`` has none; subclasses extend it)."""


class Uncertainty(Fixed):
    """Kendall, Gal & Cipolla 2018 ("Multi-task learning using uncertainty to weigh losses"):
    ``weigh(t, L) = exp(-s_t) * L + s_t``, ``s_t = log sigma_t^2`` a learned scalar per dataset
    (float32, initialised to 0).

    Variant: the paper's regression form is ``L / (2 sigma^2) + log sigma = 0.5 exp(-s) L + 0.5 s``,
    its classification form ``exp(-s) L + 0.5 s``.  We use twice the regression form (as e.g.
    Liebel & Koerner 2018): the same minimiser in ``s`` (``s* = log L``, weight ``1 / L``) and
    one form for UniT's mix of classification and box-regression terms, and weight exactly 1 at
    ``s = 0``, so step 0 has the ``fixed`` run's gradient instead of half of it.
    ``d/ds_t = 1 - exp(-s_t) * L``.

    One task per update: ``s_t`` gets a gradient only in updates that train ``t``; the others
    have no gradient, so AdamW leaves them and their moments untouched (one parameter per dataset,
    not one vector, for that).  The parameters are their own optimizer group (``param_group``,
    no weight decay; ``training.uncertainty.lr``, else ``training.lr``, under the same schedule),
    outside gradient clipping (``d/ds`` is O(1) and would dominate ``max_grad_l2_norm``).

    DDP: the parameters are not in the DDP-wrapped model, so ``sync_grads`` averages their
    gradients over ranks (one all-reduce): the gradient of the mean over ranks, as DDP gives the
    model; every rank then takes the same optimizer step and the ``s_t`` stay equal."""

    method = "uncertainty"

    def __init__(self, datasets, device, lr, distributed=False):
        super().__init__(datasets)
        self.lr, self.distributed = float(lr), distributed
        self.log_vars = {ds: torch.nn.Parameter(torch.zeros((), device=device)) for ds in self.datasets}
        self._used = None  # exp(-s) of the latest update, (T,)

    def start(self, step):
        with torch.no_grad():
            self._used = torch.exp(-torch.stack([self.log_vars[ds] for ds in self.datasets]))  # (T,)

    def weigh(self, ds, loss):
        s = self.log_vars[ds]
        return torch.exp(-s) * loss + s

    def sync_grads(self):
        if not self.distributed:
            return
        params = [p for p in self.log_vars.values() if p.grad is not None]  # the same on every rank
        if not params:
            return
        grads = torch.stack([p.grad for p in params])  # (n,)
        dist.all_reduce(grads)
        grads /= dist.get_world_size()
        for p, g in zip(params, grads, strict=True):
            p.grad.copy_(g)

    def param_group(self):
        return {"params": list(self.log_vars.values()), "lr": self.lr, "weight_decay": 0.0}

    def weights(self):
        if self._used is None:
            return {ds: 1.0 for ds in self.datasets}
        return dict(zip(self.datasets, self._used.tolist(), strict=True))  # host sync

    def state_dict(self):
        return {"method": self.method,
                "log_vars": {ds: p.detach().clone() for ds, p in self.log_vars.items()}}

    def _load(self, state):
        if set(state["log_vars"]) != set(self.log_vars):
            raise ValueError(f"training.loss_weighting: the checkpoint's uncertainty datasets "
                             f"{sorted(state['log_vars'])} are not this run's {sorted(self.log_vars)}")
        with torch.no_grad():  # in place: the optimizer holds these parameter objects
            for ds, p in self.log_vars.items():
                p.copy_(state["log_vars"][ds])


class DWA(Fixed):
    """Liu, Johns & Davison 2019 ("End-to-end multi-task learning with attention"), Dynamic Weight
    Average: ``w_t = T * exp(r_t / temperature) / sum_j exp(r_j / temperature)`` over the ``T``
    trained datasets, ``r_t = Lbar_t(k-1) / Lbar_t(k-2)``.

    Adaptation: the paper's ``Lbar_t(k)`` is task ``t``'s mean loss over epoch ``k``, every task
    seen every step.  With one task per update, ``Lbar_t(k-1)`` here is the mean of ``t``'s losses
    over its latest ``window`` draws (``training.dwa.window``) and ``Lbar_t(k-2)`` over the
    ``window`` draws before those: sliding windows, counted per task, so a rarely sampled task's
    ratio spans the same number of its own updates as a frequent one's.  A draw is one taken
    update that trained ``t``; its loss is the mean of that update's micro-batches of ``t``
    (NaN-skipped updates are not recorded).  Every weight is 1 until every task has ``2 * window``
    draws.  A window mean that is not > 0 gives ``r_t = 1``.

    DDP: ``observe`` records the task losses averaged over ranks (one all-reduce per update), so
    every rank holds the same history and computes the same weights."""

    method = "dwa"

    def __init__(self, datasets, temperature=2.0, window=20, distributed=False):
        super().__init__(datasets)
        self.temperature, self.window, self.distributed = float(temperature), int(window), distributed
        self.history = {ds: [] for ds in self.datasets}  # the latest <= 2 * window draw losses
        self._used = {ds: 1.0 for ds in self.datasets}

    def current_weights(self):
        """``{dataset: weight}`` from the history now (float64 arithmetic, host only)."""
        w = self.window
        if any(len(h) < 2 * w for h in self.history.values()):
            return {ds: 1.0 for ds in self.datasets}
        ratios = []
        for ds in self.datasets:
            h = self.history[ds]
            recent, before = sum(h[-w:]) / w, sum(h[-2 * w:-w]) / w
            ratios.append(recent / before if recent > 0 and before > 0 else 1.0)
        top = max(r / self.temperature for r in ratios)  # softmax without overflow
        e = [math.exp(r / self.temperature - top) for r in ratios]
        return {ds: len(e) * x / sum(e) for ds, x in zip(self.datasets, e, strict=True)}

    def start(self, step):
        self._used = self.current_weights()

    def weigh(self, ds, loss):
        return loss * self._used[ds]

    def observe(self, task_loss):
        names = [ds for ds in task_loss if ds in self.history]
        if not names:
            return
        values = torch.stack([task_loss[ds].detach().float() for ds in names])  # (n,)
        if self.distributed:  # the same order on every rank: every rank drew the same tasks
            dist.all_reduce(values)
            values /= dist.get_world_size()
        for ds, v in zip(names, values.tolist(), strict=True):  # host sync, after the NaN check's
            h = self.history[ds]
            h.append(v)
            del h[:-2 * self.window]

    def weights(self):
        return dict(self._used)

    def state_dict(self):
        return {"method": self.method, "history": {ds: list(h) for ds, h in self.history.items()},
                "used": dict(self._used)}

    def _load(self, state):
        if set(state["history"]) != set(self.history):
            raise ValueError(f"training.loss_weighting: the checkpoint's dwa datasets "
                             f"{sorted(state['history'])} are not this run's {sorted(self.history)}")
        # A resume with another window keeps the newest draws that fit.
        self.history = {ds: [float(x) for x in state["history"][ds]][-2 * self.window:]
                        for ds in self.datasets}
        self._used = {ds: float(state["used"][ds]) for ds in self.datasets}


class RLW(Fixed):
    """Lin et al. 2021 ("Reasonable effectiveness of random weighting"), Random Loss Weighting:
    ``w = T * softmax(z)``, ``z ~ N(0, I_T)`` over the ``T`` trained datasets, drawn once per
    update from ``numpy.random.default_rng([seed, step])`` (``training.seed``): the same on every
    rank with no communication, and nothing to save (a resume restores the step).

    Adaptation: the paper draws the weights of the tasks in the step, whose softmax over one task
    would always be 1.  Here the whole vector is drawn over all ``T`` datasets and a micro-batch of
    dataset ``t`` is weighted ``w_t``; the factor ``T`` makes ``E[w_t] = 1`` (the ``z`` are
    exchangeable), so on average the run is the ``fixed`` one's scale.  Tasks of one update
    (``tasks_per_step > 1``) share its vector."""

    method = "rlw"

    def __init__(self, datasets, seed):
        super().__init__(datasets)
        self.seed = int(seed) % 2**64  # SeedSequence takes non-negative entries
        self._used = {ds: 1.0 for ds in self.datasets}

    def draw(self, step):
        """``{dataset: weight}`` of update ``step`` (deterministic in ``seed`` and ``step``)."""
        z = np.random.default_rng([self.seed, int(step)]).standard_normal(len(self.datasets))  # (T,)
        e = np.exp(z - z.max())
        return dict(zip(self.datasets, (len(z) * e / e.sum()).tolist(), strict=True))

    def start(self, step):
        self._used = self.draw(step)

    def weigh(self, ds, loss):
        return loss * self._used[ds]

    def weights(self):
        return dict(self._used)

    def state_dict(self):
        return {"method": self.method, "used": dict(self._used)}

    def _load(self, state):
        self._used = {ds: float(state["used"].get(ds, 1.0)) for ds in self.datasets}
