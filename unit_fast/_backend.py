"""Which backend runs an op on a device (house style section 5).

Backends, in order of preference:
  ``cpp``        the compiled extension: its CPU kernel on CPU, its CUDA kernel on CUDA;
  ``torch``      torch's own fused kernels composed for the op (e.g. ``scaled_dot_product_attention``'s
                 CPU kernels for attention): a fast path where unit_fast has no kernel of its own;
  ``triton``     Triton kernels (CUDA by default; on CPU only when asked for, through the
                 interpreter, ``TRITON_INTERPRET=1`` -- a test device, never a default);
  ``reference``  the pure PyTorch / scipy spec in ``ops/<op>/reference.py``.

``UNIT_FAST_BACKEND=reference|torch|triton|cpp`` (read at every call) or a ``backend=`` argument
forces one; a forced backend that is unavailable raises.  Nothing here touches CUDA.
"""

import importlib.util
import os

import torch

from unit_fast import _ext

BACKENDS = ("cpp", "triton", "torch", "reference")
# Looked up once, at import: under torch.compile a per-call importlib.util.find_spec is a graph
# break in torch 2.11's Dynamo (it skips importlib), which fails fullgraph=True.
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Which backends each op implements, per device type.
OP_BACKENDS = {
    "hungarian_match": {"cpu": ("cpp", "reference"), "cuda": ("cpp", "reference")},
    "pairwise_giou": {"cpu": ("cpp", "reference", "triton"), "cuda": ("triton", "reference")},
    "box_loss": {"cpu": ("cpp", "reference", "triton"), "cuda": ("triton", "reference")},
    "matching_cost": {"cpu": ("cpp", "reference", "triton"), "cuda": ("triton", "reference")},
    "attention": {"cpu": ("torch", "reference", "triton"), "cuda": ("triton", "reference")},
    "moe_dispatch": {"cpu": ("torch", "reference", "triton"), "cuda": ("triton", "torch", "reference")},
}


def triton_on_cpu() -> bool:
    """True when Triton kernels may run on CPU tensors (the interpreter is on)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _missing_reason(backend: str, device_type: str):
    """None if ``backend`` can run on ``device_type`` on this machine, else why not."""
    if backend in ("reference", "torch"):
        return None
    if backend == "cpp":
        if not _ext.HAS_EXT:
            return f"unit_fast._C not loaded ({_ext.EXT_ERROR})"
        if device_type == "cuda" and not _ext.HAS_CUDA_EXT:
            return "unit_fast._C was built without CUDA kernels (rebuild with FORCE_CUDA=1 and nvcc)"
        return None
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device_type == "cpu" and not triton_on_cpu():
            return "Triton runs on CPU only through the interpreter (TRITON_INTERPRET=1)"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _device_type(device) -> str:
    return torch.device(device).type


def backends_for(op: str, device) -> list:
    """Ordered available backends of ``op`` on ``device``; the first is the default.

    Interpreted Triton is listed (for tests) but never first.
    """
    device_type = _device_type(device)
    if op not in OP_BACKENDS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(OP_BACKENDS)}")
    implemented = OP_BACKENDS[op].get(device_type, ("reference",))
    found = [b for b in implemented if _missing_reason(b, device_type) is None]
    if device_type == "cpu" and "triton" in found:
        found.remove("triton")  # interpreted: a test device, so last, never the default
        found.append("triton")
    return found


def missing_backends(op: str, device) -> dict:
    """``{backend: reason}`` for each backend ``op`` implements that cannot run here."""
    device_type = _device_type(device)
    implemented = OP_BACKENDS[op].get(device_type, ("reference",))
    out = {}
    for b in implemented:
        reason = _missing_reason(b, device_type)
        if reason is not None:
            out[b] = reason
    return out


def forced_backend():
    """The backend ``UNIT_FAST_BACKEND`` forces, or None."""
    return os.environ.get("UNIT_FAST_BACKEND") or None


def select_backend(op: str, device, backend=None) -> str:
    """The backend to run now: ``backend`` if given, else ``UNIT_FAST_BACKEND``, else the default."""
    forced = backend if backend is not None else forced_backend()
    available = backends_for(op, device)
    if forced is None:
        return available[0]
    if forced not in BACKENDS:
        raise ValueError(f"unknown backend {forced!r}; expected one of {BACKENDS}")
    if forced not in available:
        device_type = _device_type(device)
        reason = missing_backends(op, device).get(forced, f"{op} has no {forced} kernel on {device_type}")
        raise RuntimeError(f"backend {forced!r} was forced for {op} on {device_type} but is unavailable: {reason}")
    return forced
