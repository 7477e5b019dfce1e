"""The ``torch`` backend of ``moe_dispatch``: sorted slots, one matmul per expert segment.

The ``N * k`` (token, slot) pairs are sorted by expert once (a stable ``argsort``; dropped slots,
index -1, sort last), so each expert's rows are one contiguous segment of the sorted order.
Each expert then runs start to end as two ``addmm`` calls (bias fused) on its segment, the
gates scale its rows, and one ``index_add_`` adds every kept slot into its token.  The backward
is written by hand in the same order: per expert ``dA = dY W2^T``, ``dW2 = A^T (g dY)``,
``dW1 = X^T dH``, ``dX = dH W1^T``; ``db2`` and the gates' ``<dY, b2>`` term are one batched
op each over all rows, the gates' ``<dA, A>`` term is per expert.

Two wrappers run this same math (``_forward`` / ``_backward``):
  ``MoEDispatchTorch`` (``torch.autograd.Function``), in eager mode: it keeps each expert's
      hidden activations as their own tensors and the routing on ``ctx``, so the backward does
      not sort again.  Keeping them as one ``(N * k, f)`` tensor instead costs a fresh allocation
      per call: at the UniT shape (32 MiB each for ``h`` and ``a``) glibc maps new pages every
      time, measured 13 ms of page faults per 32 MiB here, while per-expert blocks are reused;
  ``unit_fast::moe_dispatch_torch`` (``op.py``), under ``torch.compile`` (Dynamo must not trace
      the host sync below): the same math writing the hidden layer into one ``(N * k, f)``
      output.

Why not ``torch._grouped_mm``: it is private, absent from the torch floor (2.6), refuses float64
(gradcheck), and on CPU (torch 2.14) it was no faster than these per-segment ``addmm`` calls.

Host sync: the segment sizes are read on the host (``counts.tolist()``) to slice the rows; free
on CPU, one sync per call on CUDA (where the Triton backend needs none).  ``index_add_`` is
deterministic on CPU; on CUDA it adds with atomics (float order may vary run to run).
16-bit inputs: the matmuls run in the input dtype (torch accumulates them in float32), the gate
products, the sum over slots and the gates' gradient in float32.
"""

import torch

from unit_fast.ops._autograd import double_backward_raises


def sort_slots(expert_idx, num_experts):
    """Slots in expert order, with no host sync.

    Args:
        expert_idx: ``(N, k)`` int64 in ``[0, E)`` or -1; slot ``s = n * k + j``.

    Returns:
        ``order`` ``(N * k,)`` int64: the slots sorted by expert, stably (ties keep slot order,
        so the result is deterministic), dropped slots last; ``counts`` ``(E + 1,)`` int64: slots
        per expert, the last entry the dropped ones.
    """
    flat = expert_idx.reshape(-1)  # [M], M = N * k
    key = torch.where(flat < 0, num_experts, flat)  # [M]: -1 -> E, sorted after every expert
    order = torch.argsort(key, stable=True)  # [M]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))  # [E + 1]; bincount would sync on CUDA
    return order, counts


def _segments(sizes):
    """``(e, start, end)`` of each expert with rows, from the host list of segment sizes."""
    out, start = [], 0
    for e, size in enumerate(sizes):
        if size:
            out.append((e, start, start + size))
        start += size
    return out


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _routing(expert_idx, num_experts):
    """``(slots (m,), tok (m,), segments, m)``: the kept slots in expert order, their tokens."""
    k = expert_idx.shape[1]
    order, counts = sort_slots(expert_idx, num_experts)
    sizes = counts.tolist()  # host sync on CUDA: the segment sizes slice the buffers below
    m = order.numel() - sizes[num_experts]
    slots = order[:m]  # [m]
    return slots, torch.div(slots, k, rounding_mode="floor"), _segments(sizes[:num_experts]), m


