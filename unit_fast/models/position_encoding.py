"""Sine position encoding of image features, as DETR ``models/position_encoding.py`` and MMF
``mmf/models/unit/backbone.py::PositionEmbeddingSine`` define it (written from the spec in
``shared/reference/unit_mmf_detr.md`` section 1.5; numerics kept, quirks included)."""

import math

import torch
from torch import Tensor, nn

from unit_fast.structures import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding of each pixel's position inside its image's valid region.

    Positions count valid (unpadded) pixels: ``y = cumsum(~mask, dim=H)``,
    ``x = cumsum(~mask, dim=W)``, starting at 1. With ``normalize`` they are divided by the
    last value of their column/row (``+ 1e-6``, the valid extent) and multiplied by ``scale``
    (default ``2 pi``), so an image's encoding does not depend on how much padding its batch
    adds. Padded pixels are encoded too (they get the count of the last valid pixel before
    them, or 0); attention masks them out.

    For feature ``i`` of ``num_pos_feats``, frequency ``temperature ** (2 * (i // 2) / num_pos_feats)``
    divides the position; even ``i`` take ``sin`` and odd ``i`` take ``cos`` (interleaved, not
    two halves). Output channels are ``[y features, x features]``.

    Args:
        num_pos_feats: features per axis (must be even); output has ``2 * num_pos_feats`` channels.
        temperature: base of the frequency ladder.
        normalize: divide positions by the valid extent and scale them.
        scale: multiplier used with ``normalize``; passing it without ``normalize`` is an error.

    Shapes:
        forward(``NestedTensor`` with mask ``(B, H, W)`` bool, True = pad) -> ``(B, 2 * num_pos_feats, H, W)``
        float32 on the mask's device (the caller casts; ``Joiner`` casts to the feature dtype).
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: float | None = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        if num_pos_feats % 2:
            # sin takes the even features and cos the odd ones; an odd count cannot interleave.
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("PositionEmbeddingSine needs a NestedTensor with a padding mask")
        not_mask = ~mask  # (B, H, W), True on valid pixels
        # Positions in fp32 whatever the feature dtype: counts up to ~1e3 and the 1e-6 eps
        # are not representable in fp16/bf16.
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (B, H, W)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)  # (B, H, W)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)  # (F,)

        pos_x = x_embed[:, :, :, None] / dim_t  # (B, H, W, F)
        pos_y = y_embed[:, :, :, None] / dim_t  # (B, H, W, F)
        # sin of even features, cos of odd ones, re-interleaved: (B, H, W, F/2, 2) -> (B, H, W, F)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}"
        )
