"""UniT's transformer: DETR's encoder/decoder layers plus MMF's multimodal ``UniTTransformer``.

Written from the facts of MMF ``mmf/models/unit/transformer.py`` (itself DETR's
``models/transformer.py`` with multimodal logic), see ``shared/reference/unit_mmf_detr.md``
sections 1.4 and 5.  Module names, parameter names, defaults, initialisation order and the
layout of every tensor are the reference's, so MMF state dicts load strictly.

Changes from the reference:
- attention modules are ``torch.nn.MultiheadAttention`` here; ``unit_fast.patch_attention``
  turns them into the fused drop-in (``UniT`` with ``implementation: fast`` does), same parameters;
- ``pass_pos_and_query=False`` (unused by every UniT config) raises instead of being
  half-supported;
- the decoder takes an optional ``conditioning`` (a ``unit_fast.models.conditioning.TaskContext``,
  ``model.conditioning``): its layer norms, query self-attention bias, adapters and the image
  memory's FiLM come from it.  With None (the default) the code path is the reference's;
- ``model.moe`` (``moe=`` options, off by default): the chosen encoder/decoder layers' FFN is an
  ``MoEFFN`` (``unit_fast/models/moe.py``): those layers have ``moe.*`` instead of ``linear1``/
  ``linear2``; ``moe_task=`` carries the dataset's gate task embedding to them;
- ``medusa=`` (a ``unit_fast.models.medusa.MedusaContext``, ``model.medusa``): the decoder memory's
  feature attention and the per-dataset mix of the image encoder's layers.  With None (the
  default) nothing of it runs.

Layouts (DETR's, sequence-first): ``src (S, B, d)``, ``pos (S, B, d)``,
``key_padding_mask (B, S)`` bool with ``True`` = padding; ``hs (num_layers, B, Q, d)``.
"""

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unit_fast.models.moe import MoEFFN, build_moe_ffn, check_layer_indices
from unit_fast.nn.multihead_attention import MultiheadAttention as FusedMultiheadAttention


def _get_clones(module, n):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _get_activation_fn(activation):
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    if activation == "glu":
        return F.glu
    raise ValueError(f"activation should be relu/gelu/glu, not {activation!r}")


def _with_pos(tensor, pos):
    return tensor if pos is None else tensor + pos


class _FFNMixin:
    """A layer's FFN: ``linear2(dropout(act(linear1(x))))``, or its ``moe`` once ``use_moe`` gave it one."""

    def use_moe(self, moe):
        """Make ``moe`` (an ``MoEFFN``) this layer's FFN: ``linear1``/``linear2`` are deleted, so the
        state dict has ``moe.*`` in their place (the inner ``dropout`` has no parameters and goes
        unused: the experts run fused, without it)."""
        del self.linear1, self.linear2
        self.moe = moe
        return self

    def _ffn(self, x, padding_mask=None, moe_task=None):
        if self.moe is not None:  # padded tokens are routed nowhere and count in no MoE statistic
            return self.moe(x, padding_mask=padding_mask, task_embedding=moe_task)
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class TransformerEncoderLayer(_FFNMixin, nn.Module):
    """Self-attention + FFN, post-norm (``normalize_before=False``, the default) or pre-norm.
    Positions are added to queries and keys, never to values, in every layer."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before
        self.moe = None  # an MoEFFN replaces linear1/linear2 (use_moe)

    def forward(self, src: Tensor, src_mask=None, src_key_padding_mask=None, pos=None,
                moe_task=None) -> Tensor:
        if self.normalize_before:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, k, value=x, attn_mask=src_mask,
                                                     key_padding_mask=src_key_padding_mask)[0])
            return src + self.dropout2(self._ffn(self.norm2(src), src_key_padding_mask, moe_task))
        q = k = _with_pos(src, pos)
        src2 = self.self_attn(q, k, value=src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask)[0]
        src = self.norm1(src + self.dropout1(src2))
        return self.norm2(src + self.dropout2(self._ffn(src, src_key_padding_mask, moe_task)))


def _add_masks(mask, bias):
    """``mask`` (None, bool with True = not allowed, or float) plus a float ``bias``, as one float mask."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(mask, float("-inf"))
    return mask + bias


