"""``python -m benchmarks.kernel_report [--all] [--detail] [--out PATH] [--ptxas PATH] [--jobs N]``

Compiles every Triton kernel for sm_90 (each autotune config the autotuner can pick at UniT's
shapes; ``--all`` adds BERT, the decoder's self-attention and eval-mode keys) and the CUDA LSA
kernel with ``ptxas -v``, with no GPU; writes the JSON report and prints its markdown table.
Exit status 1 when a row misses a threshold without a documented reason (see ``report.py``).
"""

import argparse
import sys

from benchmarks.kernel_report import report as R


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every attention key, not only UniT's two")
    parser.add_argument("--detail", action="store_true", help="one table line per config")
    parser.add_argument("--out", default=R.DEFAULT_OUT, help="JSON path (default: %(default)s)")
    parser.add_argument("--ptxas", default=None, help="ptxas to compile with (default: the CUDA toolkit's)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: min(2, cores))")
    args = parser.parse_args(argv)
    report = R.build(full=args.all, ptxas=args.ptxas, jobs=args.jobs)
    R.write(report, args.out)
    print(R.table(report, detail=args.detail))
    problems = R.failures(report)
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"wrote {args.out}: {len(report['kernels'])} kernels, {len(problems)} failing, "
          f"compile {report['compile_s']} s", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
