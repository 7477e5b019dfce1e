"""Registration of ``unit_fast::moe_dispatch`` (+ ``unit_fast::_moe_dispatch_backward``), of
``unit_fast::moe_dispatch_torch`` (+ ``unit_fast::_moe_dispatch_torch_backward``), and dispatch.

The first pair are ``torch.library.custom_op``s whose bodies launch the Triton kernels of
``triton.py`` (house style section 4); the second pair run the torch composition of
``grouped.py``.  The torch backend is an op of its own, as ``box_loss_cpp`` is, because it reads
the segment sizes on the host: opaque, ``torch.compile(fullgraph=True)`` traces it without a
break.  In eager mode ``moe_dispatch`` runs the same math through ``grouped.MoEDispatchTorch``
instead (an ``autograd.Function``: less overhead per call, and per-expert saved activations
rather than one freshly allocated ``(N * k, f)`` buffer; ``grouped.py`` has the numbers).

Both pairs get fakes and the same autograd wiring.  The forward ops also return the hidden layer
``h`` ``(N * k, f)`` (sorted-slot order) that their backward reads (the torch op also gelu's
output ``a``); these carry no gradient.  Triton is imported at the first launch, not here: the
package imports without it.
"""

import torch
from torch import Tensor

from unit_fast import _backend
from unit_fast.ops._autograd import double_backward_raises
from unit_fast.ops.moe_dispatch import grouped
from unit_fast.ops.moe_dispatch.dense import moe_dispatch_dense
from unit_fast.ops.moe_dispatch.reference import ACTIVATIONS, moe_dispatch_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_inputs(x, expert_idx, gates, w1, b1, w2, b2, activation):
    """Shapes, dtypes, devices, activation: metadata only (no host sync).  One-line
    ``ValueError`` naming the argument, the same on every backend."""
    for name, t in (("x", x), ("expert_idx", expert_idx), ("gates", gates), ("w1", w1), ("b1", b1),
                    ("w2", w2), ("b2", b2)):
        if not isinstance(t, Tensor):
            raise ValueError(f"moe_dispatch: {name} must be a Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"moe_dispatch: x must be (N, d), got shape {tuple(x.shape)}")
    N, d = x.shape
    if w1.dim() != 3 or w1.shape[1] != d or w1.shape[0] < 1 or w1.shape[2] < 1 or d < 1:
        raise ValueError(f"moe_dispatch: w1 must be (E, d, f) = (E, {d}, f) with E, d, f >= 1, "
                         f"got {tuple(w1.shape)}")
    E, _, f = w1.shape
    want = {"b1": (E, f), "w2": (E, f, d), "b2": (E, d)}
    for name, t in (("b1", b1), ("w2", w2), ("b2", b2)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"moe_dispatch: {name} must be {want[name]} (E, d, f from x and w1), "
                             f"got {tuple(t.shape)}")
    if expert_idx.dim() != 2 or expert_idx.shape[0] != N or expert_idx.shape[1] < 1:
        raise ValueError(f"moe_dispatch: expert_idx must be (N, k) = ({N}, k) with k >= 1, "
                         f"got {tuple(expert_idx.shape)}")
    if expert_idx.dtype != torch.int64:
        raise ValueError(f"moe_dispatch: expert_idx must be int64, got {expert_idx.dtype}")
    if tuple(gates.shape) != tuple(expert_idx.shape):
        raise ValueError(f"moe_dispatch: gates must be (N, k) = {tuple(expert_idx.shape)} like expert_idx, "
                         f"got {tuple(gates.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"moe_dispatch: x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    for name, t in (("gates", gates), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.dtype != x.dtype:
            raise ValueError(f"moe_dispatch: {name} is {t.dtype} but x is {x.dtype} (one dtype for all)")
    for name, t in (("expert_idx", expert_idx), ("gates", gates), ("w1", w1), ("b1", b1), ("w2", w2),
                    ("b2", b2)):
        if t.device != x.device:
            raise ValueError(f"moe_dispatch: {name} is on {t.device} but x is on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_dispatch: activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_expert_idx_values(expert_idx, num_experts):
    """``ValueError`` unless every index is in ``[-1, E)``.  Reads one flag on the host: a sync
    on CUDA.  Run inside the ops' bodies, so it also guards compiled graphs (fakes skip it)."""
    if not expert_idx.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(expert_idx))  # host sync
    if lo < -1 or hi >= num_experts:
        raise ValueError(f"moe_dispatch: expert_idx must be in [0, {num_experts}) or -1, "
                         f"got {lo if lo < -1 else hi}")


# ------------------------------------------------------------------ Triton ops


@torch.library.custom_op("unit_fast::moe_dispatch", mutates_args=())
def _moe_dispatch_op(x: Tensor, expert_idx: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                     b2: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """``(y (N, d), h (N * k, f))``; see ``moe_dispatch`` and ``triton.moe_dispatch_fwd_triton``."""
    from unit_fast.ops.moe_dispatch.triton import moe_dispatch_fwd_triton

    check_expert_idx_values(expert_idx, w1.shape[0])
    return moe_dispatch_fwd_triton(x, expert_idx, gates, w1, b1, w2, b2, activation)


@torch.library.custom_op("unit_fast::_moe_dispatch_backward", mutates_args=())
def _moe_dispatch_backward_op(grad_y: Tensor, x: Tensor, expert_idx: Tensor, gates: Tensor, w1: Tensor,
                              b1: Tensor, w2: Tensor, b2: Tensor, h: Tensor, activation: str
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dgates, dw1, db1, dw2, db2)`` given ``grad_y`` ``(N, d)``."""
    from unit_fast.ops.moe_dispatch.triton import moe_dispatch_bwd_triton

    return moe_dispatch_bwd_triton(grad_y, x, expert_idx, gates, w1, b1, w2, b2, h, activation)


# ------------------------------------------------------------------ torch ops


@torch.library.custom_op("unit_fast::moe_dispatch_torch", mutates_args=())
def _moe_dispatch_torch_op(x: Tensor, expert_idx: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                           b2: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(y (N, d), h (N * k, f), a (N * k, f) or (0, f))``; see ``grouped.moe_dispatch_fwd_torch``."""
    check_expert_idx_values(expert_idx, w1.shape[0])
    return grouped.moe_dispatch_fwd_torch(x, expert_idx, gates, w1, b1, w2, b2, activation)


@torch.library.custom_op("unit_fast::_moe_dispatch_torch_backward", mutates_args=())
def _moe_dispatch_torch_backward_op(grad_y: Tensor, x: Tensor, expert_idx: Tensor, gates: Tensor, w1: Tensor,
                                    b1: Tensor, w2: Tensor, b2: Tensor, h: Tensor, a: Tensor, activation: str
                                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return grouped.moe_dispatch_bwd_torch(grad_y, x, expert_idx, gates, w1, b1, w2, b2, h, a, activation)


# ------------------------------------------------------------------ fakes and autograd


def _fake(x, expert_idx, gates, w1, b1, w2, b2, activation):
    return x.new_empty(x.shape), x.new_empty((expert_idx.numel(), w1.shape[2]))


def _torch_fake(x, expert_idx, gates, w1, b1, w2, b2, activation):
    y, h = _fake(x, expert_idx, gates, w1, b1, w2, b2, activation)
    return y, h, x.new_empty((expert_idx.numel() if activation == "gelu" else 0, w1.shape[2]))


def _backward_fake(grad_y, x, expert_idx, gates, w1, b1, w2, b2, *hidden_and_activation):
    return tuple(t.new_empty(t.shape) for t in (x, gates, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    x, expert_idx, gates, w1, b1, w2, b2, activation = inputs
    hidden = output[1:]  # (h,) from the Triton op, (h, a) from the torch op
    ctx.mark_non_differentiable(*hidden)
    ctx.set_materialize_grads(False)  # the hidden outputs get no gradient: no zeros made for them
    ctx.save_for_backward(x, expert_idx, gates, w1, b1, w2, b2, *hidden)
    ctx.activation = activation


def _backward_with(backward_op):
    def _backward(ctx, grad_y, *grad_hidden):
        if grad_y is None:  # y unused: nothing flows back
            return (None,) * 8
        dx, dgates, dw1, db1, dw2, db2 = backward_op(grad_y, *ctx.saved_tensors, ctx.activation)
        grads = (dx, None, dgates, dw1, db1, dw2, db2, None)
        return tuple(g if n else None for g, n in zip(grads, ctx.needs_input_grad, strict=True))

    return _backward


for _fwd, _bwd, _fwd_fake in (("moe_dispatch", "_moe_dispatch_backward", _fake),
                              ("moe_dispatch_torch", "_moe_dispatch_torch_backward", _torch_fake)):
    torch.library.register_fake(f"unit_fast::{_fwd}")(_fwd_fake)
    torch.library.register_fake(f"unit_fast::{_bwd}")(_backward_fake)
    torch.library.register_autograd(f"unit_fast::{_fwd}", _backward_with(getattr(torch.ops.unit_fast, _bwd)),
                                    setup_context=_setup_context)
    torch.library.register_autograd(f"unit_fast::{_bwd}", double_backward_raises(_fwd))


# ------------------------------------------------------------------ public function


def moe_dispatch(x, expert_idx, gates, w1, b1, w2, b2, activation="relu", backend=None):
    """A sparsely gated mixture of expert FFNs (UniT / MMF MultiModel's MoE layer), fused.

    ``y[n] = sum_j gates[n, j] * (act(x[n] @ w1[e] + b1[e]) @ w2[e] + b2[e])``,
    ``e = expert_idx[n, j]``; a slot with ``e = -1`` (padding, or over capacity) adds nothing.

    Args:
        x: ``(N, d)`` tokens; float32, bfloat16 (float32 accumulation), float16 (CUDA), or
            float64 (reference and torch backends; the Triton one too, as a test device).
        expert_idx: ``(N, k)`` int64 in ``[0, E)`` or -1 (the router's top-k, after capacity).
        gates: ``(N, k)`` float, ``x``'s dtype: each slot's weight (used as given).
        w1: ``(E, d, f)``, b1: ``(E, f)``, w2: ``(E, f, d)``, b2: ``(E, d)``, ``x``'s dtype:
            expert ``e`` is ``act(t @ w1[e] + b1[e]) @ w2[e] + b2[e]`` (``w1[e]`` is
            ``nn.Linear(d, f).weight.T``); any strides.
        activation: ``"relu"`` or ``"gelu"`` (exact, erf form).
        backend: ``"triton"``, ``"torch"`` (sorted slots + one ``addmm`` per expert,
            ``grouped.py``) or ``"reference"`` (a per-token loop; traced, the same formula with
            every expert on every token, ``dense.py``, which a graph can hold).  Default: Triton on CUDA,
            torch on CPU (``_backend.OP_BACKENDS``).

    Returns:
        ``(N, d)`` in ``x``'s dtype.  A token whose slots are all -1 gets zeros; ``N = 0`` gives
        ``(0, d)``.  Differentiable in ``x``, ``gates``, ``w1``, ``b1``, ``w2``, ``b2`` (an
        expert no slot chose gets zero weight gradients); not in ``expert_idx``.  A second
        derivative raises on the Triton and torch backends.

    Raises ``ValueError`` (one line, naming the argument) on bad shapes, dtypes, devices,
    activation, or an index outside ``[-1, E)``.  That last check reads the index range on the host
    (a sync on CUDA); the torch backend also reads the segment sizes (one more); the Triton
    kernels themselves need none.  Deterministic on CPU and with Triton (no atomics).
    """
    _check_inputs(x, expert_idx, gates, w1, b1, w2, b2, activation)  # metadata only: no host sync
    chosen = _backend.select_backend("moe_dispatch", x.device, backend)
    if chosen == "reference":
        if torch.compiler.is_compiling():  # traced (export, compile): the spec's loop reads the host
            return moe_dispatch_dense(x, expert_idx, gates, w1, b1, w2, b2, activation)
        check_expert_idx_values(expert_idx, w1.shape[0])
        return moe_dispatch_ref(x, expert_idx, gates, w1, b1, w2, b2, activation)
    if chosen == "torch" and not torch.compiler.is_compiling():
        # Eager: the autograd.Function wrapper of the same math (grouped.py says why); Dynamo
        # traces the registered op below instead.
        check_expert_idx_values(expert_idx, w1.shape[0])
        return grouped.MoEDispatchTorch.apply(x, expert_idx, gates, w1, b1, w2, b2, activation)
    op = torch.ops.unit_fast.moe_dispatch_torch if chosen == "torch" else torch.ops.unit_fast.moe_dispatch
    return op(x, expert_idx, gates, w1, b1, w2, b2, activation)[0]
