"""``unit_fast::moe_dispatch`` (a top-k mixture of expert FFNs) against the usual compositions.

Group ``moe_dispatch:<shape>`` (shapes.py ``MOE_DISPATCH_SHAPES``), forward + backward (the
gradients of all six differentiable inputs for a fixed output gradient), float32, gelu experts,
each provider timed in one run on the same inputs:
  reference             ``moe_dispatch_ref``: the per-token loop (shapes of at most
                        ``MOE_DISPATCH_REFERENCE_MAX_SLOTS`` slots only)
  per_expert_loop       the usual loop: per expert ``(expert_idx == e).nonzero()``, gather its
                        tokens, two matmuls, ``index_add_`` the gated rows (Mixtral / HF style)
  padded_bmm            GShard style: slots packed into an ``(E, C, d)`` buffer (``C`` the
                        largest expert load), two ``baddbmm``, gathered back
  unit_fast_torch       ``moe_dispatch(..., backend="torch")``: one sort, one ``addmm`` per expert
                        segment, one ``index_add_`` (``ops/moe_dispatch/grouped.py``)
  unit_fast_triton      ``moe_dispatch(..., backend="triton")`` (CUDA only: the interpreter is
                        never benchmarked)

Before timing, each provider's result is checked against float64: the reference where it is
timed, else the per-expert loop run in float64 (the reference is too slow there; the loop
itself is checked against the reference at the small shape, in this same file).
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import devices, measure
from benchmarks.shapes import (
    MOE_DISPATCH_DTYPE,
    MOE_DISPATCH_REFERENCE_MAX_SLOTS,
    MOE_DISPATCH_SHAPES,
    NUM_INPUT_SETS,
    moe_dispatch_inputs,
)
from unit_fast.ops.moe_dispatch import moe_dispatch, moe_dispatch_ref
from unit_fast.ops.moe_dispatch.reference import activation_fn

# gelu, not DETR / UniT's relu: a float32-vs-float64 check of relu's gradients fails wherever a
# pre-activation rounds to exactly 0 in float32 (a kink: measured on unit_n4096's third input set,
# not an error), and the two cost the same here (the matmuls dominate).
ACTIVATION = "gelu"
CHECK_RTOL = 1e-4  # float32 vs float64, relative to each tensor's largest value (sums of ~1000 terms)


def per_expert_loop(x, expert_idx, gates, w1, b1, w2, b2, activation="relu"):
    """The usual eager MoE: one pass over the routing per expert."""
    act = activation_fn(activation)
    out = torch.zeros_like(x)  # [N, d]
    for e in range(w1.shape[0]):
        tok, slot = (expert_idx == e).nonzero(as_tuple=True)  # host sync on CUDA
        if tok.numel() == 0:
            continue
        h = act(x[tok] @ w1[e] + b1[e])  # [n_e, f]
        out.index_add_(0, tok, (h @ w2[e] + b2[e]) * gates[tok, slot, None])
    return out


def padded_bmm(x, expert_idx, gates, w1, b1, w2, b2, activation="relu"):
    """GShard-style dispatch: slots packed into ``(E, C, d)``, batched matmuls, combined back."""
    act = activation_fn(activation)
    N, d = x.shape
    k, E = expert_idx.shape[1], w1.shape[0]
    flat = expert_idx.reshape(-1)  # [M]
    kept = (flat >= 0).nonzero().squeeze(1)  # [m], host sync on CUDA
    e = flat[kept]  # [m]
    onehot = F.one_hot(e, E)  # [m, E]
    pos = (onehot.cumsum(0) - 1).gather(1, e[:, None])[:, 0]  # [m]: place within its expert
    C = max(int(onehot.sum(0).max()), 1) if kept.numel() else 1  # host sync: the capacity
    dest = e * C + pos  # [m]
    tok = torch.div(kept, k, rounding_mode="floor")  # [m]
    buf = x.new_zeros(E * C, d).index_copy(0, dest, x[tok]).view(E, C, d)  # [E, C, d]
    h = act(torch.baddbmm(b1[:, None, :], buf, w1))  # [E, C, f]
    o = torch.baddbmm(b2[:, None, :], h, w2).view(E * C, d)  # [E * C, d]
    ys = o[dest] * gates.reshape(-1)[kept][:, None]  # [m, d]
    return x.new_zeros(N, d).index_add(0, tok, ys)


def _provider(name):
    if name == "reference":
        return moe_dispatch_ref
    if name == "per_expert_loop":
        return per_expert_loop
    if name == "padded_bmm":
        return padded_bmm
    return functools.partial(moe_dispatch, backend=name.removeprefix("unit_fast_"))


def _forward_backward(fn):
    """``inputs -> (y, dx, dgates, dw1, db1, dw2, db2)`` for the output gradient ``grad_y``."""

    def call(inputs):
        x, expert_idx, gates, w1, b1, w2, b2, grad_y = inputs
        y = fn(x, expert_idx, gates, w1, b1, w2, b2, ACTIVATION)
        grads = torch.autograd.grad(y, (x, gates, w1, b1, w2, b2), grad_y)
        return (y.detach(), *grads)

    return call


def _leaves(inputs):
    return tuple(t.requires_grad_() if t.is_floating_point() and i != 7 else t for i, t in enumerate(inputs))


def _has_reference(shape):
    return shape.N * shape.k <= MOE_DISPATCH_REFERENCE_MAX_SLOTS


def _num_sets(device):
    """Input sets cycled: ``NUM_INPUT_SETS`` on CUDA (so no call re-reads the last one's inputs
    from L2); one on CPU, where each warm-up call of the large shape costs about a second."""
    return NUM_INPUT_SETS if torch.device(device).type == "cuda" else 1


@functools.cache
def _expected(shape_name, num_sets):
    """float64 results of each input set of a shape (CPU), by the reference where it is timed,
    else by the per-expert loop."""
    shape = MOE_DISPATCH_SHAPES[shape_name]
    call = _forward_backward(moe_dispatch_ref if _has_reference(shape) else per_expert_loop)
    return [call(_leaves([t.double() if t.is_floating_point() else t for t in x]))
            for x in moe_dispatch_inputs(shape, num_sets=num_sets)]


def _cases():
    out = []
    for shape_name, shape in MOE_DISPATCH_SHAPES.items():
        providers = ["per_expert_loop", "padded_bmm", "unit_fast_torch"]
        if _has_reference(shape):
            providers.insert(0, "reference")
        for p in providers:
            out += [pytest.param(p, d, shape, id=f"{p}-{d}-{shape_name}") for d in devices()]
        out.append(pytest.param("unit_fast_triton", "cuda", shape, id=f"unit_fast_triton-cuda-{shape_name}",
                                marks=[pytest.mark.cuda, pytest.mark.skipif(
                                    not torch.cuda.is_available(),
                                    reason="the Triton kernels are benchmarked on CUDA only (the CPU "
                                           "interpreter's speed means nothing); no CUDA device here")]))
    return out


def check_against(expected, provider):
    """``check(x, out)`` for ``measure``: each output within ``CHECK_RTOL`` of the float64 one."""
    names = ("y", "dx", "dgates", "dw1", "db1", "dw2", "db2")

    def check(x, out):
        for name, got, want in zip(names, out, expected[id(x)], strict=True):
            scale = max(want.abs().max().item(), 1.0)
            err = (got.detach().double().cpu() - want).abs().max().item()
            assert err <= CHECK_RTOL * scale, f"{provider} {name}: {err:.3e} > {CHECK_RTOL} x {scale:.3g}"

    return check


@pytest.mark.parametrize("provider,device,shape", _cases())
def test_moe_dispatch(benchmark, provider, device, shape):
    benchmark.group = f"moe_dispatch:{shape.name}"
    benchmark.extra_info.update(
        op="moe_dispatch", case=shape.name, provider=provider, device=device, shape=shape.as_dict(),
        dtype=str(MOE_DISPATCH_DTYPE).removeprefix("torch."), activation=ACTIVATION,
        role="unit_fast" if provider.startswith("unit_fast") else "baseline",
    )
    num_sets = _num_sets(device)
    inputs = [_leaves(x) for x in moe_dispatch_inputs(shape, device, num_sets=num_sets)]
    expected = {id(x): w for x, w in zip(inputs, _expected(shape.name, num_sets), strict=True)}
    call = _forward_backward(_provider(provider))
    measure(benchmark, call, inputs, device, check_against(expected, provider))
