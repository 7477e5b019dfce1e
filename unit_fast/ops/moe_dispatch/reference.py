"""Reference (the spec) of ``moe_dispatch``: a sparsely gated mixture of expert FFNs, per token.

The math of a top-k gated mixture of experts layer (Shazeer et al. 2017, "Outrageously Large
Neural Networks", eq. 1; Fedus et al. 2021, Switch Transformer, for the capacity drop), with
each expert a DETR / UniT transformer FFN (``linear2(activation(linear1(x)))``, no dropout):
token ``n`` is sent to the ``k`` experts its router chose and gets the gate-weighted sum of their
outputs.  A slot whose expert index is -1 (padding, or over an expert's capacity) adds nothing.
It is written as a plain loop over tokens and slots: slow and obviously right.
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu")


def activation_fn(name):
    """``F.relu`` or the exact (erf) ``F.gelu``, as ``nn.TransformerEncoderLayer`` takes them."""
    return F.relu if name == "relu" else F.gelu


def moe_dispatch_ref(x, expert_idx, gates, w1, b1, w2, b2, activation="relu", upcast=True):
    """``y[n] = sum_j gates[n, j] * (act(x[n] @ w1[e] + b1[e]) @ w2[e] + b2[e])``, ``e = expert_idx[n, j]``.

    Args:
        x: ``(N, d)`` tokens, float.
        expert_idx: ``(N, k)`` int64, each in ``[0, E)``, or -1 for a dropped slot (adds 0).
        gates: ``(N, k)`` float, the weight of each slot (not renormalised here).
        w1: ``(E, d, f)``, b1: ``(E, f)``, w2: ``(E, f, d)``, b2: ``(E, d)``: expert ``e`` maps a
            token by ``act(t @ w1[e] + b1[e]) @ w2[e] + b2[e]`` (weights stored input-major, so
            ``w1[e]`` is ``nn.Linear(d, f).weight.T``).
        activation: ``"relu"`` or ``"gelu"`` (exact, erf form).
        upcast: compute in float32 (float64 stays float64) and return ``x.dtype``; with False,
            compute in ``x.dtype`` (the "reference in the test dtype" of the error rule).

    Returns:
        ``(N, d)`` in ``x.dtype``.  A token whose slots are all -1 gets zeros; ``N = 0`` gives
        ``(0, d)``.  Differentiable in ``x``, ``gates`` and the four weights (not in
        ``expert_idx``); a weight of an expert no token chose gets a zero gradient.

    Reads every index on the host (one ``int()`` per slot): the spec, not a fast path.
    """
    dtype = x.dtype
    if upcast:
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        x, gates, w1, b1, w2, b2 = (t.to(cdt) for t in (x, gates, w1, b1, w2, b2))
    act = activation_fn(activation)
    N, d = x.shape
    rows = []
    for n in range(N):
        acc = x.new_zeros(d)  # [d]
        for j in range(expert_idx.shape[1]):
            e = int(expert_idx[n, j])  # host read: the spec's loop
            if e < 0:
                continue  # dropped slot: no expert, no contribution
            h = act(x[n] @ w1[e] + b1[e])  # [f]
            acc = acc + gates[n, j] * (h @ w2[e] + b2[e])  # [d]
        rows.append(acc)
    y = torch.stack(rows) if rows else x.new_zeros(0, d)  # [N, d]
    return y.to(dtype)
