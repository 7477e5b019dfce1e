"""Which dataset each training step draws from (MMF's multitask iteration strategies).

``ratios``: MMF's ``RatiosIterationStrategy``: dataset ``d`` with probability ``ratio[d]``;
``proportional``: proportional to dataset size (MMF's default ``size_proportional``);
``temperature``: proportional to ``size ** (1 / T)`` (T = 1 is proportional, large T uniform);
``uniform``: every dataset alike;
``round_robin``: the datasets in turn, in config order (no randomness; uniform in the long run);
``uncertainty``: CA-MTL (Pilault et al. 2021): ``p_t ∝ r_t^(1-λ) · u_t^λ``, ``r_t`` the base
distribution (``training.uncertainty.base``: ratios, proportional or temperature) and ``u_t`` each
dataset's normalised uncertainty on a probe batch, refreshed every ``probe_every`` updates
(``UncertaintySampler``; the trainer probes);
``annealed``: proportional to ``size ** alpha`` with ``alpha`` falling linearly over training from
``training.anneal.start`` to ``training.anneal.end`` (Stickland & Murray 2019, "BERT and PALs":
from proportional towards uniform, so small tasks get more of the late steps).
Every rank draws from the same seeded generator, so all ranks run the same task in a step
(MMF broadcasts rank 0's choice; a shared seed gives the same sequence with no communication).
"""

import numpy as np
import torch

MODES = ("ratios", "proportional", "temperature", "uniform", "round_robin", "annealed", "uncertainty")
BASES = ("ratios", "proportional", "temperature")


def task_probabilities(sizes, mode="proportional", ratios=None, temperature=1.0, alpha=1.0):
    """``{dataset: probability}`` over ``sizes`` (``{dataset: number of samples}``); for
    ``annealed``, the distribution at exponent ``alpha``; for ``round_robin``, its long-run
    (uniform) share."""
    names = list(sizes)
    if mode == "ratios":
        if not ratios:
            raise ValueError("sampling mode 'ratios' needs training.sampling ratios")
        missing = [n for n in names if n not in ratios]
        if missing:
            raise ValueError(f"training.sampling has no ratio for {missing}")
        w = np.array([float(ratios[n]) for n in names])
    elif mode == "proportional":
        w = np.array([float(sizes[n]) for n in names])
    elif mode == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        w = np.array([float(sizes[n]) for n in names]) ** (1.0 / temperature)
    elif mode in ("uniform", "round_robin"):
        w = np.ones(len(names))
    elif mode == "annealed":
        w = np.array([float(sizes[n]) for n in names]) ** float(alpha)
    else:
        raise ValueError(f"training.sampling_mode must be one of {', '.join(MODES)}, got {mode!r}")
    if (w < 0).any() or w.sum() <= 0:
        weights = dict(zip(names, w.tolist(), strict=True))
        raise ValueError(f"sampling weights must be >= 0 with a positive sum, got {weights}")
    return dict(zip(names, (w / w.sum()).tolist(), strict=True))


def uncertainty_probabilities(base, uncertainty, lam):
    """CA-MTL's task sampling mixed with a base distribution: ``p_t ∝ r_t^(1-λ) · u_t^λ``.

    ``base``: ``{dataset: r_t}`` (ratios, proportional or temperature); ``uncertainty``:
    ``{dataset: u_t}`` in [0, 1] (a probe batch's mean ``TaskKind.uncertainty``); ``lam`` in
    [0, 1]: 0 gives ``base`` back, 1 samples by uncertainty alone.  A task whose weight is 0
    everywhere (all ``u_t`` 0 at λ = 1) falls back to ``base``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"training.uncertainty.lambda must be in [0, 1], got {lam!r}")
    names = list(base)
    r = np.array([float(base[n]) for n in names])
    u = np.clip(np.array([float(uncertainty[n]) for n in names]), 0.0, 1.0)
    w = r ** (1.0 - lam) * u ** lam
    if w.sum() <= 0:
        w = r
    return dict(zip(names, (w / w.sum()).tolist(), strict=True))


def _anneal(t):
    """``(start, end)`` of ``training.anneal``; a one-line error naming the key otherwise."""
    a = t.get("anneal") or {}
    start, end = a.get("start"), a.get("end")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v for v in (start, end))
    if not ok or set(a) - {"start", "end"}:
        raise ValueError(f"training.anneal must be {{start: >= 0, end: >= 0}} (the size exponent at the first "
                         f"and the last update), got {a!r}")
    return float(start), float(end)


def base_probabilities(sizes, t):
    """``{dataset: probability}`` of the ``training`` section ``t`` at the first update (MMF's
    fallback: ``ratios`` without ratios is ``proportional``)."""
    mode = t["sampling_mode"]
    if mode == "uncertainty":  # before the first probe: the base distribution
        mode = t["uncertainty"]["base"]
        if mode not in BASES:
            raise ValueError(f"training.uncertainty.base must be one of {', '.join(BASES)}, got {mode!r}")
    if mode == "ratios" and not t["sampling"]:
        mode = "proportional"  # MMF's fallback when a config has no multitasking ratios
    alpha = _anneal(t)[0] if mode == "annealed" else 1.0
    return task_probabilities(sizes, mode, t["sampling"], t["temperature"], alpha)


def build_sampler(sizes, t):
    """The run's ``TaskSampler`` from the ``training`` section ``t`` and ``sizes``."""
    probabilities = base_probabilities(sizes, t)
    mode = t["sampling_mode"]
    schedule = None
    if mode == "annealed":
        start, end = _anneal(t)
        schedule = AnnealedSchedule(sizes, start, end, t["max_updates"] * t["tasks_per_step"])
    if mode == "uncertainty":
        return UncertaintySampler(probabilities, t["uncertainty"]["lambda"], seed=t["seed"])
    return TaskSampler(probabilities, seed=t["seed"], round_robin=mode == "round_robin", schedule=schedule)