def _forward(x, gates, w1, b1, w2, b2, activation, routing, h_out=None, a_out=None):
    """``(y (N, d) x.dtype, hs, as_)``: per expert segment (in ``routing[2]``'s order) its
    ``h`` (relu's output, or gelu's pre-activation) and, for gelu, ``a = gelu(h)``.  With
    ``h_out`` / ``a_out`` given (``(N * k, f)``, sorted rows), each segment is written into
    its rows of them instead of into its own tensor."""
    slots, tok, segments, m = routing
    N, d = x.shape
    acc = _acc_dtype(x.dtype)
    g = gates.reshape(-1).index_select(0, slots).to(acc)  # [m]
    xs = x.index_select(0, tok)  # [m, d]: the kept slots' tokens, expert-sorted
    ys = torch.empty(m, d, dtype=x.dtype, device=x.device)  # [m, d]: expert outputs, sorted
    hs, as_ = [], []
    for e, s, t in segments:
        # One expert start to end: its [n_e, f] temporaries stay in cache.
        he = torch.addmm(b1[e], xs[s:t], w1[e], **({} if h_out is None else {"out": h_out[s:t]}))
        if activation == "relu":
            ae = he.relu_()  # [n_e, f]: h keeps relu's output (> 0 exactly where it passed)
        else:
            ae = torch.ops.aten.gelu(he) if a_out is None else torch.ops.aten.gelu.out(he, out=a_out[s:t])
            as_.append(ae)
        hs.append(he)
        torch.addmm(b2[e], ae, w2[e], out=ys[s:t])  # [n_e, d]
    ys = ys.to(acc).mul_(g[:, None])  # [m, d]: gated, in the accumulation dtype
    y = torch.zeros(N, d, dtype=acc, device=x.device).index_add_(0, tok, ys)  # [N, d]
    return y.to(x.dtype), hs, as_


def _backward(grad_y, x, expert_idx, gates, w1, b1, w2, b2, activation, routing, hs, as_):
    """``(dx, dgates, dw1, db1, dw2, db2)``, each in its input's dtype and shape, from the
    per-segment ``hs`` / ``as_`` of ``_forward``."""
    slots, tok, segments, m = routing
    N, d = x.shape
    k = expert_idx.shape[1]
    E = w1.shape[0]
    acc = _acc_dtype(x.dtype)
    grad_y = grad_y.to(x.dtype)
    g = gates.reshape(-1).index_select(0, slots)  # [m]
    experts = expert_idx.reshape(-1).index_select(0, slots)  # [m]: each sorted row's expert
    dys = grad_y.index_select(0, tok)  # [m, d]
    xs = x.index_select(0, tok)  # [m, d]: gathered again rather than kept by the forward
    gys = dys * g[:, None]  # [m, d]: the gated output gradient
    # d y_slot / d gate = A W2 + b2, so dgate = <dY W2^T, A> + <dY, b2>; the second term here
    dg = torch.linalg.vecdot(dys.to(acc), b2.index_select(0, experts).to(acc))  # [m]
    db2 = torch.zeros(E, d, dtype=acc, device=x.device).index_add_(0, experts, gys.to(acc))  # [E, d]
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    db1 = torch.empty_like(b1)
    dxs = torch.empty(m, d, dtype=x.dtype, device=x.device)  # [m, d]: each slot's dx, sorted
    done = [False] * E
    for i, (e, s, t) in enumerate(segments):  # one expert start to end (see the forward)
        done[e] = True
        he = hs[i]  # [n_e, f]
        ae = he if activation == "relu" else as_[i]  # [n_e, f]
        dae = torch.mm(dys[s:t], w2[e].t())  # [n_e, f]: dY W2^T, before the gate
        dg[s:t] += torch.linalg.vecdot(dae.to(acc), ae.to(acc))
        dhe = dae.mul_(g[s:t, None])  # [n_e, f]: dA
        if activation == "relu":
            dhe = dhe.masked_fill_(he <= 0, 0.0)  # h is relu's output: > 0 exactly where it passed
        else:
            dhe = torch.ops.aten.gelu_backward(dhe, he)  # exact (erf) gelu'
        torch.mm(ae.t(), gys[s:t], out=dw2[e])
        torch.mm(xs[s:t].t(), dhe, out=dw1[e])
        torch.sum(dhe, 0, out=db1[e])
        torch.mm(dhe, w1[e].t(), out=dxs[s:t])
    for e in range(E):
        if not done[e]:  # no rows: zero gradients
            dw1[e].zero_(), dw2[e].zero_(), db1[e].zero_()
    dx = torch.zeros(N, d, dtype=acc, device=x.device).index_add_(0, tok, dxs.to(acc))  # [N, d]
    dgates = torch.zeros(N * k, dtype=acc, device=x.device).index_copy_(0, slots, dg)  # [M]
    return (dx.to(x.dtype), dgates.view(N, k).to(gates.dtype), dw1, db1, dw2, db2.to(b2.dtype))


