"""Medusa's attentional multitasking (Spencer, Bowden & Hadfield 2022, "Medusa: Universal Feature
Learning via Attentional Multitasking") as an option of UniT's shared body: ``model.medusa``.

Every dataset ``ds`` gets its own small attention modules between the shared body and its (shared)
decoder; the body's parameters stay shared.  Two options, independent:

  ``feature_attention``  Medusa's shared feature attention: the decoder memory is gated per dataset,
                         ``mem_ds = mem * sigmoid(MLP_ds(mem))``, ``MLP_ds = Linear(d, hidden) -> ReLU ->
                         Linear(hidden, d)`` (``channel``: a gate per token and channel, ``(S, B, d)``) or
                         ``Linear(hidden, 1)`` (``token``: one gate per token, ``(S, B, 1)``).  It gates the
                         whole memory the decoder reads: the image memory (after ``enc2dec_proj``, and after
                         ``model.conditioning``'s FiLM) and the text memory (after ``bert_projection``), so a
                         text-only task gets feature attention too; padded tokens are gated as well, which is
                         harmless (the decoder masks them).
  ``multiscale``         Medusa's multi-scale attention, a per-dataset softmax over feature scales:
                         ``backbone``: one scale per ResNet stage from ``layer2`` to the last
                         (``backbone_last_layer``), each projected to the encoder width by a shared 1x1
                         conv (the last stage's projection is UniT's own ``input_proj``: its keys stay)
                         and average-pooled to the last stage's grid (``adaptive_avg_pool2d``, pooled
                         before the projection: a 1x1 conv commutes with averaging and costs less on
                         fewer pixels); their weighted sum replaces ``input_proj(last stage)``.  The
                         grid, its mask and its position encoding are the last stage's, as in UniT.
                         ``encoder`` (cheaper): a per-dataset softmax over the image encoder's layers' outputs
                         (each through the encoder's final norm when it has one) replaces the last layer's.

Initialisation: UniT's behaviour, up to a factor.  The gate MLP's last layer has weight 0 and bias
``gate_bias`` (6: ``sigmoid(6) = 0.9975``, every memory entry scaled by that); the scale logits are 0
except the last scale's, ``scale_logit`` (8: with 3 backbone scales the last has weight 0.9993).  With
``gate_bias`` 30 and ``scale_logit`` 200 the factors round to exactly 1 and 0 in float32: the outputs
are then UniT's.  Gradients at step 0: the gate's first layer gets none while the last layer's
weight is zero, and ``sigmoid'(6) = 0.0025`` scales the rest (small, not zero).

Every per-dataset parameter (``feature_attention.<ds>``, ``scale_logits.<ds>``, ``layer_logits.<ds>``)
is registered with its dataset by ``UniT`` (``training.freeze: shared`` trains a new dataset's); the
stage projections are shared.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULTS = {"feature_attention": "none", "attention_hidden": 64, "gate_bias": 6.0, "multiscale": "none",
            "scale_logit": 8.0}
FEATURE_ATTENTIONS = ("none", "channel", "token")
MULTISCALES = ("none", "backbone", "encoder")
_KEY = "model.medusa"


def _choice(value, key, allowed):
    value = "none" if value is None else value  # YAML null reads as none
    if value not in allowed:
        raise ValueError(f"{_KEY}.{key} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _number(value, key):
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ValueError(f"{_KEY}.{key} must be a finite number, got {value!r}")
    return float(value)


def medusa_options(cfg) -> dict:
    """The validated ``model.medusa`` mapping (``None`` or missing keys: ``DEFAULTS``); a bad value is
    a one-line ValueError naming ``model.medusa.<key>``."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{_KEY}: unknown key(s) {unknown}; it takes {', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **cfg}
    hidden = o["attention_hidden"]
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        raise ValueError(f"{_KEY}.attention_hidden must be an integer >= 1, got {hidden!r}")
    return {"feature_attention": _choice(o["feature_attention"], "feature_attention", FEATURE_ATTENTIONS),
            "attention_hidden": hidden, "gate_bias": _number(o["gate_bias"], "gate_bias"),
            "multiscale": _choice(o["multiscale"], "multiscale", MULTISCALES),
            "scale_logit": _number(o["scale_logit"], "scale_logit")}


