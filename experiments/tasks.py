"""Synthetic tasks over one shared input distribution, labelled by random teacher networks.

Inputs ``x (N, S, F)`` float32 ~ N(0, 1): ``S`` tokens of ``F`` features, the same distribution
for every task.  A ``Teacher`` labels them with a one-hidden-layer ReLU network on the flattened
input, ``h = relu(flat(x) @ U + b)`` ``(N, H)``, ``logits = h @ V`` ``(N, C)``:

- classification: ``y = argmax(logits - offset)`` with per-class offsets fitted so the classes
  are balanced (chance = 1 / C);
- regression: ``y = scale * standardised(logits[:, 0])`` (``scale`` sets the loss's size).

Tasks that share ``U, b`` (one hidden layer, their own ``V``) need the same features, so a
small task can borrow them from a large one; tasks with their own teacher compete for the
model's capacity.  ``negate=True`` labels ``-x`` instead of ``x``: because the teacher is not an
odd function (ReLU with a bias), that labelling is not a relabelling of the first one that a
linear head could undo, so the two tasks conflict on the same inputs.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class Task:
    """One task's data.  ``y_*``: ``(N,)`` int64 labels (classification) or float32 targets
    (regression); ``num_outputs``: classes (``loss == "ce"``) or 1 (``loss == "mse"``);
    ``chance``: the val metric of the best constant prediction (majority accuracy, or R^2 = 0)."""

    name: str
    x_train: torch.Tensor  # (N_train, S, F)
    y_train: torch.Tensor  # (N_train,)
    x_val: torch.Tensor  # (N_val, S, F)
    y_val: torch.Tensor  # (N_val,), always clean
    num_outputs: int
    loss: str  # "ce" | "mse"
    chance: float
    noise: float = 0.0  # share of training labels replaced by another class

    @property
    def size(self):
        return self.x_train.shape[0]


def inputs(n, seq_len, features, gen):
    """``(n, seq_len, features)`` float32 standard normal inputs from ``gen``."""
    return torch.randn(n, seq_len, features, generator=gen)


class Teacher:
    """``h = relu(flat(x) @ U + b)``, ``logits = h @ V``; pass ``hidden_from`` to share its ``U, b``."""

    def __init__(self, d_in, hidden, num_outputs, gen, hidden_from=None):
        if hidden_from is None:
            self.U = torch.randn(d_in, hidden, generator=gen) / math.sqrt(d_in)  # (D, H)
            self.b = 0.5 * torch.randn(hidden, generator=gen)  # (H,): not odd, see module docstring
        else:
            self.U, self.b = hidden_from.U, hidden_from.b
        self.V = torch.randn(self.U.shape[1], num_outputs, generator=gen)  # (H, C)
        self.offset = torch.zeros(num_outputs)

    def logits(self, x):
        """``x (N, S, F)`` -> ``(N, C)``."""
        h = torch.relu(x.flatten(1) @ self.U + self.b)  # (N, H)
        return h @ self.V

    def balance(self, x, iters=200):
        """Fit the class offsets on ``x`` so that every class is about 1 / C of the argmaxes."""
        z = self.logits(x)  # (N, C)
        c = z.shape[1]
        step = z.std().item()
        for i in range(iters):  # a shrinking step: the offsets of a too-frequent class rise
            freq = torch.bincount((z - self.offset).argmax(1), minlength=c).float() / z.shape[0]
            self.offset += step * (freq - 1.0 / c) / (1 + i / 20)

    def classify(self, x):
        return (self.logits(x) - self.offset).argmax(1)  # (N,)


def add_label_noise(y, num_classes, rate, gen):
    """``y (N,)`` with a ``rate`` share of labels replaced by a uniformly drawn *other* class."""
    flip = torch.rand(y.shape[0], generator=gen) < rate
    shift = torch.randint(1, num_classes, y.shape, generator=gen)
    return torch.where(flip, (y + shift) % num_classes, y)


def classification_task(name, teacher, x_train, x_val, num_classes, noise=0.0, negate=False, gen=None):
    """A ``Task`` labelled by ``teacher.classify`` (of ``-x`` if ``negate``); ``noise`` on train only."""
    sign = -1.0 if negate else 1.0
    y_train, y_val = teacher.classify(sign * x_train), teacher.classify(sign * x_val)
    if noise > 0:
        y_train = add_label_noise(y_train, num_classes, noise, gen)
    chance = torch.bincount(y_val, minlength=num_classes).max().item() / y_val.shape[0]
    return Task(name, x_train, y_train, x_val, y_val, num_classes, "ce", chance, noise)


def regression_task(name, teacher, x_train, x_val, scale, reference):
    """A ``Task`` with targets ``scale * (s - mean) / std``, ``s = teacher.logits(x)[:, 0]``, the
    moments taken on ``reference`` inputs."""
    s_ref = teacher.logits(reference)[:, 0]
    mu, sd = s_ref.mean(), s_ref.std()

    def target(x):
        return scale * (teacher.logits(x)[:, 0] - mu) / sd  # (N,)

    return Task(name, x_train, target(x_train), x_val, target(x_val), 1, "mse", 0.0)
