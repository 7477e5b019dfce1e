"""``unit_fast.MultiheadAttention`` (fused Triton attention) against torch's MHA, SDPA and FlexAttention.

Groups ``attention_fwd:<shape>`` and ``attention_fwdbwd:<shape>`` (shapes.py ``ATTENTION_SHAPES``):
a training-mode multi-head attention layer (dropout 0.1, key padding, sequence-first inputs as
DETR / UniT pass them), bfloat16 (float32 for the CPU smoke shape ``tiny_cpu``).  ``fwd`` times
the forward with autograd recording, as in a training step; ``fwdbwd`` the forward, then the
gradients of ``<out, grad_out>`` (a fixed random ``grad_out``) wrt the inputs and every parameter.
Every provider loads one state dict and is timed in one run on the same inputs:
  mha_need_weights   ``torch.nn.MultiheadAttention(q, k, v, key_padding_mask)[0]``: the reference
                     call (DETR / UniT keep the default ``need_weights=True``)
  mha_no_weights     the same module with ``need_weights=False`` (torch routes it to SDPA)
  sdpa_math, sdpa_efficient, sdpa_flash, sdpa_cudnn
                     in-projection (``F.linear``), ``scaled_dot_product_attention`` under
                     ``sdpa_kernel(<backend>)`` with the padding as a ``(B, 1, 1, S)`` bool
                     ``attn_mask`` (True = attend), dropout 0.1, ``out_proj``.  A backend that
                     refuses the inputs (flash takes no mask) is skipped with torch's reason.
  flex_attention     the same projections around ``torch.compile(flex_attention)``, with a
                     ``BlockMask`` whose ``mask_mod`` reads the key-padding mask, built in the timed call by a
                     compiled ``create_block_mask`` (the padding changes every batch in
                     training).  FlexAttention has no dropout: it runs without, and says so in
                     ``extra_info``.
  unit_fast_triton   ``unit_fast.MultiheadAttention(backend="triton")``, ``need_weights=False``
Only the torch MHA providers run on CPU, and only at ``tiny_cpu``: the SDPA backends, FlexAttention
and Triton (whose interpreter's speed means nothing) are CUDA cases, as is every UniT shape.

Before timing, each provider's eval-mode (dropout off) forward on the first input set is checked,
once per provider, device and shape, against torch MHA's reference call computed in float32 from
the same (rounded) parameters and inputs.
"""

import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import unit_fast
from benchmarks.conftest import baseline_and_triton_cases, cuda_only, measure, sync
from benchmarks.shapes import ATTENTION_SHAPES, SEED, attention_inputs

DROPOUT = 0.1
# The shapes timed on CPU: the UniT ones are CUDA cases (the reference call materialises
# B * H * L * S weights: 740M of them at DC5, seconds per call on a CPU).
CPU_SHAPES = ("tiny_cpu",)
# Against a float32 reference, bfloat16 (8 bits) rounds q, k, v, the attention weights and the
# attention output before the out-projection sums E of them: on CPU the providers' RMS error is
# ~0.5% of the output's RMS (~0.2), the bf16 reference call's ~0.9% (its weights are rounded
# one by one), and the worst of DC5's 7M outputs is off by 0.022.  Elementwise tolerances cover
# that worst case; the RMS bound (relative to the reference's RMS) catches a small error spread
# over every output.  Ignoring the padding fails both on over half of the outputs.
CHECK_TOL = {torch.bfloat16: {"rtol": 2e-2, "atol": 4e-2}, torch.float32: {"rtol": 1e-4, "atol": 1e-4}}
CHECK_RMS = {torch.bfloat16: 2e-2, torch.float32: 1e-5}

SDPA_BACKENDS = {
    "sdpa_math": SDPBackend.MATH,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
}


def _cases():
    cases = baseline_and_triton_cases(("mha_need_weights", "mha_no_weights"))
    sdpa_reason = ("the SDPA backends are compared on CUDA only (flash, efficient and cuDNN are CUDA "
                   "kernels; on CPU, math is what mha_no_weights already runs); no CUDA device here")
    flex_reason = ("flex_attention is compared on CUDA only (torch's FlexAttention has no CPU backward); "
                   "no CUDA device here")
    for provider in SDPA_BACKENDS:
        cases.append(pytest.param(provider, "cuda", id=f"{provider}-cuda", marks=cuda_only(sdpa_reason)))
    cases.append(pytest.param("flex_attention", "cuda", id="flex_attention-cuda",
                              marks=cuda_only(flex_reason)))
    return cases


def _dtype(shape):
    # bfloat16 matmuls on a CPU are slow emulation and would time nothing UniT runs.
    return torch.float32 if shape.name in CPU_SHAPES else torch.bfloat16


