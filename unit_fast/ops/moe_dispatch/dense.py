"""``moe_dispatch`` as a traceable graph: every expert on every token, then each slot gathers its own.

What ``moe_dispatch`` records when it is traced on the reference path (``torch.export``,
``torch.compile``; ``unit_fast.export_graph`` traces that way).  The spec (``reference.py``)
reads every expert index on the host to loop over tokens and slots; a graph can hold neither
the host read nor a loop whose length is the batch's.  Here the same formula has fixed shapes
and no data-dependent branch:

    h = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]   for every expert e      (E, N, d)
    y[n] = sum_j gates[n, j] * [expert_idx[n, j] >= 0] * h[expert_idx[n, j], n]

It costs ``E`` times the expert FLOPs of a sparse dispatch (and an ``(E, N, f)`` hidden layer):
meant for exported inference graphs, not for training speed (that is the Triton and torch
backends).  Equal to the reference up to summation order.
"""

import torch

from unit_fast.ops.moe_dispatch.reference import activation_fn


def moe_dispatch_dense(x, expert_idx, gates, w1, b1, w2, b2, activation="relu"):
    """``(N, d)`` in ``x.dtype``, as ``moe_dispatch_ref`` (its arguments; no ``upcast``: computes
    in float32, float64 stays float64).  Index values are not checked (no host read): a traced
    graph gets them from its own router."""
    dtype = x.dtype
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    x, gates, w1, b1, w2, b2 = (t.to(cdt) for t in (x, gates, w1, b1, w2, b2))
    hidden = activation_fn(activation)(torch.einsum("nd,edf->enf", x, w1) + b1[:, None])  # (E, N, f)
    out = torch.einsum("enf,efd->end", hidden, w2) + b2[:, None]  # (E, N, d)
    N, k = expert_idx.shape
    rows = torch.arange(N, device=x.device)[:, None].expand(N, k)  # (N, k)
    picked = out[expert_idx.clamp_min(0), rows]  # (N, k, d): slot j's expert output for token n
    weight = gates * (expert_idx >= 0)  # (N, k): a dropped slot (-1) adds nothing
    return (weight[..., None] * picked).sum(1).to(dtype)  # (N, d)
