"""Options and the running report of a teacher worker.

`WorkerOptions` is also a settings section: `gkd workers` exposes some of its fields as flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import setting


@dataclass
class WorkerOptions:
    """Tuning of one worker's loop (the run, the flow and the teacher have their own settings)."""

    concurrency: int = setting(
        64, "Rollouts in flight per process and teacher (being scored, or waiting for their handoff)."
    )
    max_held: int = setting(
        0,
        "With several teachers: most rollouts one process holds, in flight plus waiting for a teacher that "
        "is down or at its limit (0: 4 x concurrency per teacher).",
    )
    grace_s: float = setting(30.0, "On SIGTERM/SIGINT, time for in-flight rollouts before they are released.")
    heartbeat_ttl_ms: int = setting(5000, "Heartbeat key TTL (beats every third of it).")
    read_block_ms: int = setting(250, "Longest wait of one XREADGROUP (bounds how fast a stop is noticed).")
    handoff_max_items: int = setting(32, "Most results published in one handoff call.")
    handoff_max_bytes: int = setting(16 * 1024 * 1024, "Most result bytes published in one handoff call.")
    handoff_linger_s: float = setting(
        0.002, "How long the first result of a batch waits for company before the batch is published."
    )
    outage_backoff_s: float = setting(
        0.25, "First wait before retrying a rollout whose teacher call failed after the client's own retries."
    )
    outage_backoff_max_s: float = setting(10.0, "Cap of that wait (doubling, with jitter).")
    redis_backoff_max_s: float = setting(5.0, "Cap of the wait between attempts while Redis is unreachable.")
    metrics_port: int = setting(0, "Prometheus metrics port (0: off; child i of --procs uses port + i).")
    metrics_addr: str = setting("127.0.0.1", "Address the metrics server binds.", name="metrics_host")

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_held < 0:
            raise ValueError(
                f"expected concurrency >= 1 and max_held >= 0, got {self.concurrency}, {self.max_held}"
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
