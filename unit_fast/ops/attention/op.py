"""Registration of ``unit_fast::attention`` (+ ``unit_fast::_attention_backward``) and dispatch.

Both are ``torch.library.custom_op``s launching the Triton kernels of ``triton.py``, with fakes
and an autograd formula (house style section 4).  The forward also returns the log-sum-exp,
which the backward reads; it carries no gradient.  The dropout seed is a 0-d int64 *CPU*
tensor, drawn from torch's default CPU generator: reading it costs no device sync, it follows
``torch.manual_seed``, and ``torch.compile`` traces it as a tensor rather than baking it in.
"""

import math

import torch
from torch import Tensor

from unit_fast import _backend
from unit_fast.ops._autograd import double_backward_raises
from unit_fast.ops.attention import sdpa
from unit_fast.ops.attention.reference import additive_mask, attention_ref

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@torch.library.custom_op("unit_fast::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, key_padding_mask: Tensor | None,
                  dropout_p: float, scale: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """``(out (B, H, L, Dv), lse (B, H, L) fp32)``; ``bias`` float broadcastable to
    ``(B, H, L, S)``; ``key_padding_mask`` ``(B, S)`` bool, True = padding."""
    from unit_fast.ops.attention.triton import attention_fwd_triton

    return attention_fwd_triton(q, k, v, bias, key_padding_mask, dropout_p, scale, int(seed))


@_attention_op.register_fake
def _attention_fake(q, k, v, bias, key_padding_mask, dropout_p, scale, seed):
    from unit_fast.ops.attention.triton import empty_like_layout

    B, H, L, _ = q.shape
    return empty_like_layout(q, (B, H, L, v.shape[3])), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("unit_fast::_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           bias: Tensor | None, key_padding_mask: Tensor | None, dropout_p: float,
                           scale: float, seed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of ``attention`` given ``grad_out`` ``(B, H, L, Dv)``."""
    from unit_fast.ops.attention.triton import attention_bwd_triton

    return attention_bwd_triton(grad_out, q, k, v, out, lse, bias, key_padding_mask, dropout_p, scale,
                                int(seed))


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, bias, key_padding_mask, dropout_p, scale, seed):
    from unit_fast.ops.attention.triton import empty_like_layout

    return empty_like_layout(q, q.shape), empty_like_layout(k, k.shape), empty_like_layout(v, v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, kpm, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, bias, kpm, seed)
    ctx.dropout_p, ctx.scale = dropout_p, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias, kpm, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.unit_fast._attention_backward(
        grad_out, q, k, v, out, lse, bias, kpm, ctx.dropout_p, ctx.scale, seed)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("unit_fast::attention", _backward, setup_context=_setup_context)
torch.library.register_autograd("unit_fast::_attention_backward", double_backward_raises("attention"))


def _check(q, k, v, key_padding_mask, attn_mask, dropout_p, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, seq, head_dim), got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"attention: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    B, H, L, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"attention: k {tuple(k.shape)} does not match q {tuple(q.shape)} "
                         "(want (B, H, S, D))")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention: v {tuple(v.shape)} does not match k {tuple(k.shape)} (want (B, H, S, Dv))")
    S = k.shape[2]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, S):
            raise ValueError(f"attention: key_padding_mask must be (B, S) = {(B, S)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if not (key_padding_mask.dtype == torch.bool or key_padding_mask.dtype.is_floating_point):
            raise TypeError(f"attention: key_padding_mask must be bool or float, got {key_padding_mask.dtype}")
    if attn_mask is not None:
        if not (attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point):
            raise TypeError(f"attention: attn_mask must be bool or float, got {attn_mask.dtype}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, H, L, S))
        except RuntimeError:
            raise ValueError(f"attention: attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                             f"(B, H, L, S) = {(B, H, L, S)}") from None
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("attention: a gradient wrt attn_mask is not supported; pass attn_mask.detach()")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")


def attention_with_lse(q, k, v, key_padding_mask=None, attn_mask=None, dropout_p=0.0, scale=None,
                       backend=None):
    """``attention`` that also returns the lse ``(B, H, L)`` fp32 (``-inf`` on empty rows)."""
    _check(q, k, v, key_padding_mask, attn_mask, dropout_p, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = _backend.select_backend("attention", q.device, backend)
    if chosen == "triton" and (q.dtype not in TRITON_DTYPES or max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM):
        if backend is not None or _backend.forced_backend() is not None:
            raise ValueError(f"attention: the triton backend takes {TRITON_DTYPES} and head dims <= "
                             f"{MAX_HEAD_DIM}; got {q.dtype}, D={q.shape[-1]}, Dv={v.shape[-1]}")
        chosen = "reference"  # an automatic choice falls back quietly (house style section 5)
    if chosen == "torch":
        why = sdpa.ineligible(q, v, dropout_p)
        if why is None:
            return sdpa.attention_torch(q, k, v, key_padding_mask, attn_mask, scale)
        if backend is not None or _backend.forced_backend() is not None:
            raise ValueError(f"attention: the torch backend cannot run these inputs: {why}")
        chosen = "reference"
    if chosen == "reference":
        return attention_ref(q, k, v, key_padding_mask, attn_mask, dropout_p, scale, return_lse=True)

    # A float key-padding mask is an additive bias like attn_mask; only a bool one takes the
    # kernel's skip-padding path.
    kpm = key_padding_mask
    bias = None if attn_mask is None else additive_mask(attn_mask, q.dtype)
    if kpm is not None and kpm.dtype != torch.bool:
        kpm_bias = kpm.view(q.shape[0], 1, 1, -1)
        bias = kpm_bias if bias is None else bias + kpm_bias
        kpm = None
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0.0 else torch.zeros((), dtype=torch.int64)
    return torch.ops.unit_fast.attention(q, k, v, bias, kpm, float(dropout_p), scale, seed)


def attention(q, k, v, key_padding_mask=None, attn_mask=None, dropout_p=0.0, scale=None, backend=None):
    """Multi-head scaled dot-product attention with padding masks and dropout, fused.

    ``softmax(q k^T * scale + masks) v``, with dropout on the weights, computed FlashAttention-
    style (no ``L x S`` buffer on the Triton backend).

    Args:
        q: ``(B, H, L, D)``; k: ``(B, H, S, D)``; v: ``(B, H, S, Dv)``; float16, bfloat16 or
            float32 (the reference also takes float64), any strides: a sequence-first
            ``(L, B, H * D)`` projection is passed as ``x.view(L, B, H, D).permute(1, 2, 0, 3)``
            with no copy, and the output comes back in the same layout.
        key_padding_mask: ``(B, S)`` bool, ``True`` = padding key (ignored), as in
            ``torch.nn.MultiheadAttention``; or float, added to that key's scores.
        attn_mask: broadcastable to ``(B, H, L, S)`` (``(L, S)``, ``(B, H, L, S)``, ...), bool
            with ``True`` = *not allowed* (``nn.MultiheadAttention``'s convention, the opposite
            of ``scaled_dot_product_attention``'s), or float, added to the scores.  No
            gradient flows to it.
        dropout_p: probability of dropping an attention weight (kept ones are scaled by
            ``1 / (1 - p)``); the mask is drawn from torch's CPU generator, so
            ``torch.manual_seed`` makes it reproducible.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"triton"``, ``"torch"`` (torch's fused CPU kernel, ``sdpa.py``: no dropout,
            ``D == Dv``) or ``"reference"``.  Default: Triton on CUDA; on CPU the torch kernel
            where it is eligible, else the reference.

    Returns:
        ``(B, H, L, Dv)``, ``q``'s dtype.  A query row whose keys are all masked gives 0 and
        zero gradients (as ``scaled_dot_product_attention`` does).
    """
    return attention_with_lse(q, k, v, key_padding_mask, attn_mask, dropout_p, scale, backend)[0]
