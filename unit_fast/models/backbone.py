"""ResNet backbone with frozen BatchNorm, and its ``Joiner`` with the position encoding.

Follows DETR ``models/backbone.py`` / MMF ``mmf/models/unit/backbone.py`` (written from the spec
in ``shared/reference/unit_mmf_detr.md`` sections 1.5 and 1.8; state-dict keys and freezing
rules kept). Differences from the reference:
- the ResNet is built with ``weights=None`` (nothing is ever downloaded); pretrained weights
  come from a local torchvision-format file (``weights=``) or a DETR checkpoint
  (``load_detr_backbone``, MMF's ``base_ckpt_load_backbone_only``);
- resnet18/34 (BasicBlock) with ``dilation`` raise ValueError up front;
- two options for small models trained from scratch (the synthetic default), both off by default:
  ``norm="batch_norm"`` (trainable BatchNorm; every layer trains, since DETR freezes the stem,
  ``layer1`` and the BN statistics only because they come pretrained) and ``last_layer="layer3"``
  (stop at stride 16: a 4x4 feature map from a 64 px image for a quarter less compute);
- ``return_stages=True`` (``model.medusa.multiscale: backbone``) also returns the stages ``layer2`` ..
  the last layer from the same run; the default return is unchanged.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from unit_fast import checkpoint_io
from unit_fast.models.position_encoding import PositionEmbeddingSine
from unit_fast.structures import NestedTensor

_NUM_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
NORMS = ("frozen_bn", "batch_norm")
LAST_LAYERS = ("layer4", "layer3")


class BackboneBase(nn.Module):
    """Runs ``backbone`` through ``IntermediateLayerGetter`` and resizes the padding mask.

    Freezing (DETR): every parameter is frozen unless ``train_backbone``; the stem (``conv1``)
    and ``layer1`` are frozen always. FrozenBatchNorm2d statistics and affines are buffers, so
    they are never trained either.

    Args:
        backbone: a torchvision ResNet.
        train_backbone: keep ``layer2``-``layer4`` trainable.
        num_channels: channels of the last returned feature map.
        return_interm_layers: return ``layer1``..``layer4`` as ``"0"``..``"3"``; else only
            ``layer4`` as ``"0"``.
    """

    def __init__(
        self, backbone: nn.Module, train_backbone: bool, num_channels: int, return_interm_layers: bool,
        train_all: bool = False, last_layer: str = "layer4",
    ):
        super().__init__()
        for name, parameter in backbone.named_parameters():
            trains = train_all or any(layer in name for layer in ("layer2", "layer3", "layer4"))
            if not train_backbone or not trains:
                parameter.requires_grad_(False)
        layers = ("layer1", "layer2", "layer3", "layer4")[: int(last_layer[-1])]
        if return_interm_layers:
            return_layers = {layer: str(i) for i, layer in enumerate(layers)}
        else:
            return_layers = {last_layer: "0"}
        # Attribute name ``body`` makes the state-dict keys ``body.*`` (DETR checkpoint layout).
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.num_channels = num_channels
        # The stages ``forward(return_stages=True)`` also returns: layer2 .. the last (Medusa's scales).
        self.stage_channels = {name: _out_channels(getattr(backbone, name)) for name in layers[1:]}

    def forward(self, tensor_list: NestedTensor, return_stages: bool = False):
        """``NestedTensor`` ``(B, 3, H, W)`` + mask ``(B, H, W)`` -> ``{name: NestedTensor}`` with
        features ``(B, C_l, H_l, W_l)`` and mask ``(B, H_l, W_l)`` bool (True = pad).

        ``return_stages``: ``(that dict, {stage: NestedTensor})`` with every stage of
        ``stage_channels`` (``layer2`` .. the last layer), from the same run."""
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("Backbone needs a NestedTensor with a padding mask")

        def nested(x):
            # Nearest resize of the full-resolution mask; the batch dim rides in the channel
            # slot of interpolate: (1, B, H, W) -> (1, B, H_l, W_l) -> (B, H_l, W_l).
            return NestedTensor(x, F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0])

        out: OrderedDict[str, NestedTensor] = OrderedDict()
        if not return_stages:
            for name, x in self.body(tensor_list.tensors).items():
                out[name] = nested(x)
            return out
        # IntermediateLayerGetter's own loop (same modules, same order), keeping the stages too
        stages: OrderedDict[str, NestedTensor] = OrderedDict()
        x = tensor_list.tensors
        for name, module in self.body.items():
            x = module(x)
            if name in self.body.return_layers:
                out[self.body.return_layers[name]] = nested(x)
            if name in self.stage_channels:  # the last stage is the returned map itself
                returned = self.body.return_layers.get(name)
                stages[name] = out[returned] if returned is not None else nested(x)
        return out, stages


def _out_channels(layer: nn.Sequential) -> int:
    """Output channels of a ResNet stage: its last block's last conv (Bottleneck ``conv3``,
    BasicBlock ``conv2``)."""
    block = layer[-1]
    return getattr(block, "conv3", block.conv2).out_channels


class Backbone(BackboneBase):
    """torchvision ResNet with FrozenBatchNorm2d, optionally dilated last stage (DC5).

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        train_backbone: see ``BackboneBase``.
        return_interm_layers: see ``BackboneBase``.
        dilation: replace ``layer4``'s stride by dilation (output stride 16 instead of 32);
            needs a Bottleneck ResNet (50/101).
        weights: None (random init) or a local path to a torchvision-format ResNet state dict
            (``fc.*`` included), loaded strictly before the classifier is dropped.
        norm: ``"frozen_bn"`` (DETR) or ``"batch_norm"`` (trainable BN, all layers train).
        last_layer: ``"layer4"`` (DETR, stride 32) or ``"layer3"`` (stride 16, half the channels).

    Output channels: 512 for resnet18/34, 2048 for resnet50/101 (``num_channels``); half that
    with ``last_layer="layer3"``.
    """

    def __init__(
        self,
        name: str,
        train_backbone: bool,
        return_interm_layers: bool,
        dilation: bool,
        weights: str | os.PathLike | None = None,
        norm: str = "frozen_bn",
        last_layer: str = "layer4",
    ):
        if name not in _NUM_CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(_NUM_CHANNELS)}")
        if dilation and _NUM_CHANNELS[name] == 512:
            raise ValueError(f"dilation needs a Bottleneck ResNet (resnet50/101); {name} uses BasicBlock")
        if weights is not None and not os.path.isfile(weights):
            raise FileNotFoundError(f"backbone weights file not found: {os.fspath(weights)!r}")
        if norm not in NORMS:
            raise ValueError(f"backbone norm must be one of {NORMS}, got {norm!r}")
        if last_layer not in LAST_LAYERS:
            raise ValueError(f"backbone last_layer must be one of {LAST_LAYERS}, got {last_layer!r}")
        if dilation and last_layer != "layer4":
            raise ValueError("dilation (DC5) dilates layer4; it needs last_layer='layer4'")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d,
        )
        if weights is not None:
            # Weights only (trusted only inside ``checkpoint_io.trusting``, which build_model opens
            # for --trust-checkpoint); a .safetensors file is read as {"model": state_dict}.
            state_dict = checkpoint_io.load(weights, what="backbone weights")
            if os.fspath(weights).endswith(".safetensors"):
                state_dict = state_dict["model"]
            # Strict: a wrong file fails here. FrozenBatchNorm2d drops ``num_batches_tracked``.
            try:
                resnet.load_state_dict(state_dict, strict=True)
            except (RuntimeError, TypeError) as exc:
                what = "; ".join(x.strip() for x in str(exc).splitlines()[1:] if x.strip())[:400]
                raise ValueError(f"backbone weights {os.fspath(weights)!r} do not fit a torchvision {name}: "
                                 f"{what}") from None
        if last_layer != "layer4":
            del resnet.layer4  # never run: keeps it out of the parameters and the state dict
        channels = _NUM_CHANNELS[name] // (1 if last_layer == "layer4" else 2)
        super().__init__(resnet, train_backbone, channels, return_interm_layers,
                         train_all=norm == "batch_norm", last_layer=last_layer)
        self.name, self.dilation, self.norm, self.last_layer = name, dilation, norm, last_layer

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, dilation={self.dilation}, norm={self.norm!r}, "
                f"last_layer={self.last_layer!r}, num_channels={self.num_channels}")


class Joiner(nn.Sequential):
    """``Sequential(backbone, position_embedding)`` so state-dict keys are ``0.body.*``
    (``backbone.0.body.*`` inside ``UniTBaseModel``, as in DETR checkpoints).

    forward(``NestedTensor``) -> ``(features, pos)``: ``features`` is a list of ``NestedTensor``
    (one per returned layer, shallow to deep) and ``pos`` a list of ``(B, hidden_dim, H_l, W_l)``
    encodings in each feature map's dtype.
    """

    def __init__(self, backbone: BackboneBase, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)

    @property
    def num_channels(self) -> int:
        return self[0].num_channels

    @property
    def stage_channels(self) -> dict:
        """``{stage: channels}`` of ``layer2`` .. the last layer (what ``return_stages`` returns)."""
        return dict(self[0].stage_channels)

    def forward(self, tensor_list: NestedTensor, return_stages: bool = False):
        """``(features, pos)``; with ``return_stages`` ``(features, pos, stages)``, ``stages`` a list
        of ``NestedTensor`` ``(B, C_s, H_s, W_s)`` + mask for ``layer2`` .. the last layer (no
        position encoding: Medusa resizes them to the last grid, whose encoding is ``pos[-1]``)."""
        out = self[0](tensor_list, return_stages=return_stages)
        if return_stages:
            out, stages = out
        features: list[NestedTensor] = []
        pos: list[Tensor] = []
        for x in out.values():
            features.append(x)
            # Encoding is computed in fp32; cast so autocast/bf16 features add without promotion.
            pos.append(self[1](x).to(x.tensors.dtype))
        if return_stages:
            return features, pos, list(stages.values())
        return features, pos


def build_backbone(
    *,
    backbone: str = "resnet50",
    lr_backbone: float = 1e-5,
    dilation: bool = False,
    hidden_dim: int = 256,
    weights: str | os.PathLike | None = None,
    norm: str = "frozen_bn",
    last_layer: str = "layer4",
) -> Joiner:
    """UniT/DETR image backbone: last ResNet stage only + ``PositionEmbeddingSine(hidden_dim // 2,
    normalize=True)`` (MMF ``build_unit_convnet_backbone``). ``lr_backbone <= 0`` freezes it all."""
    if hidden_dim % 4:
        # hidden_dim // 2 features per axis, and each axis interleaves sin/cos pairs.
        raise ValueError(f"hidden_dim must be a multiple of 4, got {hidden_dim}")
    body = Backbone(
        backbone,
        train_backbone=lr_backbone > 0,
        return_interm_layers=False,
        dilation=dilation,
        weights=weights,
        norm=norm,
        last_layer=last_layer,
    )
    return Joiner(body, PositionEmbeddingSine(hidden_dim // 2, normalize=True))


def load_detr_backbone(
    joiner: Joiner, state_dict: Mapping[str, Tensor], *, prefix: str = "backbone.", strict: bool = True
):
    """Load the ``{prefix}0.body.*`` tensors of a DETR/UniT state dict into ``joiner``.

    MMF's ``base_ckpt_load_backbone_only``: every other key (transformer, heads, ...) is
    ignored. Pass the checkpoint's ``"model"`` entry; for an MMF UniT state dict use
    ``prefix="unit_base_model.backbone."``.

    Returns:
        ``torch.nn.modules.module._IncompatibleKeys(missing_keys, unexpected_keys)`` in the
        joiner's key space (``0.body.*``). With ``strict`` (default) any missing or unexpected
        key raises RuntimeError instead; shape mismatches always raise.

    Raises:
        ValueError: no key of ``state_dict`` starts with ``{prefix}0.body.`` (wrong dict or prefix).
    """
    body_prefix = prefix + "0.body."
    sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(body_prefix)}
    if not sub:
        hint = " (pass checkpoint['model'])" if "model" in state_dict else ""
        raise ValueError(f"no '{body_prefix}*' keys in the state dict{hint}")
    return joiner.load_state_dict(sub, strict=strict)
