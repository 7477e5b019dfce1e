"""Data structures shared by ``unit_fast.data`` (which builds them) and ``unit_fast.models``
(which consumes them), so that neither layer imports the other.

``NestedTensor``: a padded image batch plus its padding mask.  Same interface as DETR
``util/misc.py::NestedTensor`` and MMF ``mmf/models/unit/misc.py`` (``to``, ``decompose``,
classmethod ``from_tensor_list``). Written from the interface facts; differences:
``from_tensor_list`` validates its input (ValueError instead of shape errors deep inside the
copy) and can round the padded size up to a multiple (``size_divisibility``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class NestedTensor:
    """A batch of images padded to a common size and a mask of the padding.

    Args:
        tensors: ``(B, C, H, W)`` images, zero where padded.
        mask: ``(B, H, W)`` bool, **True on padding** (the ``key_padding_mask`` convention of
            ``nn.MultiheadAttention``), or None (no padding information).
    """

    def __init__(self, tensors: Tensor, mask: Tensor | None):
        self.tensors = tensors
        self.mask = mask

    def to(self, device: torch.device | str, non_blocking: bool = False) -> NestedTensor:
        """Both tensors moved to ``device``; dtypes are kept (the mask stays bool).

        ``non_blocking`` only overlaps the copy on CUDA with pinned host memory (house style 10).
        """
        tensors = self.tensors.to(device, non_blocking=non_blocking)
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(tensors, mask)

    def decompose(self) -> tuple[Tensor, Tensor | None]:
        """``(tensors (B, C, H, W), mask (B, H, W) bool or None)``."""
        return self.tensors, self.mask

    def __repr__(self) -> str:
        mask = "None" if self.mask is None else f"{tuple(self.mask.shape)}"
        return (
            f"NestedTensor(tensors={tuple(self.tensors.shape)} {self.tensors.dtype} "
            f"on {self.tensors.device}, mask={mask})"
        )

    @classmethod
    def from_tensor_list(cls, tensor_list: Sequence[Tensor], size_divisibility: int = 0) -> NestedTensor:
        """Zero-pad ``[C, H_i, W_i]`` images to one ``(B, C, H, W)`` batch, bottom/right.

        ``H, W`` are the maxima over the list; with ``size_divisibility = d > 0`` each is further
        rounded up to a multiple of ``d`` (e.g. 32, the ResNet stride, so that every padded
        batch maps onto whole feature cells; MMF/DETR use 0). Each image sits at the top-left
        corner; ``mask[b, y, x]`` is True outside image ``b``'s ``H_b x W_b`` region.

        Raises:
            ValueError: empty list, an image that is not 3-D, or images that differ in channel
                count, dtype or device.
        """
        if len(tensor_list) == 0:
            raise ValueError("NestedTensor.from_tensor_list: got an empty list of images")
        if size_divisibility < 0:
            raise ValueError(f"size_divisibility must be >= 0, got {size_divisibility}")
        first = tensor_list[0]
        for i, img in enumerate(tensor_list):
            if img.dim() != 3:
                raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected [C, H, W]")
            if img.shape[0] != first.shape[0]:
                raise ValueError(f"image {i} has {img.shape[0]} channels, image 0 has {first.shape[0]}")
            if img.dtype != first.dtype:
                raise ValueError(f"image {i} has dtype {img.dtype}, image 0 has {first.dtype}")
            if img.device != first.device:
                raise ValueError(f"image {i} is on {img.device}, image 0 on {first.device}")

        max_h = max(img.shape[1] for img in tensor_list)
        max_w = max(img.shape[2] for img in tensor_list)
        if size_divisibility > 0:
            max_h = -(-max_h // size_divisibility) * size_divisibility  # ceil to a multiple
            max_w = -(-max_w // size_divisibility) * size_divisibility
        batch = len(tensor_list)
        tensors = first.new_zeros((batch, first.shape[0], max_h, max_w))  # (B, C, H, W)
        mask = torch.ones((batch, max_h, max_w), dtype=torch.bool, device=first.device)  # (B, H, W)
        for img, pad_img, m in zip(tensor_list, tensors, mask, strict=True):
            pad_img[:, : img.shape[1], : img.shape[2]].copy_(img)
            m[: img.shape[1], : img.shape[2]] = False
        return cls(tensors, mask)