@functools.cache
def _state_dict(shape_name):
    """float32 CPU parameters shared by every provider of a shape: ``in_proj_weight (3E, E)``,
    ``in_proj_bias (3E,)``, ``out_proj.weight (E, E)``, ``out_proj.bias (E,)``.

    Scaled so that the scores ``q.k / sqrt(D)`` have a standard deviation of ~2 on unit-normal
    inputs: torch's default init gives ~0.5, a nearly uniform softmax whose output is the mean of
    the values and would hide a wrong mask from the check.  Biases are non-zero for the same reason.
    """
    E = ATTENTION_SHAPES[shape_name].E
    gen = torch.Generator().manual_seed(SEED + 1)
    in_proj = torch.randn(3 * E, E, generator=gen) * E**-0.5
    in_proj[: 2 * E] *= 2**0.5  # q and k: each entry's variance 2, so q.k / sqrt(D) has variance 4
    return {
        "in_proj_weight": in_proj,
        "in_proj_bias": 0.1 * torch.randn(3 * E, generator=gen),
        "out_proj.weight": torch.randn(E, E, generator=gen) * E**-0.5,
        "out_proj.bias": 0.1 * torch.randn(E, generator=gen),
    }


def _module(provider, shape, device, dtype):
    """The provider's attention module (train mode) holding the shape's shared parameters; the
    SDPA and Flex providers only read their weights from it."""
    if provider == "unit_fast_triton":
        module = unit_fast.MultiheadAttention(shape.E, shape.H, dropout=DROPOUT, backend="triton")
    else:
        module = nn.MultiheadAttention(shape.E, shape.H, dropout=DROPOUT)
    module.load_state_dict(_state_dict(shape.name))
    return module.to(device, dtype).train()


def _project(m, query, key, value):
    """In-projections of sequence-first ``query (L, B, E)``, ``key``/``value (S, B, E)`` as
    ``(B, H, L or S, D)`` strided views (no copies), one matmul for one shared input as torch's
    MHA does."""
    E, H = m.embed_dim, m.num_heads
    w, b = m.in_proj_weight, m.in_proj_bias
    if query is key and key is value:
        q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
    else:
        q = F.linear(query, w[:E], b[:E])
        k = F.linear(key, w[E:2 * E], b[E:2 * E])
        v = F.linear(value, w[2 * E:], b[2 * E:])

    def heads(x):  # (seq, B, E) -> (B, H, seq, D)
        return x.unflatten(-1, (H, E // H)).permute(1, 2, 0, 3)

    return heads(q), heads(k), heads(v)


def _out_projection(m, o):
    """``(B, H, L, D)`` attention output -> ``out_proj`` of its ``(L, B, E)`` sequence-first form."""
    return m.out_proj(o.permute(2, 0, 1, 3).flatten(2))


def _mha_need_weights(m, query, key, value, key_padding_mask):
    return m(query, key, value, key_padding_mask=key_padding_mask)[0]


def _mha_no_weights(m, query, key, value, key_padding_mask):
    return m(query, key, value, key_padding_mask=key_padding_mask, need_weights=False)[0]


def _sdpa(backend):
    def forward(m, query, key, value, key_padding_mask):
        q, k, v = _project(m, query, key, value)
        allowed = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S): SDPA's True = attend
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                               dropout_p=m.dropout if m.training else 0.0)
        return _out_projection(m, o)

    return forward


@functools.cache
def _compiled_flex():
    # dynamic=False: one specialised kernel per shape, as a training run (fixed shapes) gets.
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _compiled_create_block_mask():
    # The compiled builder evaluates mask_mod in one fused kernel rather than over a
    # materialised (B, L, S) index grid (FlexAttention's documented recommendation).
    return torch.compile(create_block_mask, dynamic=False)


def _flex(m, query, key, value, key_padding_mask):
    q, k, v = _project(m, query, key, value)
    B, _, L, _ = q.shape
    S = k.shape[2]

    def attend(b, h, q_idx, kv_idx):  # a lookup in the (B, S) padding mask, as FlexAttention's docs do
        return ~key_padding_mask[b, kv_idx]

    block_mask = _compiled_create_block_mask()(attend, B, None, L, S, device=q.device)
    return _out_projection(m, _compiled_flex()(q, k, v, block_mask=block_mask))


def _unit_fast(m, query, key, value, key_padding_mask):
    return m(query, key, value, key_padding_mask=key_padding_mask, need_weights=False)[0]


def _forward_fn(provider):
    """``provider``'s layer as ``forward(module, query, key, value, key_padding_mask) -> (L, B, E)``."""
    if provider in SDPA_BACKENDS:
        return _sdpa(SDPA_BACKENDS[provider])
    return {"mha_need_weights": _mha_need_weights, "mha_no_weights": _mha_no_weights,
            "flex_attention": _flex, "unit_fast_triton": _unit_fast}[provider]


def _leaves(x):
    """The distinct input tensors of ``(query, key, value, ...)`` (``key is query`` in self-attention)."""
    return list({id(t): t for t in x[:3]}.values())


def _timed_call(forward, m, pass_):
    """``x = (query, key, value, key_padding_mask, grad_out) -> out`` (``fwd``) or
    ``(out, grads wrt the inputs and parameters)`` (``fwdbwd``)."""
    params = [p for p in m.parameters() if p.requires_grad]

    def fwd(x):
        return forward(m, *x[:4])

    def fwdbwd(x):
        out = forward(m, *x[:4])
        return out, torch.autograd.grad(out, _leaves(x) + params, x[4])

    return fwd if pass_ == "fwd" else fwdbwd


