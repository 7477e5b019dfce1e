"""The ``torch`` backend of ``attention``: torch's own fused CPU kernel.

``aten::_scaled_dot_product_flash_attention_for_cpu`` is the kernel ``scaled_dot_product_attention``
runs on CPU tensors: FlashAttention-style tiles (no ``L x S`` weights kept for the backward),
vectorised and threaded, and it returns the log-sum-exp that ``attention_with_lse`` promises.
It is called directly, not through ``scaled_dot_product_attention``, because only it gives the
lse; its derivative is registered in torch, so autograd works as for any aten op.

Eligible: no dropout (the kernel has none), ``D == Dv``, fp16 / bf16 / fp32 / fp64.  Masks become
one additive mask in ``q``'s dtype (the kernel wants a 2-D or 4-D mask of the query's dtype).  A
row whose keys are all masked gives 0 from the kernel with an lse of 0; its lse is set to
``-inf`` here, which is what the reference and the Triton kernel return for it.
"""

import torch

from unit_fast.ops.attention.reference import additive_mask

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ineligible(q, v, dropout_p):
    """Why the torch backend cannot run these inputs, or None."""
    if dropout_p > 0.0:
        return "torch's CPU attention kernel has no dropout"
    if q.shape[-1] != v.shape[-1]:
        return f"torch's CPU attention kernel needs D == Dv, got {q.shape[-1]} and {v.shape[-1]}"
    if q.dtype not in DTYPES:
        return f"torch's CPU attention kernel takes {DTYPES}, got {q.dtype}"
    return None


def _bias(q, k, key_padding_mask, attn_mask):
    """One additive ``q.dtype`` mask broadcastable to ``(B, H, L, S)`` (4-D), or None."""
    B, S = q.shape[0], k.shape[2]
    bias = None if attn_mask is None else additive_mask(attn_mask, q.dtype).to(q.dtype)
    if bias is not None and bias.dim() < 4:
        bias = bias.view(*([1] * (4 - bias.dim())), *bias.shape)
    if key_padding_mask is not None:
        kpm = additive_mask(key_padding_mask, q.dtype).to(q.dtype).view(B, 1, 1, S)
        bias = kpm if bias is None else bias + kpm
    return bias


def attention_torch(q, k, v, key_padding_mask, attn_mask, scale):
    """``(out (B, H, L, D), lse (B, H, L))`` as ``attention_ref(..., return_lse=True)`` gives them."""
    bias = _bias(q, k, key_padding_mask, attn_mask)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    if bias is not None:
        # Branch-free (no ``if empty.any()``): a data-dependent branch would stop
        # ``torch.compile(fullgraph=True)`` of a model whose attention lands here.
        empty = torch.isneginf(bias).all(dim=-1)  # broadcastable to (B, H, L)
        lse = lse.masked_fill(empty.expand(lse.shape), float("-inf"))
    return out, lse