def medusa_enabled(cfg) -> bool:
    """Whether ``model.medusa`` turns anything on (validated first)."""
    o = medusa_options(cfg)
    return o["feature_attention"] != "none" or o["multiscale"] != "none"


def parameter_count(cfg, d_memory, num_datasets, num_image_datasets, stage_channels=(), d_enc=None,
                    enc_layers=0) -> int:
    """The parameters ``Medusa`` adds, from the config: ``D (d h + h + h o + o)`` gates (``o`` = d
    channel, 1 token; D datasets) + backbone: ``sum_{non-last stages} (C_l d_enc + d_enc)`` + ``D_img
    n_stages`` logits; encoder: ``D_img enc_layers`` logits (``D_img``: datasets with images)."""
    o = medusa_options(cfg)
    total = 0
    if o["feature_attention"] != "none":
        h, out = o["attention_hidden"], d_memory if o["feature_attention"] == "channel" else 1
        total += num_datasets * (d_memory * h + h + h * out + out)
    if o["multiscale"] == "backbone":
        channels = list(stage_channels)
        total += sum(c * d_enc + d_enc for c in channels[:-1]) + num_image_datasets * len(channels)
    elif o["multiscale"] == "encoder":
        total += num_image_datasets * enc_layers
    return total


class FeatureGate(nn.Module):
    """One dataset's ``sigmoid(fc2(relu(fc1(x))))``, ``x (..., d)`` -> ``(..., d)`` (channel) or
    ``(..., 1)`` (token); ``fc2`` weight 0, bias ``bias``: a constant ``sigmoid(bias)`` at init."""

    def __init__(self, d_model, hidden, out, bias):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, out)
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x))))


def _dominant_last(n, logit):
    """``(n,)`` logits ``[0, ..., 0, logit]``: the last scale has (nearly) all the weight."""
    logits = torch.zeros(n)
    logits[-1] = logit
    return logits


class Medusa(nn.Module):
    """Medusa's per-dataset attention modules for a UniT (module docstring).

    Args:
        cfg: the ``model.medusa`` mapping (validated here).
        datasets: ``{dataset: has_image}``; every dataset gets a feature gate, the datasets with
            images the scale logits.
        d_memory: the decoder memory's width (``decoder_hidden_dim``).
        stage_channels: ``{stage: channels}`` of the backbone's stages ``layer2 .. last``, in order
            (``multiscale: backbone``); d_enc: the image encoder's width (the projections' output).
        enc_layers: the image encoder's layer count (``multiscale: encoder``).

    Parameters (the state-dict keys, under ``medusa.`` in a UniT): ``feature_attention.<ds>.{fc1,fc2}.*``;
    ``stage_projs.<stage>.*`` (every stage but the last; shared); ``scale_logits.<ds>`` ``(n_stages,)``;
    ``layer_logits.<ds>`` ``(enc_layers,)``.
    """

    def __init__(self, cfg, datasets, d_memory, stage_channels=None, d_enc=None, enc_layers=0):
        super().__init__()
        o = medusa_options(cfg)
        self.options = o
        self.d_memory, self.d_enc, self.enc_layers = d_memory, d_enc, enc_layers
        self.stages = list(stage_channels or {})
        if o["multiscale"] == "backbone" and len(self.stages) < 1:
            raise ValueError(f"{_KEY}.multiscale is backbone, but the backbone reports no stages")
        self.feature_attention = nn.ModuleDict() if o["feature_attention"] != "none" else None
        self.scale_logits = nn.ParameterDict() if o["multiscale"] == "backbone" else None
        self.layer_logits = nn.ParameterDict() if o["multiscale"] == "encoder" else None
        if self.scale_logits is not None:
            self.stage_projs = nn.ModuleDict({s: nn.Conv2d(stage_channels[s], d_enc, kernel_size=1)
                                              for s in self.stages[:-1]})
        for ds, has_image in datasets.items():
            self.add_dataset(ds, has_image)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def add_dataset(self, ds, has_image=True):
        """Dataset ``ds``'s gate (``feature_attention``) and, with an image, its scale or layer
        logits, at their initialisation.  Returns their module paths (relative to this module)."""
        o = self.options
        if self.feature_attention is not None:
            if ds in self.feature_attention:
                raise ValueError(f"Medusa: dataset {ds!r} already has its modules")
            out = self.d_memory if o["feature_attention"] == "channel" else 1
            gate = FeatureGate(self.d_memory, o["attention_hidden"], out, o["gate_bias"])
            self.feature_attention[ds] = gate
        if has_image and self.scale_logits is not None:
            self.scale_logits[ds] = nn.Parameter(_dominant_last(len(self.stages), o["scale_logit"]))
        if has_image and self.layer_logits is not None:
            self.layer_logits[ds] = nn.Parameter(_dominant_last(self.enc_layers, o["scale_logit"]))
        return self.dataset_prefixes(ds)

    def dataset_prefixes(self, ds):
        """Module paths (relative to this module) of dataset ``ds``'s own parameters."""
        tables = (("feature_attention", self.feature_attention), ("scale_logits", self.scale_logits),
                  ("layer_logits", self.layer_logits))
        return [f"{name}.{ds}" for name, table in tables if table is not None and ds in table]

    def context(self, ds) -> "MedusaContext":
        """Dataset ``ds``'s modules for one forward."""
        if self.feature_attention is not None and ds not in self.feature_attention:
            raise ValueError(f"Medusa: no modules for dataset {ds!r}; it has {list(self.feature_attention)}")
        return MedusaContext(self, ds)


