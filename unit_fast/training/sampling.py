"""Which dataset each training step draws from (MMF's multitask iteration strategies).

``ratios``: MMF's ``RatiosIterationStrategy``: dataset ``d`` with probability ``ratio[d]``;
``proportional``: proportional to dataset size (MMF's default ``size_proportional``);
``temperature``: proportional to ``size ** (1 / T)`` (T = 1 is proportional, large T uniform).
Every rank draws from the same seeded generator, so all ranks run the same task in a step
(MMF broadcasts rank 0's choice; a shared seed gives the same sequence with no communication).
"""

import numpy as np

MODES = ("ratios", "proportional", "temperature")


def task_probabilities(sizes, mode="proportional", ratios=None, temperature=1.0):
    """``{dataset: probability}`` over ``sizes`` (``{dataset: number of samples}``)."""
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
    else:
        raise ValueError(f"unknown sampling mode {mode!r}; expected one of {MODES}")
    if (w < 0).any() or w.sum() <= 0:
        weights = dict(zip(names, w.tolist(), strict=True))
        raise ValueError(f"sampling weights must be >= 0 with a positive sum, got {weights}")
    return dict(zip(names, (w / w.sum()).tolist(), strict=True))


class TaskSampler:
    """Seeded sequence of dataset names; ``state_dict`` / ``load_state_dict`` for exact resume."""

    def __init__(self, probabilities, seed=0):
        self.names = list(probabilities)
        self.p = np.array([probabilities[n] for n in self.names])
        self.seed = seed
        self.draws = 0
        self._rng = np.random.default_rng(seed)

    def __next__(self):
        self.draws += 1
        return self.names[int(self._rng.choice(len(self.names), p=self.p))]

    def state_dict(self):
        return {"seed": self.seed, "draws": self.draws, "bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state):
        self.seed, self.draws = state["seed"], state["draws"]
        self._rng = np.random.default_rng(self.seed)
        self._rng.bit_generator.state = state["bit_generator"]
