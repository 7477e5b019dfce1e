"""Assembles the kernel report: compiles (``triton_build`` in subprocesses, ``cuda_build``),
adds the H100 occupancy of each row, the thresholds that apply to it and, where a row cannot
meet them, the documented reason (``WHY``).  ``failures()`` is what the test asserts empty.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.kernel_report import cuda_build
from benchmarks.kernel_report.occupancy import occupancy
from benchmarks.kernel_report.ptxas import find_ptxas, ptxas_version

ROOT = cuda_build.ROOT
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "kernel_report.json")
MIN_BLOCKS = 2  # resident blocks per SM: attention fwd/bwd and the LSA kernel
MIN_WARP_OCCUPANCY = 0.25  # the LSA kernel's small-problem path
ROLES_MIN_BLOCKS = ("attention_fwd", "attention_bwd", "lsa_small", "lsa_large")


def _eight_warp_register_bound(row):
    """An 8-warp attention config whose registers alone hold it to one block: two blocks of
    256 threads need <= 128 registers per thread, and it uses more without spilling."""
    return (row.get("role") in ("attention_fwd", "attention_bwd") and row["num_warps"] == 8
            and row["registers"] > 128 and row["limited_by"] == "registers"
            and not (row["spill_stores"] or row["spill_loads"]))


def _eight_warp_why(row):
    return ("8 warps: two resident blocks of 256 threads need <= 128 registers/thread (65,536 / 512); these "
            "tiles' fp32 scores and accumulators need more (see regs) without spilling, so one 8-warp block "
            "(8 of 64 warps) is resident.  The same kernels' 4-warp configs keep >= 2 blocks, and the "
            "autotuner picks among them by measured time.")


# Documented exceptions: ``(predicate on a row, reason(row))``.  A row below an occupancy threshold
# must match one (a spill is never excused).  A row gets its reason only while it is below a
# threshold, so a reason that no longer applies drops out of the report.
WHY = [(_eight_warp_register_bound, _eight_warp_why)]


def thresholds(row):
    """Names of the checks that apply to ``row``: every row (each is a config the autotuner can
    pick, or a fixed launch) must not spill; some must keep 2 blocks / 25% warps resident."""
    out = ["no_spill"]
    if row.get("role") in ROLES_MIN_BLOCKS:
        out.append(f"blocks_per_sm>={MIN_BLOCKS}")
    if row.get("role") == "lsa_small":
        out.append(f"warp_occupancy>={MIN_WARP_OCCUPANCY:.0%}")
    return out


def violations(row):
    """The thresholds ``row`` misses (spills always count; occupancy only where it applies)."""
    if "error" in row:
        return ["error"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append("no_spill")
    checks = thresholds(row)
    if f"blocks_per_sm>={MIN_BLOCKS}" in checks and row["blocks_per_sm"] < MIN_BLOCKS:
        out.append(f"blocks_per_sm>={MIN_BLOCKS}")
    if f"warp_occupancy>={MIN_WARP_OCCUPANCY:.0%}" in checks and row["warp_occupancy"] < MIN_WARP_OCCUPANCY:
        out.append(f"warp_occupancy>={MIN_WARP_OCCUPANCY:.0%}")
    return out


def finish_row(row, why=None):
    """Adds occupancy, thresholds and (for a row below its occupancy threshold) the reason."""
    why = WHY if why is None else why
    row.pop("why", None)  # recomputed: finishing a row twice gives the same row
    row["thresholds"] = thresholds(row)
    if "error" in row:
        return row
    threads = row["num_warps"] * 32
    shared = row["smem_bytes"] + row["dynamic_shared"]
    occ = occupancy(threads, row["registers"], shared)
    row.update(shared_bytes=shared, blocks_per_sm=occ.blocks_per_sm,
               warp_occupancy=round(occ.warp_occupancy, 4), limited_by=occ.limited_by)
    low = [v for v in violations(row) if v != "no_spill"]  # a spill is never excused
    reasons = [text(row) for pred, text in why if pred(row)]
    if low and reasons:
        row["why"] = " ".join(reasons)
    return row


def failures(report):
    """Messages for every row that misses a threshold without a documented reason, spills, did
    not compile, or carries a reason it no longer needs."""
    out = []
    for row in report["kernels"]:
        label = f"{row['name']} {row.get('config')} ({', '.join(row.get('settings', []))})"
        missed = violations(row)
        if "error" in row:
            out.append(f"{label}: did not compile: {row['error'].strip().splitlines()[-1][:400]}")
            continue
        if "no_spill" in missed:
            out.append(f"{label}: spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded")
        low = [v for v in missed if v != "no_spill"]
        if low and not row.get("why", "").strip():
            out.append(f"{label}: below {low} ({row['blocks_per_sm']} blocks/SM, {row['warp_occupancy']:.0%} "
                       f"warps, limited by {row['limited_by']}) with no documented why")
        if not low and row.get("why"):
            out.append(f"{label}: has a why but meets its thresholds: {row['why']}")
    return out


def _triton_rows(full, ptxas, jobs):
    """Rows of ``triton_build``, run as ``jobs`` shards (subprocesses, stdout to files so that no
    shard waits on a full pipe), in a throwaway Triton cache so that every kernel compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tmp = tempfile.mkdtemp(prefix="kernel_report_")
    env.update(TRITON_PTXAS_PATH=ptxas, TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1",
               TRITON_CACHE_DIR=os.path.join(tmp, "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "benchmarks.kernel_report.triton_build", *(["--all"] if full else [])]
    rows = []
    try:
        files = [(open(os.path.join(tmp, f"{i}.out"), "w+"), open(os.path.join(tmp, f"{i}.err"), "w+"))
                 for i in range(jobs)]
        procs = [subprocess.Popen([*cmd, "--shard", f"{i}/{jobs}"], cwd=ROOT, env=env, stdout=out, stderr=err,
                                  text=True) for i, (out, err) in enumerate(files)]
        for p, (out, err) in zip(procs, files, strict=True):
            p.wait(timeout=3600)
            out.seek(0)
            err.seek(0)
            if p.returncode != 0:
                raise RuntimeError(f"triton_build failed ({p.returncode}):\n{err.read()[-4000:]}")
            rows += [json.loads(line) for line in out if line.startswith("{")]
            out.close()
            err.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    order = {"attention_fwd": 0, "attention_bwd_dkdv": 1, "attention_bwd_dq": 2}
    return sorted(rows, key=lambda r: (order.get(r["name"], 9), r["name"], r["settings"][0],
                                       json.dumps(r["config"], sort_keys=True)))


def build(full=False, ptxas=None, jobs=None):
    """The report dict (see the package docstring); compiles everything, so it takes minutes."""
    import triton

    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise RuntimeError("no ptxas: set CUDA_HOME or put the CUDA toolkit's bin on PATH")
    jobs = jobs or min(2, os.cpu_count() or 1)
    t0 = time.time()
    rows = _triton_rows(full, ptxas, jobs)
    t1 = time.time()
    rows += cuda_build.lsa_rows(cuda_build.nvcc_path(ptxas))
    t2 = time.time()
    return dict(triton=triton.__version__, ptxas=ptxas_version(ptxas), arch="sm_90", gpu="H100 (sm_90)",
                subset="all" if full else "default",
                compile_s=dict(triton=round(t1 - t0, 1), cuda=round(t2 - t1, 1)),
                kernels=[finish_row(r) for r in rows])


def write(report, path=DEFAULT_OUT):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def _config_text(row):
    c = row.get("config", {})
    if "BLOCK_M" in c and "BLOCK_N" in c:
        stages = f" s{c['num_stages']}" if c.get("num_stages") is not None else ""
        return f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c.get('num_warps')}{stages}"
    if "threads" in c:
        blocks = f" x {c['cluster_blocks']} blocks" if "cluster_blocks" in c else ""
        return f"{c['B']}x{c['Q']}x{c['T']}, {c['threads']} threads{blocks}, {c['workspace']} ws"
    tiles = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK_"))
    stages = f" s{c['num_stages']}" if c.get("num_stages") is not None else ""
    return f"{tiles} w{c.get('num_warps')}{stages}"


def _span(values, fmt=str):
    lo, hi = min(values), max(values)
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def table(report, detail=False):
    """Markdown.  ``detail``: one line per compiled config; otherwise one per kernel and setting,
    with ranges over its configs (the autotuned ones: every config the autotuner can pick)."""
    groups = {}
    for row in report["kernels"]:
        config = json.dumps(row.get("config"), sort_keys=True) if detail or not row["tuned"] else ""
        key = (row["name"], ", ".join(row["settings"]), config)
        groups.setdefault(key, []).append(row)
    lines = [f"Compiled for {report['arch']} with Triton {report['triton']} and ptxas {report['ptxas']}, "
             f"no GPU (`python -m benchmarks.kernel_report`, {report['subset']} set); occupancy on an H100.",
             "",
             "| kernel | setting | config | regs | spills st/ld (B) | smem (B) | blocks/SM | warps "
             "| limited by |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for (name, setting, config), rows in groups.items():
        bad = [r for r in rows if "error" in r]
        ok = [r for r in rows if "error" not in r]
        config = _config_text(rows[0]) if config else (
            f"{len(rows)} autotune configs" + (f" ({len(bad)} failed to compile)" if bad else ""))
        if not ok:
            lines.append(f"| {name} | {setting} | {config} | did not compile | | | | | |")
            continue
        spilling = [r for r in ok if r["spill_stores"] or r["spill_loads"]]
        spills = "0/0" if not spilling else (
            f"{max(r['spill_stores'] for r in spilling)}/{max(r['spill_loads'] for r in spilling)}"
            + (f" in {len(spilling)}" if len(ok) > 1 else ""))
        blocks = _span([r["blocks_per_sm"] for r in ok]) + (" *" if any(r.get("why") for r in ok) else "")
        limited = "/".join(sorted({r["limited_by"] for r in ok}))
        lines.append(f"| {name} | {setting} | {config} | {_span([r['registers'] for r in ok])} | {spills} | "
                     f"{_span([r['shared_bytes'] for r in ok])} | {blocks} | "
                     f"{_span([r['warp_occupancy'] for r in ok], lambda v: f'{v:.0%}')} | {limited} |")
    whys = sorted({row["why"] for row in report["kernels"] if row.get("why")})
    if whys:
        lines += ["", "\\* some configs are below 2 blocks/SM, documented:"] + [f"- {w}" for w in whys]
    if not detail:
        lines += ["", "Spills \"a/b in n\": the largest spill of n configs.  Per-config rows: "
                  "`python -m benchmarks.kernel_report --detail` or the JSON."]
    return "\n".join(lines)
