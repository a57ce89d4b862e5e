"""Training: the top-k GKD loss, batching, the optimizer step, checkpoints, prefetch, the trainer."""
