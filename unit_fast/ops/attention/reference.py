"""Reference scaled dot-product attention with padding masks and dropout: the spec.

It is the textbook math (Vaswani et al. 2017, eq. 1), written as ``torch.nn.functional.
multi_head_attention_forward`` computes it when weights are asked for, with the masking
conventions of ``torch.nn.MultiheadAttention`` (boolean ``True`` = *not* allowed to attend),
except for one documented choice: a query row with no allowed key gets output 0 (and zero
gradients), as torch's ``scaled_dot_product_attention`` gives, not the NaN of a plain softmax.
"""

import torch
from torch import Tensor


def additive_mask(mask, dtype):
    """A boolean mask (``True`` = masked) as ``-inf``/``0`` in ``dtype``; a float mask as is."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def attention_bias(key_padding_mask, attn_mask, shape, dtype):
    """The additive bias ``(B, H, L, S)`` (broadcast view) that both masks amount to, or None.

    Args:
        key_padding_mask: ``(B, S)`` bool (``True`` = padding) or float (added), or None.
        attn_mask: broadcastable to ``(B, H, L, S)``, bool (``True`` = masked) or float, or None.
        shape: ``(B, H, L, S)``.
    """
    B, H, L, S = shape
    bias = None
    if key_padding_mask is not None:
        bias = additive_mask(key_padding_mask, dtype).to(dtype).view(B, 1, 1, S)
    if attn_mask is not None:
        am = additive_mask(attn_mask, dtype).to(dtype)
        bias = am if bias is None else bias + am
    return None if bias is None else bias.expand(B, H, L, S)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, key_padding_mask=None, attn_mask=None,
                  dropout_p: float = 0.0, scale=None, dropout_mask=None, upcast: bool = True,
                  return_lse: bool = False):
    """``softmax(q k^T * scale + bias) v`` with dropout on the attention weights.

    Args:
        q: ``(B, H, L, D)``; k: ``(B, H, S, D)``; v: ``(B, H, S, Dv)``; one floating dtype.
        key_padding_mask: ``(B, S)``, bool (``True`` = padding key, ignored) or float (added
            to the scores of that key).
        attn_mask: broadcastable to ``(B, H, L, S)`` (e.g. ``(L, S)``), bool (``True`` = not
            allowed) or float (added to the scores).
        dropout_p: probability of zeroing an attention weight; kept weights are scaled by
            ``1 / (1 - dropout_p)`` (``torch.nn.functional.dropout``).
        scale: softmax scale, default ``D ** -0.5``.
        dropout_mask: ``(B, H, L, S)`` bool, ``True`` = kept; default a fresh Bernoulli draw.
            Tests pass the mask the kernel drew, to compare the two exactly.
        upcast: compute in float32 (float64 stays float64) and return ``q.dtype``; with
            False, compute in ``q.dtype`` (the "reference in the test dtype" of the error rule).
        return_lse: also return the natural-log log-sum-exp ``(B, H, L)`` float of the scaled,
            biased scores (``-inf`` for a row with no allowed key).

    Returns:
        ``(B, H, L, Dv)`` in ``q.dtype`` (and the lse when asked).  A row whose keys are all
        masked gives 0.
    """
    dtype = q.dtype
    if upcast:
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    B, H, L, D = q.shape
    S = k.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, L, S)
    bias = attention_bias(key_padding_mask, attn_mask, (B, H, L, S), scores.dtype)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (B, H, L, 1): nothing to attend
    weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(weights, dtype=torch.float32) >= dropout_p
        weights = weights * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(weights, v).to(dtype)  # (B, H, L, Dv)
    return (out, lse) if return_lse else out
