"""Small, CPU-sized experiments on the library's multitask options (issue 15, CA-MTL in UniT).

Each experiment is one module, run as ``python -m experiments.<name> [--smoke] [--out DIR]``:
``sampling`` (task sampling by size / temperature / uncertainty), ``weighting`` (loss weighting
and gradient aggregation), ``conditioning`` (task-conditioned decoder modules).  Shared parts:
``tasks.py`` (synthetic tasks), ``tiny_unit.py`` (the model), ``common.py`` (loop pieces,
statistics, output files).
"""