def select_most_uncertain(u, b):
    """CA-MTL's example-level selection: the indices ``(b,)`` of the ``b`` most uncertain of the
    candidates ``u (n,)``, in their original order (ties: the earlier candidate)."""
    if not 1 <= b <= u.shape[0]:
        raise ValueError(f"select_most_uncertain: keep b={b} of {u.shape[0]} candidates")
    order = torch.argsort(-u.float(), stable=True)[:b]
    return order.sort().values


class AnnealedSchedule:
    """``p(draw)``: ``size ** alpha`` normalised, ``alpha`` linear from ``start`` (draw 0) to
    ``end`` (draw ``total``, and after)."""

    def __init__(self, sizes, start, end, total):
        self.sizes = np.array([float(v) for v in sizes.values()])
        self.start, self.end, self.total = start, end, max(1, int(total))

    def alpha(self, draw):
        return self.start + (self.end - self.start) * min(1.0, draw / self.total)

    def __call__(self, draw):
        w = self.sizes ** self.alpha(draw)
        return w / w.sum()


class TaskSampler:
    """Seeded sequence of dataset names; ``state_dict`` / ``load_state_dict`` for exact resume.

    ``probabilities``: ``{dataset: p}``; ``round_robin``: the names in turn instead (no
    randomness); ``schedule``: a callable ``draw index -> (N,) probabilities`` that replaces
    ``probabilities`` draw by draw (``AnnealedSchedule``)."""

    def __init__(self, probabilities, seed=0, *, round_robin=False, schedule=None):
        self.names = list(probabilities)
        self.p = np.array([probabilities[n] for n in self.names])
        self.seed = seed
        self.round_robin, self.schedule = round_robin, schedule
        self.draws = 0
        self._rng = np.random.default_rng(seed)

    def probabilities(self):
        """``{dataset: p}`` of the next draw (round robin: the long-run share)."""
        p = self.schedule(self.draws) if self.schedule is not None else self.p
        return dict(zip(self.names, p.tolist(), strict=True))

    def __next__(self):
        draw = self.draws
        self.draws += 1
        if self.round_robin:
            return self.names[draw % len(self.names)]
        p = self.schedule(draw) if self.schedule is not None else self.p
        return self.names[int(self._rng.choice(len(self.names), p=p))]

    def state_dict(self):
        return {"seed": self.seed, "draws": self.draws, "bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state):
        self.seed, self.draws = state["seed"], state["draws"]
        self._rng = np.random.default_rng(self.seed)
        self._rng.bit_generator.state = state["bit_generator"]


class UncertaintySampler(TaskSampler):
    """``TaskSampler`` over ``p_t ∝ r_t^(1-λ) · u_t^λ`` (``uncertainty_probabilities``): ``base``
    (``{dataset: r_t}``) until the first ``update(u)``, then the mix with the latest probe's
    ``u`` (``{dataset: u_t}``).  ``u`` is part of the state, so a resumed run samples as the
    uninterrupted one would."""

    def __init__(self, base, lam, seed=0):
        uncertainty_probabilities(base, dict.fromkeys(base, 1.0), lam)  # checks lam
        super().__init__(base, seed)
        self.base, self.lam, self.u = dict(base), float(lam), None

    def update(self, uncertainty):
        """Mix ``uncertainty`` (``{dataset: u_t in [0, 1]}``, every dataset) into the draws from now on."""
        missing = [n for n in self.names if n not in uncertainty]
        if missing:
            raise ValueError(f"UncertaintySampler.update: no uncertainty for {missing}")
        self.u = {n: float(uncertainty[n]) for n in self.names}
        p = uncertainty_probabilities(self.base, self.u, self.lam)
        self.p = np.array([p[n] for n in self.names])

    def state_dict(self):
        return {**super().state_dict(), "uncertainty": self.u}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("uncertainty") is not None:
            self.update(state["uncertainty"])
        else:
            self.u, self.p = None, np.array([self.base[n] for n in self.names])
