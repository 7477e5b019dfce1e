"""The CUDA LSA kernels (``csrc/ops/cuda/hungarian_match_kernel.cu``): compiled for sm_90 with
``nvcc -Xptxas -v`` (setup.py's flags and include dirs), and their launch configuration at each
problem size from the sources themselves: ``threads_for``, ``cluster_blocks`` and
``cluster_threads`` (copied out of the .cu), ``lsa::workspace_bytes`` and
``lsa::warp_slice_bytes<float>`` (``hungarian_match_core.h``) are compiled into a small host
program; the launcher's choice between the warp path (one warp per problem,
``hungarian_match_warp_kernel``), the cluster path (``hungarian_match_cluster_kernel``, K blocks
per problem) and the block path is mirrored in ``launch_plan``.
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
CLUSTER_KERNEL = "hungarian_match_cluster_kernel"  # the cluster path
H100_SMS = 132
WARP_PATH_MIN_WARPS = 16  # kWarpPathMinWarps in the .cu launcher
BATCH = 64  # the batch the warp path's problems-per-block is planned for (DETR's B 64)
H100_SMEM_OPTIN = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 / H200
# (setting, Q, T, thresholds apply, batch): UniT's matcher sizes and DINO's (the block path) are
# checked at BATCH; the 8 x 1000 x 1000 and DINO at 16 problems (the cluster path) too;
# the rest show the other launch paths (benchmarks/shapes.py LSA_SHAPES; wide problems for the
# 256-thread path and for the global-memory workspace past the shared-memory limit).
LSA_SIZES = [("detr_coco (100x20)", 100, 20, True, BATCH), ("rtdetr (300x100)", 300, 100, True, BATCH),
             ("detr_coco_dense (100x50)", 100, 50, False, BATCH),
             ("dino_900q (900x100)", 900, 100, True, BATCH), ("dino_900q x16 (900x100)", 900, 100, True, 16),
             ("square_1000 (1000x1000)", 1000, 1000, False, BATCH),
             ("square_1000 x8 (1000x1000)", 1000, 1000, True, 8),
             ("wide (100x4096)", 100, 4096, False, BATCH), ("huge (100x8192)", 100, 8192, False, BATCH)]
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


def launch_sizes(sizes, sms=H100_SMS):
    """``[(threads_for(C), workspace_bytes(R, C), warp_slice_bytes<float>(R, C),
    (cluster_blocks(B, C, sms), cluster_threads(C, K)))]`` for each ``(Q, T, B)``, from the
    sources (``UNIT_FAST_LSA_CLUSTER`` unset: the default choice)."""
    with open(os.path.join(ROOT, SOURCE)) as f:
        text = f.read()
    m = re.search(r"int threads_for\([^)]*\)\s*\{[^}]*\}", text)
    c = re.search(r"constexpr int64_t kClusterMinCols.*?int cluster_threads\([^)]*\)\s*\{[^}]*\}", text, re.S)
    if m is None or c is None:
        raise RuntimeError(f"threads_for / cluster_blocks / cluster_threads not found in {SOURCE}")
    prog = "\n".join([
        "#include <algorithm>", "#include <cstdint>", "#include <cstdio>", "#include <cstdlib>",
        '#include "ops/hungarian_match_core.h"',
        "namespace unit_fast { namespace ops {", m.group(0), c.group(0), "} }",
        "using namespace unit_fast::ops;",
        "int main() {",
        *[f"  {{ const int64_t R = std::min<int64_t>({q}, {t}), C = std::max<int64_t>({q}, {t});"
          f" const int k = cluster_blocks({b}, C, {sms});"
          f' std::printf("%d %zu %zu %d %d\\n", threads_for(C),'
          f" unit_fast::lsa::workspace_bytes(R, C), unit_fast::lsa::warp_slice_bytes<float>(R, C), k,"
          f" cluster_threads(C, k)); }}"
          for q, t, b in sizes],
        "}"])
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "lsa_launch.cpp"), os.path.join(d, "lsa_launch")
        with open(src, "w") as f:
            f.write(prog)
        proc = subprocess.run(["c++", "-std=c++17", "-O0", "-I" + os.path.join(ROOT, "csrc"), src, "-o", exe],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the launch-size program did not compile:\n{proc.stderr[-3000:]}")
        env = {k: v for k, v in os.environ.items() if k != "UNIT_FAST_LSA_CLUSTER"}
        printed = subprocess.run([exe], check=True, capture_output=True, text=True, env=env).stdout
    out = [int(x) for x in printed.split()]
    return [(*out[5 * i:5 * i + 3], tuple(out[5 * i + 3:5 * i + 5])) for i in range(len(sizes))]


def launch_plan(threads, workspace, slice_bytes, cluster=(1, 0), batch=BATCH, sms=H100_SMS,
                optin=H100_SMEM_OPTIN):
    """The .cu launcher's choice, mirrored: ``(path, threads per block, dynamic shared bytes,
    workspace)``.  Warp path while ``WARP_PATH_MIN_WARPS`` slices fit ``optin - 1024``:
    ``clamp(ceil(B / SMs), 1, 4)`` warps a block, capped by the shared memory; else, with
    ``cluster = (K, T)`` and K >= 2 (``cluster_blocks``), K blocks of T threads per problem
    (every block has the dynamic shared memory; the leader's holds the workspace); else one
    block of ``threads_for(C)`` threads per problem, its workspace in shared memory when it
    fits.  (On the GPU the cluster path also needs sm_90 and a resident cluster of K; this
    mirrors the H100's choice.)"""
    budget = optin - 1024
    if slice_bytes * WARP_PATH_MIN_WARPS <= budget:
        warps = min(4, max(1, -(-batch // sms)), budget // slice_bytes)
        return "warp", 32 * warps, slice_bytes * warps, "shared"
    shared_ws = workspace + 1024 <= optin
    k, cluster_threads = cluster
    if k >= 2:
        threads = cluster_threads
    return ("cluster" if k >= 2 else "block", threads, workspace if shared_ws else 0,
            "shared" if shared_ws else "global")


def lsa_rows(nvcc):
    """One row per LSA size: the template instance its launch uses (shared or global workspace),
    its ptxas usage, and the launch's threads and dynamic shared memory."""
    kernels = parse_ptxas(compile_lsa(nvcc))
    names = demangle(list(kernels))
    by_template, warp_usage = {}, None
    for mangled, usage in kernels.items():
        for path, kernel in (("block", KERNEL), ("cluster", CLUSTER_KERNEL)):
            m = re.search(kernel + r"<([^,>]+), *(true|false)>", names[mangled])
            if m:
                by_template[(path, m.group(1).strip(), m.group(2) == "true")] = usage
        if re.search(WARP_KERNEL + r"<" + DTYPE + r">", names[mangled]):
            warp_usage = usage
    rows = []
    sizes = launch_sizes([(q, t, b) for _, q, t, _, b in LSA_SIZES])
    for (setting, q, t, checked, batch), size in zip(LSA_SIZES, sizes, strict=True):
        path, threads, dyn, workspace = launch_plan(*size, batch=batch)
        extra = {}
        if path == "warp":
            usage = warp_usage
            name, source = "hungarian_match_lsa[warp]", f"{SOURCE}::{WARP_KERNEL}<{DTYPE}>"
            role = "lsa_small" if checked else None
        else:
            usage = by_template.get((path, DTYPE, workspace == "shared"))
            name = f"hungarian_match_lsa[{path}]"
            kernel = KERNEL if path == "block" else CLUSTER_KERNEL
            source = f"{SOURCE}::{kernel}<{DTYPE}, {str(workspace == 'shared').lower()}>"
            role = "lsa_large" if checked else None
            if path == "cluster":
                extra = dict(cluster_blocks=size[3][0])
        row = dict(name=name, source=source,
                   config=dict(Q=q, T=t, B=batch, threads=threads, **extra, dynamic_shared=dyn,
                               workspace=workspace, dtype=DTYPE),
                   settings=[setting], role=role, tuned=False)
        if usage is None:
            row["error"] = f"{source} not in the ptxas log ({sorted(names.values())})"
        else:
            row.update(num_warps=-(-threads // 32), dynamic_shared=dyn, **usage)
        rows.append(row)
    return rows
