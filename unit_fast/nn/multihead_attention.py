"""``unit_fast.MultiheadAttention``: ``torch.nn.MultiheadAttention`` with a fused attention core.

It *is* a ``torch.nn.MultiheadAttention`` (a subclass adding no parameters or buffers), so the
constructor, parameters, state-dict keys, initialisation, pickling and ``isinstance`` checks are
torch's own; only ``forward`` differs, and only when no weights are asked for:

* ``need_weights=False``: in-projection (``F.linear``), then ``unit_fast.nn.functional.attention``
  (FlashAttention-style Triton kernel on CUDA: no ``L x S`` buffer, padding blocks skipped), then
  ``out_proj``.  Sequence-first and batch-first inputs are both read through strided views, and
  the kernel writes its output in the layout ``out_proj`` reads: no transposes are copied.
* ``need_weights=True``: torch's own forward, unchanged.  The weights must be materialised, and
  torch's path returns them (and its NaN rows) exactly.

``patch_attention(model)`` turns every ``torch.nn.MultiheadAttention`` in a model into this
class in place: same parameter objects, so optimizers and state dicts stay valid.  DETR and MMF
UniT call attention with the default ``need_weights=True`` and keep only ``[0]``: patch them with
``drop_weights=True``, which runs the fused path for those calls and returns ``None`` weights.

TorchScript: ``torch.jit.script`` compiles ``forward``'s ``torch.jit.is_scripting()`` branch only
(the fused op and ``super().forward`` cannot be scripted): torch's own math through
``F.multi_head_attention_forward``, the same outputs as eager, ``None`` weights where eager gives
``None``.  Eager and ``torch.compile`` never take that branch.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unit_fast.ops.attention.op import attention_with_lse


def _pad_last(mask, value):
    """Append one column (the bias_k / zero-attention key) to a mask's last dim."""
    return F.pad(mask, (0, 1), value=value)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` (same arguments, parameters, state dict and
    ``forward``), whose ``need_weights=False`` path runs ``unit_fast``'s fused attention.

    Extra keyword-only arguments:
        backend: ``"triton"`` / ``"reference"`` for the attention core (default: Triton on CUDA,
            the reference on CPU; see ``unit_fast._backend``).
        drop_weights: treat ``need_weights=True`` as ``False`` (return ``None`` weights), for call
            sites that discard them, e.g. DETR's ``self_attn(...)[0]``.  Rows with no allowed
            key are then NaN, as torch's weights path gives them.

    Shapes (as torch): ``query (L, N, E)`` / ``(N, L, E)`` with ``batch_first`` / ``(L, E)``
    unbatched; ``key (S, N, kdim)``, ``value (S, N, vdim)``; ``key_padding_mask (N, S)`` bool
    (True = ignore) or float (added); ``attn_mask (L, S)`` or ``(N * num_heads, L, S)``, bool
    (True = not allowed) or float (added).  Returns ``(attn_output, attn_weights or None)``.
    On the fused path a query row whose keys are all masked gives 0, as torch's
    ``need_weights=False`` path does.  ``is_causal`` is a hint and needs ``attn_mask``, as in torch;
    the fused path applies ``attn_mask``.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend=None,
                 drop_weights=False):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend
        self.drop_weights = drop_weights

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, backend={self.backend!r}, drop_weights={self.drop_weights}")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if torch.jit.is_scripting():
            return self._scripted_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                          average_attn_weights, is_causal)
        if need_weights and not self.drop_weights:
            return self._torch_forward(query, key, value, key_padding_mask, attn_mask, average_attn_weights,
                                       is_causal)
        # With drop_weights, torch's weights path would give NaN on rows with nothing to attend.
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal,
                                   nan_empty_rows=need_weights), None

    @torch.jit.unused
    def _torch_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                       attn_mask: Tensor | None, average_attn_weights: bool,
                       is_causal: bool) -> tuple[Tensor, Tensor | None]:
        """torch's own forward with weights (unused by TorchScript: it cannot compile ``super()``)."""
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                               is_causal=is_causal)

    def _scripted_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                          need_weights: bool, attn_mask: Tensor | None, average_attn_weights: bool,
                          is_causal: bool) -> tuple[Tensor, Tensor | None]:
        """TorchScript's path: torch's non-fast-path forward (``nn.MultiheadAttention.forward``'s
        own call of ``F.multi_head_attention_forward``), compiled instead of the fused op.

        With ``drop_weights`` the weights are still computed and then dropped: that is the path
        whose empty rows are NaN, as the eager fused path gives them for ``need_weights=True``.
        """
        batch_first = self.batch_first and query.dim() == 3
        if batch_first:  # (N, L, E) -> (L, N, E): transposed views, as torch's forward
            query, key, value = query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight,
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim, q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if batch_first:
            out = out.transpose(1, 0)  # (N, L, E)
        if self.drop_weights:
            weights = None
        return out, weights

    # -- the fused path ------------------------------------------------------------------------

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask):
        if query.dim() not in (2, 3):
            raise ValueError(f"MultiheadAttention: query must be 2-D (unbatched) or 3-D, got shape "
                             f"{tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"MultiheadAttention: query, key and value must have the same rank, got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"MultiheadAttention: query's last dim is {query.shape[-1]}, expected "
                             f"embed_dim={self.embed_dim}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"MultiheadAttention: key/value last dims {key.shape[-1]}/{value.shape[-1]} do not "
                             f"match kdim={self.kdim}, vdim={self.vdim}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"MultiheadAttention: key {tuple(key.shape)} and value {tuple(value.shape)} "
                             "differ in sequence or batch size")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and not (m.dtype == torch.bool or m.dtype.is_floating_point):
                raise TypeError(f"MultiheadAttention: only bool and floating types of {name} are supported, "
                                f"got {m.dtype}")

    @torch.jit.unused
    def _fused_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                       attn_mask: Tensor | None, is_causal: bool, nan_empty_rows: bool) -> Tensor:
        """``attn_output``; rows with no allowed key are 0, or NaN with ``nan_empty_rows``."""
        self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise ValueError("MultiheadAttention: is_causal is only a hint and needs attn_mask "
                             "(e.g. nn.Transformer.generate_square_subsequent_mask), as in torch")
        batched = query.dim() == 3
        seq_dim = 1 if (self.batch_first and batched) else 0
        if not batched:  # (L, E) -> (L, 1, E)
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        batch_dim = 1 - seq_dim
        E, H = self.embed_dim, self.num_heads
        D = E // H
        N, L, S = query.shape[batch_dim], query.shape[seq_dim], key.shape[seq_dim]
        if key.shape[batch_dim] != N:
            raise ValueError(f"MultiheadAttention: query batch {N} != key batch {key.shape[batch_dim]}")

        q, k, v = self._in_projection(query, key, value)  # each (.., E) in the input layout
        if self.bias_k is not None:  # one learned key/value appended to every sequence
            # In k's dtype: under autocast k is bf16 while the parameter stays fp32.
            k = torch.cat([k, self.bias_k.to(k.dtype).expand_as(k.narrow(seq_dim, 0, 1))], dim=seq_dim)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand_as(v.narrow(seq_dim, 0, 1))], dim=seq_dim)
        if self.add_zero_attn:  # a zero key/value, i.e. zero in every head
            k = torch.cat([k, k.new_zeros(k.narrow(seq_dim, 0, 1).shape)], dim=seq_dim)
            v = torch.cat([v, v.new_zeros(v.narrow(seq_dim, 0, 1).shape)], dim=seq_dim)
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)

        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise ValueError(f"MultiheadAttention: key_padding_mask must be (N, S) = {(N, S)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            for _ in range(extra):
                key_padding_mask = _pad_last(key_padding_mask, False if key_padding_mask.dtype == torch.bool else 0.0)
        S_all = S + extra
        bias = self._attn_bias(attn_mask, N, L, S, extra, batched)

        def heads(x, length):  # (.., E) input layout -> (N, H, length, D) strided view, no copy
            if seq_dim == 0:
                return x.view(length, N, H, D).permute(1, 2, 0, 3)
            return x.view(N, length, H, D).permute(0, 2, 1, 3)

        dropout_p = self.dropout if self.training else 0.0
        out, lse = attention_with_lse(heads(q, L), heads(k, S_all), heads(v, S_all), key_padding_mask, bias,
                                      dropout_p, None, self.backend)  # (N, H, L, D), lse (N, H, L)
        empty = torch.isneginf(lse).any(dim=1) if nan_empty_rows else None  # (N, L)
        if seq_dim == 0:
            out = out.permute(2, 0, 1, 3).reshape(L, N, E)  # (L, N, E): a view in the kernel's layout
            empty = None if empty is None else empty.t()  # (L, N)
        else:
            out = out.permute(0, 2, 1, 3).reshape(N, L, E)  # (N, L, E)
        if empty is not None:
            out = out.masked_fill(empty.unsqueeze(-1), float("nan"))
        out = self.out_proj(out)
        return out if batched else out.squeeze(1)

    def _in_projection(self, query, key, value):
        """``(q, k, v)`` projections, sharing one matmul where the inputs are the same tensor."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if query is key and key is value:  # self-attention: one (.., 3E) matmul, three views
            return F.linear(query, w, b).chunk(3, dim=-1)
        if query is key:  # DETR: q = k = x + pos, v = x
            q, k = F.linear(query, w[:2 * E], None if b is None else b[:2 * E]).chunk(2, dim=-1)
            return q, k, F.linear(value, w[2 * E:], bv)
        if key is value:  # cross-attention over one memory tensor
            k, v = F.linear(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1)
            return F.linear(query, w[:E], bq), k, v
        return F.linear(query, w[:E], bq), F.linear(key, w[E:2 * E], bk), F.linear(value, w[2 * E:], bv)

    def _attn_bias(self, attn_mask, N, L, S, extra, batched):
        """``attn_mask`` as a float/bool tensor broadcastable to ``(N, H, L, S + extra)``."""
        if attn_mask is None:
            return None
        H = self.num_heads
        if attn_mask.dim() == 2:
            if attn_mask.shape != (L, S):
                raise ValueError(f"MultiheadAttention: the 2-D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                 f"{(L, S)}")
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (N * H, L, S):
                raise ValueError(f"MultiheadAttention: the 3-D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                 f"{(N * H, L, S)}")
        else:
            raise ValueError(f"MultiheadAttention: attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        for _ in range(extra):
            attn_mask = _pad_last(attn_mask, False if attn_mask.dtype == torch.bool else 0.0)
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.view(N, H, L, S + extra)
        return attn_mask


def patch_attention(model: nn.Module, *, drop_weights: bool = False, backend=None) -> nn.Module:
    """Make every ``torch.nn.MultiheadAttention`` in ``model`` a ``unit_fast.MultiheadAttention``,
    in place, keeping its parameters (the same objects) and its state-dict keys.

    Args:
        model: any module (may itself be a ``MultiheadAttention``).
        drop_weights: also run the fused path for calls with ``need_weights=True`` (returning
            ``None`` weights).  Use it for DETR / MMF UniT, whose layers call with the default
            ``need_weights=True`` and keep only the output; a caller that reads the weights
            then fails loudly on ``None``.
        backend: the attention backend of the patched modules (default: per device).

    Returns:
        ``model``.  Subclasses of ``nn.MultiheadAttention`` other than ours are left alone (their
        ``forward`` may differ); ones already patched get the new settings.
    """
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
        if type(module) is MultiheadAttention:
            module.backend = backend
            module.drop_weights = drop_weights
    return model
