"""A tiny UniT: shared inputs -> a small encoder -> UniT's own decoder with per-task queries and
per-task linear heads (reading query 0 of the last decoder layer, as UniT's classifiers read
their task's first query).

The encoder and decoder are ``unit_fast.models.transformer``'s (DETR's layers, MMF's layout);
only the input projection and the learned positions are this file's.  ``separate_decoders``
gives every task its own decoder (UniT's ``share_decoders: false``); ``conditioning`` is a
``unit_fast.models.conditioning.TaskConditioning`` whose per-task context the shared decoder
takes (``TransformerDecoder.forward(..., conditioning=ctx)``); with ``alignment: memory`` it also
FiLMs the encoder memory (``TaskContext.film_memory``), as UniT does after ``enc2dec_proj``.

``moe`` (validated ``unit_fast.models.moe.moe_options``) gives the listed decoder layers an
``MoEFFN`` (``build_decoder(..., moe=)``); with ``gate_task`` every task gets its own
``(1, task_dim)`` gate embedding (``moe_task_embeddings.<task>``, as UniT's), passed as
``moe_task``.  ``medusa`` (a ``unit_fast.models.medusa.Medusa`` over the tasks, ``has_image``
true) mixes the encoder layers' outputs per task (``multiscale: encoder``) and gates the memory
per task (``feature_attention``).  ``add_task`` adds a task after training (its query, head,
gate embedding and Medusa modules).  All of these are off by default and then create nothing,
so the earlier experiments' models (and their seeded initialisations) are unchanged.
"""

import torch
from torch import nn

from unit_fast.models.transformer import TransformerEncoder, TransformerEncoderLayer, build_decoder


class TinyUniT(nn.Module):
    """``forward(x (B, S, F), task) -> (B, num_outputs[task])``.

    Args: ``outputs``: ``{task: head width}``; ``seq_len``, ``features``: the input's ``S, F``;
    ``d_model``, ``nhead``, ``dim_feedforward``, ``enc_layers``, ``dec_layers``: the transformer;
    ``num_queries``: queries per task (only query 0 is read; more give the decoder's query
    self-attention something to attend over).
    """

    def __init__(self, outputs, seq_len, features, d_model=32, nhead=4, dim_feedforward=64, enc_layers=1,
                 dec_layers=2, num_queries=1, separate_decoders=False, conditioning=None, moe=None,
                 medusa=None):
        super().__init__()
        self.tasks = list(outputs)
        self.input_proj = nn.Linear(features, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, 1, d_model))  # (S, 1, d), learned
        layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, 0.0, "relu", False)
        self.encoder = TransformerEncoder(layer, enc_layers)
        self.separate = separate_decoders

        def decoder():
            return build_decoder(d_model, nhead, dim_feedforward, 0.0, dec_layers, False, moe=moe)

        if separate_decoders:
            self.decoders = nn.ModuleDict({t: decoder() for t in self.tasks})
        else:
            self.decoder = decoder()
        self.query_embed = nn.ModuleDict({t: nn.Embedding(num_queries, d_model) for t in self.tasks})
        self.heads = nn.ModuleDict({t: nn.Linear(d_model, n) for t, n in outputs.items()})
        self.conditioning = conditioning
        self.num_queries, self.d_model = num_queries, d_model
        self.moe = moe
        if moe is not None and moe["gate_task"]:
            self.moe_task_embeddings = nn.ModuleDict({t: nn.Embedding(1, moe["task_dim"])
                                                      for t in self.tasks})
        self.medusa = medusa

    def add_task(self, task, num_outputs):
        """Add ``task``'s own modules (query embedding, head, MoE gate embedding, Medusa gate /
        layer logits) at their initialisation; returns their parameters (what a new task trains)."""
        self.tasks.append(task)
        self.query_embed[task] = nn.Embedding(self.num_queries, self.d_model)
        self.heads[task] = nn.Linear(self.d_model, num_outputs)
        mods = [self.query_embed[task], self.heads[task]]
        if self.moe is not None and self.moe["gate_task"]:
            self.moe_task_embeddings[task] = nn.Embedding(1, self.moe["task_dim"])
            mods.append(self.moe_task_embeddings[task])
        params = [p for m in mods for p in m.parameters()]
        if self.medusa is not None:
            for prefix in self.medusa.add_dataset(task, True):
                if prefix.startswith("feature_attention."):
                    params += list(self.medusa.get_submodule(prefix).parameters())
                else:  # scale_logits.<task> / layer_logits.<task>: a parameter
                    params.append(self.medusa.get_parameter(prefix))
        return params

    def task_parameter_names(self, task):
        """Names of ``task``'s own parameters."""
        keys = [f"query_embed.{task}.", f"heads.{task}.", f"moe_task_embeddings.{task}."]
        if self.medusa is not None:
            keys += [f"medusa.{p}" for p in self.medusa.dataset_prefixes(task)]
        return [n for n, _ in self.named_parameters()
                if any(n.startswith(k) or n == k.rstrip(".") for k in keys)]

    def moe_layers(self):
        """The decoder's ``MoEFFN`` modules, in layer order."""
        if self.moe is None:
            return []
        return [layer.moe for layer in self.decoder.layers if layer.moe is not None]

    def moe_aux_loss(self):
        """The sum of the last forward's MoE auxiliary losses (0 without any)."""
        return sum((v for m in self.moe_layers() for v in m.last["losses"].values()), torch.zeros(()))

    def shared_parameters(self):
        """The parameters every task's loss reaches (encoder, positions, shared decoder,
        conditioning): what a gradient aggregator combines."""
        per_task = [m for t in self.tasks for m in (self.query_embed[t], self.heads[t])]
        own = {id(p) for m in per_task for p in m.parameters()}
        if self.separate:
            own |= {id(p) for p in self.decoders.parameters()}
        return [p for p in self.parameters() if id(p) not in own]

    def forward(self, x, task):
        b = x.shape[0]
        src = self.input_proj(x).transpose(0, 1)  # (S, B, d)
        pos = self.pos.expand(-1, b, -1)  # (S, B, d)
        med = None if self.medusa is None else self.medusa.context(task)
        if med is not None and med.mixes_layers:
            memory = med.mix_layers(self.encoder(src, pos=pos, return_all=True))  # (S, B, d), per-task mix
        else:
            memory = self.encoder(src, pos=pos)  # (S, B, d)
        if med is not None:
            memory = med.gate_memory(memory)  # per-task feature attention (identity when off)
        moe_task = None
        if self.moe is not None and self.moe["gate_task"]:
            moe_task = self.moe_task_embeddings[task].weight[0]  # (task_dim,)
        query_pos = self.query_embed[task].weight.unsqueeze(1).expand(-1, b, -1)  # (Q, B, d)
        tgt = torch.zeros_like(query_pos)  # DETR / UniT: the decoder starts from zeros
        if self.separate:
            hs = self.decoders[task](tgt, memory, pos=pos, query_pos=query_pos)  # (L, Q, B, d)
        elif self.conditioning is not None:
            ctx = self.conditioning.context(task)  # this forward's offsets, generated once
            memory = ctx.film_memory(memory)  # alignment: memory / both (identity otherwise)
            hs = self.decoder(tgt, memory, pos=pos, query_pos=query_pos, conditioning=ctx)  # (L, Q, B, d)
        else:
            hs = self.decoder(tgt, memory, pos=pos, query_pos=query_pos, moe_task=moe_task)  # (L, Q, B, d)
        return self.heads[task](hs[-1, 0])  # (B, C)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())
