"""The queue: the Redis key schema, connections, streams and leases, backpressure, run state."""
