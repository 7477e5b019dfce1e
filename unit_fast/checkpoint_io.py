"""Reading checkpoint files without running their code: the one place every load goes through.

``torch.load(weights_only=False)`` unpickles a file, and a pickle can call any function: a
checkpoint from a stranger would run its payload the moment it is loaded.  So every file is read
with ``weights_only=True`` (torch's restricted unpickler: tensors, containers, numbers, strings)
plus the short allowlist below of exactly the foreign classes that real UniT / DETR checkpoints
hold besides their weights.  Anything else is refused before a single object is built, with one
line naming the class.  A full unpickle happens only when the caller says it trusts the file
(``trust=True``; on the command line ``--trust-checkpoint``).

``.safetensors`` files (no pickle at all) are read as ``{"model": tensors, **metadata}``; the
metadata values unit_fast writes are JSON (``save_safetensors``).
"""

import argparse
import collections
import contextlib
import contextvars
import json
import os
import re
import typing
import warnings
import zipfile

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, not a checkpoint, or refused."""


class UntrustedCheckpointError(CheckpointError):
    """The file's pickle needs a class outside the allowlist; loading it could run code."""


class _Foreign:
    """Inert stand-in for a class of another library (omegaconf): built from its pickled state
    without importing that library or calling any of its code; ``plain()`` turns it into
    dicts / lists / values."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state):
        self.state = state


def _stand_in(name):
    return type(name.rsplit(".", 1)[1], (_Foreign,), {"__module__": __name__, "origin": name})


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    return core.multiarray._reconstruct


# Every class a checkpoint may hold besides tensors and plain containers, and where it comes from.
# (object, the name the pickle refers to it by)
ALLOWED_GLOBALS = [
    # MMF's checkpoint "config" entry: an omegaconf DictConfig (omegaconf 2.x pickles these five
    # classes and typing.Any).  Loaded as inert stand-ins: omegaconf need not be installed.
    *[(_stand_in(n), n) for n in ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
                                  "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
                                  "omegaconf.nodes.AnyNode")],
    (typing.Any, "typing.Any"),  # omegaconf metadata's key / element type
    # omegaconf metadata names the node's Python types and keeps a defaultdict(dict) cache.
    (dict, "builtins.dict"), (list, "builtins.list"), (int, "builtins.int"), (float, "builtins.float"),
    (str, "builtins.str"), (bool, "builtins.bool"), (collections.defaultdict, "collections.defaultdict"),
    # DETR's checkpoint "args": the argparse Namespace of its command line.
    (argparse.Namespace, "argparse.Namespace"),
    # unit_fast trainer checkpoints written before the RNG states were stored as plain values held
    # numpy's RNG state as an ndarray (converted on read, training/checkpoint.py).  Array data
    # only: an object array's items go through this same restricted unpickler.
    (_numpy_reconstruct(), "numpy._core.multiarray._reconstruct"),
    (_numpy_reconstruct(), "numpy.core.multiarray._reconstruct"),
    (np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype"),
    (type(np.dtype(np.uint32)), "numpy.dtypes.UInt32DType"),  # MT19937's key array
]
_ALLOWED_NAMES = frozenset(name for _, name in ALLOWED_GLOBALS)

_trust = contextvars.ContextVar("unit_fast_trust_checkpoint", default=False)


@contextlib.contextmanager
def trusting(trust=True):
    """Within this block, loads called with ``trust=None`` use ``trust`` (how ``build_model``
    passes ``trust`` down to the backbone's weights file without a parameter on every module)."""
    token = _trust.set(bool(trust))
    try:
        yield
    finally:
        _trust.reset(token)


def plain(obj):
    """``obj`` with the stand-ins replaced by plain values: an omegaconf node by its value, a
    DictConfig by a dict, a ListConfig by a list, a Namespace by a dict."""
    if isinstance(obj, _Foreign):
        state = getattr(obj, "state", None) or {}
        content = state.get("_content", state.get("_val"))
        return plain(content)
    if isinstance(obj, argparse.Namespace):
        return plain(vars(obj))
    if isinstance(obj, dict) and not isinstance(obj, collections.OrderedDict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


def _is_zip(path):
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _refused(path, names):
    shown = ", ".join(sorted(names))
    return UntrustedCheckpointError(
        f"checkpoint {path!r} was not loaded: its pickle needs {shown}, which is not on unit_fast's "
        "allowlist (unit_fast/checkpoint_io.py) and could run code; if you trust where the file "
        "comes from, pass --trust-checkpoint (trust=True)")


def _load_safetensors(path):
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r} is not a readable safetensors file ({exc})") from None
    out = {"model": tensors}
    for key, value in metadata.items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value  # metadata written by other tools: plain strings
    return out


def load(path, *, trust=None, what="checkpoint"):
    """Read a checkpoint file onto the CPU without running code from it.

    Args:
        path: a ``torch.save`` file (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) or ``.safetensors``.
        trust: True unpickles everything (only for files the user trusts); None: the value of the
            enclosing ``trusting()`` block, else False.
        what: how messages name the file (e.g. ``"backbone weights"``).

    Returns:
        The loaded object, stand-ins for foreign classes already made plain (``plain``).

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: the pickle needs a class outside ``ALLOWED_GLOBALS``.
        CheckpointError: truncated, corrupt, or not a checkpoint.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    trust = _trust.get() if trust is None else trust
    if trust:
        warnings.warn(f"{what} {path!r}: fully unpickled because it is trusted (--trust-checkpoint)",
                      stacklevel=2)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a trusted file can still be torn: same message as below
            raise CheckpointError(f"{what} {path!r} is truncated or not a torch checkpoint "
                                  f"({_first_line(exc)})") from None
    if _is_zip(path):
        # Scan the pickle's opcodes first: no object is built from a file that needs more.
        try:
            needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as exc:
            raise CheckpointError(f"{what} {path!r} is truncated or not a torch checkpoint "
                                  f"({_first_line(exc)})") from None
        if needed - _ALLOWED_NAMES:
            raise _refused(path, needed - _ALLOWED_NAMES)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # Files in torch's legacy (pre-zip) format cannot be scanned: the unpickler refuses there.
        text = str(exc)
        found = (re.findall(r"GLOBAL ([\w.]+) was not an allowed global", text)
                 or re.findall(r"unsupported GLOBAL ([\w.]+)", text)
                 or re.findall(r"allowlisted via `add_safe_globals`, but got <class '([\w.]+)'>", text))
        if found:
            raise _refused(path, found) from None
        raise CheckpointError(f"{what} {path!r} is truncated or not a torch checkpoint "
                              f"({_first_line(exc)})") from None
    return plain(obj)


def _first_line(exc):
    """The informative line of ``exc``: torch's weights-only errors open with boilerplate."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    lines = [x for x in lines if not x.startswith(("Weights only load failed", "Check the documentation",
                                                     "Please file an issue"))] or lines
    line = lines[0] if lines else type(exc).__name__
    return line.split(". ", 1)[0][:300]  # torch's zip errors go on for several sentences


def save_safetensors(path, tensors, metadata=None):
    """Write ``tensors`` (``{name: tensor}``) and ``metadata`` (``{key: JSON-able}``) to a
    ``.safetensors`` file atomically.  Tensors that share storage (MMF's BERT alias keys, the
    shared decoder's duplicates) are written once each under every name (copies)."""
    from safetensors.torch import save

    from unit_fast.atomic import atomic_write

    ptrs, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        shared = ptr in ptrs and t.numel() > 0
        ptrs.add(ptr)
        out[name] = t.clone().contiguous() if shared or not t.is_contiguous() else t
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, save(out, metadata=meta))
