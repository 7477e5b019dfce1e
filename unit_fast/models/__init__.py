"""UniT as MMF defines it (``mmf/models/unit``), on unit_fast's kernels: backbone, position
encoding, transformer, heads, criterion, post-processing and the model itself."""
