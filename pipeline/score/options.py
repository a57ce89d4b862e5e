"""Options and the running report of a teacher worker."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.queue.backpressure import WaterMarks

#: Wire dtypes of stored top-k logprobs, by setting value.
LOGPROB_DTYPES: dict[str, type[np.floating]] = {"float16": np.float16, "float32": np.float32}


@dataclass
class WorkerOptions:
    """Tuning of one worker process (k and the teacher live in TeacherConfig)."""

    concurrency: int = 64
    """Rollouts in flight at once (being scored, or waiting for their handoff)."""
    lease_ms: int = 60_000
    """An entry idle this long in another consumer's hands may be reclaimed."""
    max_deliveries: int = 5
    """A reclaimed entry delivered more often than this goes to `dead`."""
    logprob_dtype: str = "float16"
    """dtype of topk_logprobs on the wire: float16 or float32 (fixed for the run)."""
    marks: WaterMarks = field(default_factory=WaterMarks)
    """Water marks of the ready stream (entries and bytes)."""
    grace_s: float = 30.0
    """On stop, how long in-flight rollouts may take to finish before they are released."""
    heartbeat_ttl_ms: int = 5000
    """The heartbeat key expires this long after the last beat (beats every third of it)."""
    read_block_ms: int = 250
    """Longest wait of one XREADGROUP (bounds how fast a stop is noticed)."""
    handoff_max_items: int = 32
    """Most results published in one handoff call."""
    handoff_max_bytes: int = 16 * 1024 * 1024
    """Most result bytes published in one handoff call."""
    handoff_linger_s: float = 0.002
    """How long the first result of a batch waits for company before the batch is published."""
    outage_backoff_s: float = 0.25
    """First wait before retrying a rollout whose teacher call failed after the client's own retries."""
    outage_backoff_max_s: float = 10.0
    """Cap of that wait (doubling, with jitter)."""
    redis_backoff_max_s: float = 5.0
    """Cap of the wait between attempts while Redis is unreachable."""
    metrics_port: int = 0
    """Serve Prometheus metrics on this port (0: off)."""
    metrics_addr: str = "127.0.0.1"
    """Address the metrics server binds."""

    def __post_init__(self) -> None:
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype: expected float16 or float32, got {self.logprob_dtype!r}")
        if self.concurrency < 1 or self.lease_ms < 10 or self.max_deliveries < 1:
            raise ValueError(
                f"expected concurrency >= 1, lease_ms >= 10, max_deliveries >= 1, "
                f"got {self.concurrency}, {self.lease_ms}, {self.max_deliveries}"
            )
        if self.grace_s < 0 or self.heartbeat_ttl_ms < 100:
            raise ValueError(
                f"expected grace_s >= 0 and heartbeat_ttl_ms >= 100, "
                f"got {self.grace_s}, {self.heartbeat_ttl_ms}"
            )


@dataclass
class WorkerReport:
    """What a worker has done so far (live on `TeacherWorker.report`, returned by `run()`)."""

    scored: int = 0
    """Rollouts this worker published to ready."""
    positions: int = 0
    """Scored positions (rows) in them."""
    dead: int = 0
    """Rollouts this worker dead-lettered."""
    lease_lost: int = 0
    """Results dropped because another worker had taken the rollout over."""
    reclaimed: int = 0
    """Stale rollouts taken over from other consumers."""
    released: int = 0
    """Unfinished rollouts handed back at stop."""
    teacher_outage_retries: int = 0
    """Times a rollout was retried after the client gave up (teacher outage)."""
