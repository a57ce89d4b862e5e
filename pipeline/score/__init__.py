"""The asynchronous teacher worker: rollouts -> teacher top-k -> ScoredSamples in the ready stream.

One `TeacherWorker` is one consumer of the `teachers` group. Its event loop keeps up to `concurrency`
rollouts in flight: it waits for a free slot and for room in `ready` (backpressure), reads (or reclaims)
as many entries as it has free slots, scores each in its own task, and hands the results off to `ready`
in batches (one Lua call per batch publishes, acknowledges and deletes, and only while this worker still
owns the entry).

Delivery rules (ARCHITECTURE.md "Delivery guarantees"):
- a rollout that does not decode, or that the teacher rejects permanently, goes to `dead` with the reason;
- a teacher outage never dead-letters: the rollout is kept (its lease renewed) and retried with capped
  backoff until the teacher answers or the worker stops;
- a result whose lease was taken over is dropped here (its new owner publishes it);
- on stop, reading ends, in-flight work gets `grace_s` to finish, and what is left is released at once
  for other workers; a worker that dies leaves its entries pending for `reclaim` after the lease;
- a Redis outage (restart) is logged and waited out with capped backoff; the worker carries on.

Modules: `loop` (the worker, `TeacherWorker`), `handoff` (batched atomic publishing), `telemetry`
(stats, metrics, heartbeat fields, teacher outages), `options` (settings of the loop, its report),
`metrics` (Prometheus). Nothing is imported here: `gkd workers` reads `options` before the heavy loop.
"""

from __future__ import annotations
