"""``python -m unit_fast.env``: versions, and which backend each op has on each device."""

import importlib.metadata
import platform
import sys

import torch

from unit_fast import _backend, _ext


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [
        f"unit_fast        {_version('unit_fast')}",
        f"python           {sys.version.split()[0]} ({platform.machine()})",
        f"torch            {torch.__version__} (built with CUDA {torch.version.cuda})",
        f"CUDA device      {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        f"triton           {_version('triton')}",
    ]
    if _ext.HAS_EXT:
        cuda = f"CUDA kernels, CUDA runtime {_ext.EXT_CUDA_VERSION}" if _ext.HAS_CUDA_EXT else "CPU kernels only"
        lines.append(f"extension        unit_fast._C loaded ({cuda})")
        # Which build of the CPU solver's float path runs (UNIT_FAST_CPU_ISA=generic forces it).
        lines.append(f"CPU LSA build    {torch.ops.unit_fast._lsa_cpu_isa()}")
    else:
        lines.append(f"extension        not loaded: {_ext.EXT_ERROR}")
    lines.append("")
    lines.append("op                 device  backends (first = default)   missing")
    for op in sorted(_backend.OP_BACKENDS):
        for device in ("cpu", "cuda"):
            found = ", ".join(_backend.backends_for(op, device))
            missing = "; ".join(f"{b}: {why}" for b, why in _backend.missing_backends(op, device).items())
            lines.append(f"{op:<18} {device:<7} {found:<28} {missing or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
