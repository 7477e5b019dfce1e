"""Autograd pieces the ops' registrations share."""


def double_backward_raises(name):
    """The autograd formula of an op's backward op (as torchvision registers
    ``_roi_align_backward``'s): asking for a gradient of the gradient raises, naming ``name``."""

    def _double_backward(ctx, *grads):
        raise RuntimeError(f"unit_fast::{name}: double backward (a gradient of its gradient) is not "
                           "implemented; use backend='reference' for higher-order gradients")

    return _double_backward