class TransformerDecoderLayer(_FFNMixin, nn.Module):
    """Self-attention over the queries, cross-attention into the memory, FFN.

    ``forward(..., conditioning=None, layer_idx=0)``: with a ``TaskContext``, norm ``i`` is
    ``conditioning.norm(layer_idx, "norm<i>", ...)``, the query self-attention adds
    ``conditioning.self_attn_bias(layer_idx, Q)`` to ``tgt_mask``, and the output goes through
    ``conditioning.adapter(layer_idx, ...)``.  ``moe_task``: the gate task embedding of an MoE FFN
    (``model.moe.gate_task``); queries are never padded, so every one is routed."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before
        self.moe = None  # an MoEFFN replaces linear1/linear2 (use_moe)

    def _self_attention(self, q, k, v, attn_mask, key_padding_mask):
        attn = self.self_attn
        if (attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()
                and isinstance(attn, FusedMultiheadAttention)):
            # unit_fast's fused attention has no gradient wrt attn_mask (a conditioned bias that
            # trains).  The query self-attention is only (Q, Q): torch's own forward runs it.
            return nn.MultiheadAttention.forward(attn, q, k, v, key_padding_mask=key_padding_mask,
                                                 need_weights=False, attn_mask=attn_mask)[0]
        return attn(q, k, value=v, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0]

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, pos=None, query_pos=None, conditioning=None, layer_idx=0,
                moe_task=None):
        pre, cond = self.normalize_before, conditioning

        def norm(name, x):
            ln = getattr(self, name)
            return ln(x) if cond is None else cond.norm(layer_idx, name, ln, x)

        if cond is not None:
            bias = cond.self_attn_bias(layer_idx, tgt.shape[0])  # (Q, Q) or None
            if bias is not None:
                tgt_mask = _add_masks(tgt_mask, bias)
        x = norm("norm1", tgt) if pre else tgt
        q = k = _with_pos(x, query_pos)
        tgt = tgt + self.dropout1(self._self_attention(q, k, x, tgt_mask, tgt_key_padding_mask))
        if not pre:
            tgt = norm("norm1", tgt)
        x = norm("norm2", tgt) if pre else tgt
        tgt = tgt + self.dropout2(self.multihead_attn(query=_with_pos(x, query_pos), key=_with_pos(memory, pos),
                                                      value=memory, attn_mask=memory_mask,
                                                      key_padding_mask=memory_key_padding_mask)[0])
        if not pre:
            tgt = norm("norm2", tgt)
        x = norm("norm3", tgt) if pre else tgt
        tgt = tgt + self.dropout3(self._ffn(x, moe_task=moe_task))
        out = tgt if pre else norm("norm3", tgt)
        return out if cond is None else cond.adapter(layer_idx, out)


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, mask=None, src_key_padding_mask=None, pos=None, moe_task=None, return_all=False):
        """``(S, B, d)``, the last layer's output (normed when there is a final norm); with
        ``return_all`` (``model.medusa.multiscale: encoder``) the list of every layer's output, each
        through the final norm when there is one."""
        output = src
        outputs = []
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos,
                           moe_task=moe_task)
            if return_all:
                outputs.append(output if self.norm is None else self.norm(output))
        if return_all:
            return outputs
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(nn.Module):
    """Stacked decoder layers; with ``return_intermediate`` the normed output of every layer,
    ``(num_layers, Q, B, d)`` (what the auxiliary losses read).  With ``conditioning`` (a
    ``TaskContext``) layer ``i`` gets ``layer_idx=i`` and the final norm is ``conditioning.norm(None,
    "final", ...)``."""

    def __init__(self, decoder_layer, num_layers, norm=None, return_intermediate=False):
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, pos=None, query_pos=None, conditioning=None, moe_task=None):
        cond = conditioning

        def final_norm(x):
            if self.norm is None:
                return x
            return self.norm(x) if cond is None else cond.norm(None, "final", self.norm, x)

        output = tgt
        intermediate = []
        for i, layer in enumerate(self.layers):
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos,
                           conditioning=cond, layer_idx=i, moe_task=moe_task)
            if self.return_intermediate:
                intermediate.append(final_norm(output))
        if self.return_intermediate:
            return torch.stack(intermediate)  # (num_layers, Q, B, d)
        return final_norm(output).unsqueeze(0)  # (1, Q, B, d)


def build_decoder(d_model, nhead, dim_feedforward, dropout, num_layers, normalize_before, moe=None):
    """UniT's decoder; ``moe``: validated ``model.moe`` options (its ``layers`` get an ``MoEFFN``,
    ``nn.Linear``-initialised experts), or None."""
    layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, "relu", normalize_before)
    decoder = TransformerDecoder(layer, num_layers, nn.LayerNorm(d_model), return_intermediate=True)
    if moe is not None:
        _attach_moe(decoder.layers, moe, "layers", d_model, dim_feedforward,
                    "decoder (model.base_args.dec_layers)")
    return decoder


def _attach_moe(layers, moe, key, d_model, dim_feedforward, where):
    """Give the layers listed in ``moe[key]`` an ``MoEFFN`` each (a fresh one: clones share nothing)."""
    check_layer_indices(moe, key, len(layers), where)
    for i in moe[key]:
        layers[i].use_moe(build_moe_ffn(moe, d_model, dim_feedforward))


class UniTTransformer(nn.Module):
    """MMF's ``Transformer`` + ``UniTTransformer``: the image encoder, the projections to the
    decoder width, and one decoder shared by every dataset or one per dataset.

    Args (``cfg``, a mapping): ``encoder_hidden_dim``, ``decoder_hidden_dim``, ``dropout``,
    ``nheads``, ``dim_feedforward``, ``enc_layers``, ``dec_layers``, ``pre_norm``,
    ``pass_pos_and_query``, ``share_decoders``, ``residual_in_encoder``,
    ``use_task_embedding_in_img_encoder``, ``max_task_num``; ``datasets``: ``{task_type:
    [dataset names]}``, the decoders to build; ``moe``: validated ``model.moe`` options
    (``unit_fast.models.moe.moe_options``) when it is on, else None.

    Initialisation follows the reference's order: xavier-uniform on every >1-D parameter of
    the encoder, projections and shared decoder; the per-dataset decoders and the task
    embedding, created afterwards, keep PyTorch's default initialisation, and each separate
    decoder's layers start identical (deep copies of one layer).  MoE FFNs follow the dense FFN they
    replace: xavier per expert in the encoder and the shared decoder, ``nn.Linear``'s in separate
    decoders; their gates keep ``MoEFFN``'s initialisation.
    """

    def __init__(self, cfg, datasets, moe=None):
        super().__init__()
        if not cfg.get("pass_pos_and_query", True):
            raise ValueError("UniTTransformer: pass_pos_and_query=False is not supported (no UniT config uses it)")
        d_enc, d_dec = cfg["encoder_hidden_dim"], cfg["decoder_hidden_dim"]
        self.d_model_enc, self.d_model_dec = d_enc, d_dec
        self.nhead = cfg["nheads"]
        layer = TransformerEncoderLayer(d_enc, cfg["nheads"], cfg["dim_feedforward"], cfg["dropout"], "relu",
                                        cfg["pre_norm"])
        self.encoder = TransformerEncoder(layer, cfg["enc_layers"], nn.LayerNorm(d_enc) if cfg["pre_norm"] else None)
        if moe is not None:
            _attach_moe(self.encoder.layers, moe, "encoder_layers", d_enc, cfg["dim_feedforward"],
                        "image encoder (model.base_args.enc_layers)")
        self.enc2dec_proj = nn.Linear(d_enc, d_dec) if d_enc != d_dec else nn.Identity()
        self.pos_embed_proj = nn.Linear(d_enc, d_dec) if d_enc != d_dec else nn.Identity()
        self.share_decoders = cfg["share_decoders"]
        decoder_args = (d_dec, cfg["nheads"], cfg["dim_feedforward"], cfg["dropout"], cfg["dec_layers"],
                        cfg["pre_norm"], moe)
        if self.share_decoders:
            self.decoder = build_decoder(*decoder_args)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # MoE FFNs redone: xavier per expert (not over the (E, d, f) tensor), the gates as they start
        for m in self.modules():
            if isinstance(m, MoEFFN):
                m.reset_parameters(xavier=True)

        self._decoder_args = decoder_args
        self.decoders = nn.ModuleDict()
        for task, names in datasets.items():
            for ds in names:
                self.add_decoder(task, ds)
        self.residual_in_encoder = cfg.get("residual_in_encoder", True)
        self.mem_out_begin_idx = 0
        if cfg.get("use_task_embedding_in_img_encoder", False):
            self.task_embeddings_enc = nn.Embedding(cfg.get("max_task_num", 256), d_enc)
            self.mem_out_begin_idx = 1  # the task token is dropped from the encoder's output
        # Datasets with their own image-encoder task token (``task_token: own``), not a row of
        # ``task_embeddings_enc``: empty for MMF's datasets, so MMF's keys are unchanged.
        self.task_tokens_enc = nn.ModuleDict()

    def add_decoder(self, task, ds):
        """The decoder of a new dataset: the shared one, or a fresh one (PyTorch's default
        initialisation, as the reference's separate decoders have)."""
        if task not in self.decoders:
            self.decoders[task] = nn.ModuleDict()
        self.decoders[task][ds] = self.decoder if self.share_decoders else build_decoder(*self._decoder_args)

    def add_task_token(self, ds):
        """An own image-encoder task token ``(1, d_enc)`` for dataset ``ds`` (when the encoder uses one)."""
        if self.mem_out_begin_idx:
            self.task_tokens_enc[ds] = nn.Embedding(1, self.task_embeddings_enc.embedding_dim)

    def _encode_image(self, img_src, img_mask, img_pos, task_idx, dataset_name=None, moe_task=None,
                      medusa=None):
        """``(memory (HW, B, d_dec), pos (HW, B, d_dec), mask (B, HW))`` of ``img_src (B, d_enc, H, W)``;
        with ``medusa`` (multiscale: encoder) the encoder's output is the dataset's mix of its layers'."""
        B = img_src.shape[0]
        src = img_src.flatten(2).permute(2, 0, 1)  # (HW, B, d_enc)
        pos = img_pos.flatten(2).permute(2, 0, 1)  # (HW, B, d_enc)
        mask = img_mask.flatten(1)  # (B, HW)
        if self.mem_out_begin_idx:  # prepend the task token: zero position, never padding
            own = self.task_tokens_enc[dataset_name] if dataset_name in self.task_tokens_enc else None
            row = own.weight[0] if own is not None else self.task_embeddings_enc.weight[task_idx]
            token = row.view(1, 1, -1).expand(1, B, -1)
            enc_src = torch.cat([token.to(src.dtype), src])  # (1 + HW, B, d_enc)
            enc_pos = torch.cat([torch.zeros_like(pos[:1]), pos])
            enc_mask = torch.cat([mask.new_zeros(B, 1), mask], dim=1)
        else:
            enc_src, enc_pos, enc_mask = src, pos, mask
        if medusa is not None and medusa.mixes_layers:
            layers = self.encoder(enc_src, src_key_padding_mask=enc_mask, pos=enc_pos, moe_task=moe_task,
                                  return_all=True)
            memory = medusa.mix_layers(layers)[self.mem_out_begin_idx:]  # (HW, B, d_enc)
        else:
            memory = self.encoder(enc_src, src_key_padding_mask=enc_mask, pos=enc_pos,
                                  moe_task=moe_task)[self.mem_out_begin_idx:]
        if self.residual_in_encoder:
            memory = src + memory
        return self.enc2dec_proj(memory), self.pos_embed_proj(pos), mask

    def forward(self, img_src=None, img_mask=None, img_pos=None, text_src=None, text_mask=None, text_pos=None,
                query_embed=None, task_type=None, dataset_name=None, task_idx=None, conditioning=None,
                moe_task=None, medusa=None):
        """Returns ``(hs (dec_layers, B, Q, d_dec), memory (B, d_dec, S))``.

        Args:
            img_src: ``(B, d_enc, H, W)`` projected image features, ``img_mask (B, H, W)`` bool
                (True = padding), ``img_pos (B, d_enc, H, W)``; or None (GLUE).
            text_src: ``(B, L, d_dec)``, ``text_mask (B, L)`` with 1 = token, 0 = padding (BERT's
                ``input_mask``), ``text_pos (L, d_dec)``; or None (detection).
            query_embed: ``(Q, d_dec)`` the dataset's query embeddings.
            conditioning: the dataset's ``TaskContext`` (``model.conditioning``), or None (UniT):
                FiLMs the image memory (after ``enc2dec_proj``) and conditions the decoder.
            moe_task: ``(task_dim,)`` the dataset's gate task embedding for the MoE FFNs
                (``model.moe.gate_task``), or None.
            medusa: the dataset's ``MedusaContext`` (``model.medusa``), or None: mixes the image
                encoder's layers (multiscale: encoder) and gates the whole decoder memory, image and
                text tokens (feature_attention), after any FiLM.
        """
        memories, positions, masks = [], [], []
        if img_src is not None:
            memory, pos, mask = self._encode_image(img_src, img_mask, img_pos, task_idx, dataset_name,
                                                   moe_task, medusa)
            if conditioning is not None:
                memory = conditioning.film_memory(memory)  # (HW, B, d_dec)
            memories.append(memory)
            positions.append(pos)
            masks.append(mask)
        if text_src is not None:
            B = text_src.shape[0]
            memories.append(text_src.permute(1, 0, 2))  # (L, B, d_dec)
            positions.append(text_pos.unsqueeze(1).expand(-1, B, -1))  # (L, B, d_dec)
            masks.append(text_mask != 1)  # (B, L): True = padding
        if not memories:
            raise ValueError("UniTTransformer: needs an image or a text input")
        memory, pos, mask = torch.cat(memories), torch.cat(positions), torch.cat(masks, dim=1)
        if medusa is not None:
            memory = medusa.gate_memory(memory)  # (S, B, d_dec)
        B = memory.shape[1]
        query_pos = query_embed.unsqueeze(1).expand(-1, B, -1)  # (Q, B, d_dec)
        tgt = torch.zeros_like(query_pos)
        try:
            decoder = self.decoders[task_type][dataset_name]
        except KeyError:
            raise ValueError(f"UniTTransformer: no decoder for task {task_type!r}, dataset {dataset_name!r}; "
                             f"built: { {t: list(d) for t, d in self.decoders.items()} }") from None
        hs = decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos, query_pos=query_pos,
                     conditioning=conditioning, moe_task=moe_task)
        return hs.transpose(1, 2), memory.permute(1, 2, 0)
