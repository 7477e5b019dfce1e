"""``python -m benchmarks.kernel_report``: registers, spills, shared memory and H100 occupancy of
every Triton kernel (each autotune config the autotuner can pick at UniT's shapes) and of the
CUDA LSA kernel, compiled ahead of time for sm_90 with no GPU.  Writes
``benchmarks/results/kernel_report.json``; ``tests/test_kernel_report.py`` checks it.

Modules: ``occupancy`` (the occupancy calculator), ``ptxas`` (``ptxas -v`` parsing),
``triton_build`` (the Triton compile worker, run in a subprocess), ``cuda_build`` (nvcc on the
LSA kernel), ``report`` (assembly, thresholds, documented exceptions, the markdown table).
Nothing here imports Triton at package import.
"""