class MedusaContext:
    """One forward's Medusa modules of one dataset; each method returns its input's UniT value
    unchanged when its option is off."""

    def __init__(self, owner: Medusa, ds):
        self.dataset = ds
        self._gate = None if owner.feature_attention is None else owner.feature_attention[ds]
        self._owner = owner
        self.mixes_stages = owner.scale_logits is not None
        self.mixes_layers = owner.layer_logits is not None

    def gate_memory(self, memory: Tensor) -> Tensor:
        """``memory * sigmoid(MLP_ds(memory))``, ``memory (S, B, d)``; the gate is ``(S, B, d)``
        (channel) or ``(S, B, 1)`` (token)."""
        return memory if self._gate is None else memory * self._gate(memory)

    def _weights(self, table, n):
        if self.dataset not in table:
            raise ValueError(f"Medusa: dataset {self.dataset!r} has no {n}-scale logits (a dataset without "
                             "images was given an image)")
        return table[self.dataset].softmax(dim=0)  # (n,) float32

    def mix_stages(self, stages, input_proj) -> Tensor:
        """``sum_s w_s proj_s(pool_s(stage_s))`` ``(B, d_enc, H, W)`` (H, W: the last stage's grid)
        from ``stages`` ``[(B, C_s, H_s, W_s)]`` (``layer2 .. last``); ``proj_last`` is ``input_proj``."""
        owner = self._owner
        if len(stages) != len(owner.stages):
            raise ValueError(f"Medusa: {len(stages)} backbone stages given, expected {owner.stages}")
        w = self._weights(owner.scale_logits, len(stages))
        last = input_proj(stages[-1])  # (B, d_enc, H, W): UniT's img_feat
        out = w[-1].to(last.dtype) * last
        grid = stages[-1].shape[-2:]
        for s, name in enumerate(owner.stages[:-1]):
            pooled = F.adaptive_avg_pool2d(stages[s], grid)  # (B, C_s, H, W)
            out = out + w[s].to(last.dtype) * owner.stage_projs[name](pooled)
        return out

    def mix_layers(self, outputs) -> Tensor:
        """``sum_l w_l out_l`` ``(S, B, d)`` of the image encoder's layer outputs ``[(S, B, d)]``."""
        owner = self._owner
        if len(outputs) != owner.enc_layers:
            raise ValueError(f"Medusa: {len(outputs)} encoder outputs given, expected {owner.enc_layers}")
        w = self._weights(owner.layer_logits, len(outputs))
        out = w[-1].to(outputs[-1].dtype) * outputs[-1]
        for i in range(len(outputs) - 1):
            out = out + w[i].to(outputs[i].dtype) * outputs[i]
        return out
