"""Fused multi-head attention with padding masks and dropout (FlashAttention-2 in Triton).

Public:
  ``attention(q, k, v, key_padding_mask=None, attn_mask=None, dropout_p=0.0, scale=None)``
  ``attention_ref(...)``: the spec (softmax attention, ``nn.MultiheadAttention``'s masks)
"""

from unit_fast.ops.attention.op import attention, attention_with_lse
from unit_fast.ops.attention.reference import attention_ref

__all__ = ["attention", "attention_ref", "attention_with_lse"]
