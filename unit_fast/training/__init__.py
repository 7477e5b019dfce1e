"""Training pieces used by ``python -m unit_fast.train``: multitask sampling, optimisation,
checkpoints, data loading."""
