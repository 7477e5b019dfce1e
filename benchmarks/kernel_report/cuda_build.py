"""The CUDA LSA kernels (``csrc/ops/cuda/hungarian_match_kernel.cu``): compiled for sm_90 with
``nvcc -Xptxas -v`` (setup.py's flags and include dirs), and their launch configuration at each
problem size from the sources themselves: ``threads_for`` (copied out of the .cu),
``lsa::workspace_bytes`` and ``lsa::warp_slice_bytes<float>`` (``hungarian_match_core.h``) are
compiled into a small host program; the launcher's choice between the warp path (one warp per
problem, ``hungarian_match_warp_kernel``) and the block path is mirrored in ``launch_plan``.
"""

import os
import re
import subprocess
import sysconfig
import tempfile

from benchmarks.kernel_report.ptxas import demangle, parse_ptxas

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join("csrc", "ops", "cuda", "hungarian_match_kernel.cu")
KERNEL = "hungarian_match_forward_kernel_impl"  # the block path
WARP_KERNEL = "hungarian_match_warp_kernel"  # the warp path
H100_SMS = 132
WARP_PATH_MIN_WARPS = 16  # kWarpPathMinWarps in the .cu launcher
BATCH = 64  # the batch the warp path's problems-per-block is planned for (DETR's B 64)
H100_SMEM_OPTIN = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 / H200
# (setting, Q, T, thresholds apply): UniT's matcher sizes and DINO's (the block path) are
# checked; the rest show the other launch paths (benchmarks/shapes.py LSA_SHAPES; wide problems for the 256-thread path and for
# the global-memory workspace past the shared-memory limit).
LSA_SIZES = [("detr_coco (100x20)", 100, 20, True), ("rtdetr (300x100)", 300, 100, True),
             ("detr_coco_dense (100x50)", 100, 50, False), ("dino_900q (900x100)", 900, 100, True),
             ("square_1000 (1000x1000)", 1000, 1000, False), ("wide (100x4096)", 100, 4096, False),
             ("huge (100x8192)", 100, 8192, False)]
DTYPE = "float"  # the matcher's cost is float32 (matching_cost's output)


def nvcc_path(ptxas):
    return os.path.join(os.path.dirname(ptxas), "nvcc")


def compile_lsa(nvcc):
    """``(ptxas -v log, command)`` of the .cu compiled to an sm_90 cubin."""
    import torch

    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    with tempfile.TemporaryDirectory() as d:
        includes = [os.path.join(ROOT, "csrc"), inc, os.path.join(inc, "torch", "csrc", "api", "include"),
                    sysconfig.get_paths()["include"]]
        cmd = [nvcc, "-arch=sm_90", "--cubin", "-Xptxas", "-v", "-O3", "-std=c++20",
               "--expt-relaxed-constexpr", "-lineinfo", "-DWITH_CUDA", *(f"-I{i}" for i in includes),
               "-o", os.path.join(d, "lsa.cubin"), os.path.join(ROOT, SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def launch_sizes(sizes):
    """``[(threads_for(C), workspace_bytes(R, C), warp_slice_bytes<float>(R, C))]`` for each
    ``(Q, T)``, from the sources."""
    with open(os.path.join(ROOT, SOURCE)) as f:
        m = re.search(r"int threads_for\([^)]*\)\s*\{[^}]*\}", f.read())
    if m is None:
        raise RuntimeError(f"threads_for not found in {SOURCE}")
    prog = "\n".join([
        "#include <algorithm>", "#include <cstdint>", "#include <cstdio>",
        '#include "ops/hungarian_match_core.h"',
        "namespace unit_fast { namespace ops {", m.group(0), "} }",
        "int main() {",
        *[f"  {{ const int64_t R = std::min<int64_t>({q}, {t}), C = std::max<int64_t>({q}, {t});"
          f' std::printf("%d %zu %zu\\n", unit_fast::ops::threads_for(C),'
          f" unit_fast::lsa::workspace_bytes(R, C), unit_fast::lsa::warp_slice_bytes<float>(R, C)); }}"
          for q, t in sizes],
        "}"])
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "lsa_launch.cpp"), os.path.join(d, "lsa_launch")
        with open(src, "w") as f:
            f.write(prog)
        subprocess.run(["c++", "-std=c++17", "-O0", "-I" + os.path.join(ROOT, "csrc"), src, "-o", exe],
                       check=True, capture_output=True, text=True)
        printed = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    out = [int(x) for x in printed.split()]
    return [tuple(out[3 * i:3 * i + 3]) for i in range(len(sizes))]


def launch_plan(threads, workspace, slice_bytes, batch=BATCH, sms=H100_SMS, optin=H100_SMEM_OPTIN):
    """The .cu launcher's choice, mirrored: ``(path, threads per block, dynamic shared bytes,
    workspace)``.  Warp path while ``WARP_PATH_MIN_WARPS`` slices fit ``optin - 1024``:
    ``clamp(ceil(B / SMs), 1, 4)`` warps a block, capped by the shared memory; else one block of
    ``threads_for(C)`` threads per problem, its workspace in shared memory when it fits."""
    budget = optin - 1024
    if slice_bytes * WARP_PATH_MIN_WARPS <= budget:
        warps = min(4, max(1, -(-batch // sms)), budget // slice_bytes)
        return "warp", 32 * warps, slice_bytes * warps, "shared"
    shared_ws = workspace + 1024 <= optin
    return "block", threads, workspace if shared_ws else 0, "shared" if shared_ws else "global"


def lsa_rows(nvcc):
    """One row per LSA size: the template instance its launch uses (shared or global workspace),
    its ptxas usage, and the launch's threads and dynamic shared memory."""
    kernels = parse_ptxas(compile_lsa(nvcc))
    names = demangle(list(kernels))
    by_template, warp_usage = {}, None
    for mangled, usage in kernels.items():
        m = re.search(KERNEL + r"<([^,>]+), *(true|false)>", names[mangled])
        if m:
            by_template[(m.group(1).strip(), m.group(2) == "true")] = usage
        if re.search(WARP_KERNEL + r"<" + DTYPE + r">", names[mangled]):
            warp_usage = usage
    rows = []
    sizes = launch_sizes([(q, t) for _, q, t, _ in LSA_SIZES])
    for (setting, q, t, checked), size in zip(LSA_SIZES, sizes, strict=True):
        path, threads, dyn, workspace = launch_plan(*size)
        if path == "warp":
            usage = warp_usage
            name, source = "hungarian_match_lsa[warp]", f"{SOURCE}::{WARP_KERNEL}<{DTYPE}>"
            role = "lsa_small" if checked else None
        else:
            usage = by_template.get((DTYPE, workspace == "shared"))
            name = "hungarian_match_lsa[block]"
            source = f"{SOURCE}::{KERNEL}<{DTYPE}, {str(workspace == 'shared').lower()}>"
            role = "lsa_large" if checked else None
        row = dict(name=name, source=source,
                   config=dict(Q=q, T=t, B=BATCH, threads=threads, dynamic_shared=dyn, workspace=workspace,
                               dtype=DTYPE),
                   settings=[setting], role=role, tuned=False)
        if usage is None:
            row["error"] = f"{source} not in the ptxas log ({sorted(names.values())})"
        else:
            row.update(num_warps=-(-threads // 32), dynamic_shared=dyn, **usage)
        rows.append(row)
    return rows
