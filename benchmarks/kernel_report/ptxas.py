"""Parsing ``ptxas -v`` output (also what ``nvcc -Xptxas -v`` prints), and the tool's version."""

import re
import shutil
import subprocess

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text):
    """``{entry function (mangled): {"registers", "spill_stores", "spill_loads", "stack_bytes",
    "smem_bytes"}}`` from ``ptxas -v`` output.  ``smem_bytes`` is the static shared memory
    ptxas allocated (dynamic shared memory is the launch's).  Non-entry functions' frames
    (``Function properties for`` a device function) are not kernels and are left out."""
    kernels, frames = {}, {}
    entry = props = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
            kernels[entry] = dict(registers=0, spill_stores=0, spill_loads=0, stack_bytes=0, smem_bytes=0)
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif m := _FRAME.search(line):
            frames[props] = tuple(int(x) for x in m.groups())
        elif (m := _USED.search(line)) and entry is not None:
            kernels[entry]["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                kernels[entry]["smem_bytes"] = int(s.group(1))
    for name, k in kernels.items():
        if name in frames:
            k["stack_bytes"], k["spill_stores"], k["spill_loads"] = frames[name]
    return kernels


def ptxas_version(ptxas):
    """``"13.0.88"`` style version of the ``ptxas`` at that path (its ``V`` line)."""
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def find_ptxas():
    """The CUDA toolkit's ``ptxas`` (``$CUDA_HOME/bin``, ``/usr/local/cuda/bin``, ``PATH``), or None."""
    import os

    for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if d and os.path.exists(os.path.join(d, "bin", "ptxas")):
            return os.path.join(d, "bin", "ptxas")
    return shutil.which("ptxas")


def demangle(names):
    """C++ names of mangled ``names`` (``cu++filt``/``c++filt`` when present; else as given)."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    ptxas = find_ptxas()
    if ptxas and not tool:
        import os

        cand = os.path.join(os.path.dirname(ptxas), "cu++filt")
        tool = cand if os.path.exists(cand) else None
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out, strict=True)) if len(out) == len(names) else {n: n for n in names}
