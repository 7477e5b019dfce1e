"""Drop-in ``torch.nn`` modules backed by unit_fast kernels (the functions they run are in ``ops/``)."""

from unit_fast.nn import functional
from unit_fast.nn.box_loss import BoxLoss
from unit_fast.nn.hungarian_matcher import HungarianMatcher
from unit_fast.nn.multihead_attention import MultiheadAttention, patch_attention

__all__ = ["BoxLoss", "HungarianMatcher", "MultiheadAttention", "functional", "patch_attention"]
