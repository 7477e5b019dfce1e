"""Functional forms of ``unit_fast.nn`` modules (as ``torch.nn.functional``)."""

from unit_fast.ops.attention.op import attention

__all__ = ["attention"]
