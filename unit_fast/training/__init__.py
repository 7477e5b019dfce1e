"""Training pieces used by ``python -m unit_fast.train``: multitask sampling, batch streams and the
update loader (DataLoader workers), optimisation, checkpoints, data loading, evaluation, and the
run's reports (log.jsonl, TensorBoard, plots)."""
