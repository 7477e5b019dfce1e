"""``python -m benchmarks.gpu_check``: one command that proves unit_fast on a CUDA machine.

Parts, each small and single-purpose:
  plan.py         what runs per topic (checks, sanitizer, benchmarks), shapes, dtypes, estimated
                  seconds, and why an item or a baseline is skipped (a missing optional tool)
  correctness.py  every CUDA and Triton path against its reference, bf16 / fp16 / fp32, the
                  autotuned attention configs, and the no-host-sync claims
  bench.py        CUDA-event timing, peak memory, host-sync counts; the headline cases with their
                  baselines side by side (providers reused from ``benchmarks/bench_*.py``)
  sanitizer.py    ``compute-sanitizer`` memcheck / racecheck on the LSA kernel (lsa_sanitize.py)
  report.py       records, one results JSON per topic (shared/BENCHMARKS.md format), the summary
                  table and the exit status
  __main__.py     the CLI and the runner

Nothing here touches CUDA or imports Triton at import time, so ``--dry-run`` works on a CPU.
"""