class _DoubleBackwardRaises(torch.autograd.Function):
    """Identity on the gradients of ``MoEDispatchTorch`` when they are themselves differentiated
    (``create_graph=True``): differentiating them raises, as the registered ops' backward does."""

    @staticmethod
    def forward(ctx, x, gates, w1, b1, w2, b2, *grads):  # the inputs: anchors, so outputs need grad
        return tuple(g.clone() for g in grads)  # clones: outputs must not alias inputs

    backward = staticmethod(double_backward_raises("moe_dispatch_torch"))


class MoEDispatchTorch(torch.autograd.Function):
    """The eager wrapper (see the module docstring): ``apply(x, expert_idx, gates, w1, b1, w2, b2,
    activation) -> y``.  A second derivative raises, as the registered ops' does."""

    @staticmethod
    def forward(ctx, x, expert_idx, gates, w1, b1, w2, b2, activation):
        routing = _routing(expert_idx, w1.shape[0])
        y, hs, as_ = _forward(x, gates, w1, b1, w2, b2, activation, routing)
        ctx.save_for_backward(x, expert_idx, gates, w1, b1, w2, b2)
        ctx.hidden = (activation, routing, hs, as_)  # intermediates, not inputs: kept on ctx
        return y

    @staticmethod
    def backward(ctx, grad_y):
        activation, routing, hs, as_ = ctx.hidden
        saved = ctx.saved_tensors
        with torch.no_grad():
            grads = _backward(grad_y, *saved, activation, routing, hs, as_)
        if torch.is_grad_enabled():  # create_graph=True: make a second derivative raise
            x, _, gates, w1, b1, w2, b2 = saved
            grads = _DoubleBackwardRaises.apply(x, gates, w1, b1, w2, b2, *grads)
        dx, dgates, dw1, db1, dw2, db2 = grads
        return dx, None, dgates, dw1, db1, dw2, db2, None


def moe_dispatch_fwd_torch(x, expert_idx, gates, w1, b1, w2, b2, activation):
    """The body of ``unit_fast::moe_dispatch_torch``: ``(y (N, d), h (N * k, f), a (N * k, f)
    or (0, f))``, all ``x.dtype``.

    ``h`` and ``a`` hold the hidden layer in sorted-slot order (``sort_slots``): row ``p < m`` is
    the slot ``order[p]``'s ``relu(x w1 + b1)`` (relu; ``a`` is then empty) or its
    pre-activation ``x w1 + b1`` with ``a = gelu(h)`` (gelu: kept, as autograd would keep it;
    recomputing gelu on CPU costs about what a small matmul does).  Dropped slots' rows are 0.
    """
    routing = _routing(expert_idx, w1.shape[0])
    m, f = routing[3], w1.shape[2]
    h = x.new_empty(expert_idx.numel(), f)  # [M, f]
    a = x.new_empty(expert_idx.numel() if activation == "gelu" else 0, f)  # [M, f] or [0, f]
    h[m:].zero_()
    a[m:].zero_()
    y, _, _ = _forward(x, gates, w1, b1, w2, b2, activation, routing, h_out=h, a_out=a)
    return y, h, a


def moe_dispatch_bwd_torch(grad_y, x, expert_idx, gates, w1, b1, w2, b2, h, a, activation):
    """The body of ``unit_fast::_moe_dispatch_torch_backward``: ``(dx, dgates, dw1, db1, dw2,
    db2)`` given ``grad_y`` ``(N, d)`` and ``h``, ``a`` as ``moe_dispatch_fwd_torch`` returned."""
    routing = _routing(expert_idx, w1.shape[0])
    segments = routing[2]
    hs = [h[s:t] for _, s, t in segments]
    as_ = [a[s:t] for _, s, t in segments] if activation == "gelu" else []
    return _backward(grad_y, x, expert_idx, gates, w1, b1, w2, b2, activation, routing, hs, as_)