@functools.cache
def _expected(shape_name, device, dtype):
    """The reference call's eval-mode output ``(L, B, E)`` float32 (on CPU) for input set 0, computed
    in float32 on ``device`` from the ``dtype``-rounded parameters and inputs."""
    shape = ATTENTION_SHAPES[shape_name]
    ref = nn.MultiheadAttention(shape.E, shape.H, dropout=DROPOUT)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in _state_dict(shape_name).items()})
    ref = ref.to(device).eval()
    query, key, value, kpm = attention_inputs(shape, device, dtype, num_sets=1)[0]
    with torch.no_grad():
        out = _mha_need_weights(ref, query.float(), key.float(), value.float(), kpm)
    return out.cpu()


_checked = set()  # (provider, device, shape name): each provider is checked once, not per pass


def _check_once(provider, device, shape, dtype, module, forward, x):
    """``forward``'s eval-mode output on ``x`` against ``_expected``; raises on a mismatch."""
    if (provider, device, shape.name) in _checked:
        return
    want = _expected(shape.name, device, dtype)
    module.eval()
    try:
        # Grad mode stays on (as in the timed calls) so the compiled Flex kernel is not
        # specialised a second time for no_grad.
        got = forward(module, *x[:4]).detach().float().cpu()
    finally:
        module.train()
    torch.testing.assert_close(got, want, **CHECK_TOL[dtype],
                               msg=lambda m: f"{provider} vs torch MHA's reference call (eval, float32): {m}")
    rms_err = ((got - want).square().mean().sqrt() / want.square().mean().sqrt()).item()
    assert rms_err <= CHECK_RMS[dtype], (
        f"{provider} vs torch MHA's reference call (eval, float32): RMS error {rms_err:.2e} of the "
        f"output's RMS > {CHECK_RMS[dtype]:.0e}")
    _checked.add((provider, device, shape.name))


def _skip_if_refused(provider, call, x, device):
    """Runs ``call(x)`` once; an SDPA backend that cannot take these inputs raises RuntimeError
    ("No available kernel"), with its reasons as warnings: skip the case with them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call(x)
            sync(device)
        except RuntimeError as e:
            # Drop the C++ source locations torch appends to each reason.
            messages = (re.sub(r"\s*\(Triggered internally at [^)]*\)", "", str(w.message)).strip()
                        for w in caught)
            reasons = " ".join(dict.fromkeys(m for m in messages if m))
            pytest.skip(f"{provider} refuses these inputs: {e}"
                        + (f" Torch's reasons: {reasons}" if reasons else ""))


def _all_finite(x, out):
    """The training-mode outputs (dropout is random, so not compared) are finite everywhere."""
    tensors = [out] if isinstance(out, torch.Tensor) else [out[0], *out[1]]
    for t in tensors:
        assert torch.isfinite(t).all(), f"non-finite values in a {tuple(t.shape)} result"


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES.values()), ids=list(ATTENTION_SHAPES))
@pytest.mark.parametrize("provider,device", _cases())
def test_attention(benchmark, provider, device, shape, pass_):
    if device == "cpu" and shape.name not in CPU_SHAPES:
        pytest.skip(f"{shape.name} is a CUDA case (bf16 UniT training; the reference call materialises "
                    f"B*H*L*S = {shape.B * shape.H * shape.L * shape.S:.1e} weights per call)")
    if device == "cuda" and shape.name in CPU_SHAPES:
        pytest.skip(f"{shape.name} only runs the harness on CPU; a CUDA run times the UniT shapes")
    dtype = _dtype(shape)
    op = f"attention_{pass_}"
    benchmark.group = f"{op}:{shape.name}"
    benchmark.extra_info.update(
        op=op, case=shape.name, provider=provider, device=device, shape=shape.as_dict(),
        dtype=str(dtype).removeprefix("torch."), dropout=DROPOUT,
        role="unit_fast" if provider.startswith("unit_fast") else "baseline",
    )
    if provider == "flex_attention":
        benchmark.extra_info.update(dropout=0.0,
                                    note="no dropout: flex_attention has none (the others drop 0.1)")

    sets = attention_inputs(shape, device, dtype)
    gen = torch.Generator().manual_seed(SEED + 2)
    inputs = []
    for x in sets:
        for t in _leaves(x):
            t.requires_grad_()  # the layer's input comes from a trained backbone / encoder
        grad_out = torch.randn(shape.L, shape.B, shape.E, generator=gen).to(device, dtype)  # [L, B, E]
        inputs.append((*x, grad_out))
    module = _module(provider, shape, device, dtype)
    forward = _forward_fn(provider)
    call = _timed_call(forward, module, pass_)

    if provider in SDPA_BACKENDS:
        _skip_if_refused(provider, call, inputs[0], device)
    _check_once(provider, device, shape, dtype, module, forward, inputs[0])
    measure(benchmark, call, inputs, device, _all_finite)
