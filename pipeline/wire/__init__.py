"""The wire format: msgpack records (Rollout, ScoredSample) with zero-copy tensors."""
