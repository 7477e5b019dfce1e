"""``python -m benchmarks.gpu_check [--quick] [--out DIR] [--only TOPIC ...] [--dry-run]``

Runs the plan (plan.py) on a CUDA machine where unit_fast is installed
(``pip install --no-build-isolation --no-deps -e .``): correctness checks first, then
compute-sanitizer on the LSA kernel, then the benchmarks with their baselines.  Writes one
``<date>-<gpu>-<topic>.json`` per topic under ``--out`` and a summary table on stdout.

Exit status: 0 when every check passed or was skipped with its reason; 1 when a check failed;
3 when there is no CUDA device (nothing was checked: use ``--dry-run`` on a CPU).  Benchmarks
whose estimated time no longer fits ``--budget-s`` are skipped, never the checks.
"""

import argparse
import os
import platform
import sys
import time
from importlib import metadata

from benchmarks.gpu_check import plan as P
from benchmarks.gpu_check.report import Check, Run, exit_code, results_files, summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the short plan (<= 3 min)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="results folder")
    parser.add_argument("--only", action="append", choices=P.TOPICS, metavar="TOPIC",
                        help=f"run only this topic (repeatable): {', '.join(P.TOPICS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds the check may take before remaining benchmarks are skipped "
                             "(default: the plan's budget, less the build for the full plan)")
    return parser.parse_args(argv)


def _meta():
    import torch

    from benchmarks.conftest import _git_head

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"commit": _git_head(), "device": torch.cuda.get_device_name(),
            "versions": {"torch": torch.__version__, "triton": version("triton"), "cuda": torch.version.cuda,
                         "python": platform.python_version()}}


def _dispatch(item, run, quick):
    if item.kind == "check":
        from benchmarks.gpu_check.correctness import run_check

        run_check(item, run)
    elif item.kind == "sanitizer":
        from benchmarks.gpu_check.sanitizer import run_sanitizer

        run_sanitizer(item, run, quick)
    else:
        from benchmarks.gpu_check.bench import BENCHES

        BENCHES[item.topic](item, run)


def run_plan(items, quick, budget_s, dispatch=_dispatch, clock=time.monotonic):
    """Runs ``items`` in order into a ``Run``.  A skipped item is recorded with its reason; a
    benchmark that would end past ``budget_s`` is skipped; an item that raises is a failure."""
    run = Run()
    start = clock()
    for it in items:
        if it.skip:
            if it.kind == "bench":
                run.add_skip(it.topic, it.key, it.skip)
            else:
                run.checks.append(Check(it.topic, it.name, "skip", detail=it.skip))
                print(f"  skipped: {it.key}: {it.skip}", flush=True)
            continue
        left = budget_s - (clock() - start)
        if it.kind == "bench" and it.est_s > left:
            run.add_skip(it.topic, it.key, f"time budget: {left:.0f} s left, it needs ~{it.est_s:.0f} s")
            continue
        print(f"[gpu_check] {it.key} (~{it.est_s:.0f} s)", flush=True)
        t0 = clock()
        try:
            dispatch(it, run, quick)
        except Exception as e:  # a broken item must not hide the others' results
            run.checks.append(Check(it.topic, it.name, "fail", detail=f"{type(e).__name__}: {e}"[:800]))
        run.timings.append((it.key, it.est_s, clock() - t0))
    return run


def main(argv=None):
    args = parse_args(argv)
    items = P.build_plan(args.quick, args.only)
    if args.dry_run:
        print(P.format_plan(items, args.quick))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device: nothing was checked (python -m benchmarks.gpu_check --dry-run "
              "prints the plan)", file=sys.stderr)
        return 3
    print(P.format_plan(items, args.quick), flush=True)
    budget = args.budget_s
    if budget is None:
        budget = P.budget_s(args.quick) - (0 if args.quick else P.BUILD_S) - P.STARTUP_S
    run = run_plan(items, args.quick, budget)
    for path in results_files(run, _meta(), args.out):
        print(f"wrote {path}")
    print(summary(run))
    return exit_code(run.checks)


if __name__ == "__main__":
    sys.exit(main())
