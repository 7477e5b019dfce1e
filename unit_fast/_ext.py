"""Loads the compiled extension ``unit_fast._C`` once (torchvision ``extension.py`` style).

Importing ``_C`` runs its ``TORCH_LIBRARY`` registrations: the schemas of the C++ ops and
their CPU (and, in a CUDA build, CUDA) kernels.  When it cannot be loaded -- not built
(``UNIT_FAST_SKIP_EXT=1``), or built against another torch -- the package still imports, the
ops fall back to their next backend, and one warning says why (unless the pure-Python
install was asked for, in which case ``UNIT_FAST_SKIP_EXT=1`` at run time silences it).
``python -m unit_fast.env`` prints the recorded reason.
"""

import os
import warnings

import torch

HAS_EXT = False
HAS_CUDA_EXT = False
EXT_CUDA_VERSION = None  # CUDART_VERSION the extension was compiled with, e.g. 13000
EXT_ERROR = None  # why the extension is missing, as text


def _load():
    global HAS_EXT, HAS_CUDA_EXT, EXT_CUDA_VERSION, EXT_ERROR
    try:
        from unit_fast import _C  # noqa: F401  (import for its op registrations)

        version = int(torch.ops.unit_fast._cuda_version())
    except (ImportError, OSError, RuntimeError, AttributeError) as exc:
        EXT_ERROR = f"{type(exc).__name__}: {exc}"
        if os.environ.get("UNIT_FAST_SKIP_EXT", "0") != "1":
            warnings.warn(
                f"unit_fast._C could not be loaded ({EXT_ERROR}); unit_fast falls back to its pure "
                "PyTorch/scipy reference kernels, which are much slower. Rebuild with "
                "`pip install --no-build-isolation .` against the installed torch "
                f"({torch.__version__}). Set UNIT_FAST_SKIP_EXT=1 to silence this warning.",
                RuntimeWarning,
                stacklevel=3,
            )
        return
    HAS_EXT = True
    if version > 0:
        HAS_CUDA_EXT = True
        EXT_CUDA_VERSION = version


_load()
