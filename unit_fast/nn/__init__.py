"""Drop-in ``torch.nn`` modules backed by unit_fast kernels."""

from unit_fast.nn import functional
from unit_fast.nn.multihead_attention import MultiheadAttention, patch_attention

__all__ = ["MultiheadAttention", "functional", "patch_attention"]
