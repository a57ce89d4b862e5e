"""What a worker tells the world: run stats counters, Prometheus metrics, heartbeat fields, teacher outages.

Counters are accumulated in memory (`Counts`) and added to the run's `stats` hash on each heartbeat.
A teacher outage is logged once when it starts and once when it ends, not once per failed call
(by its lane, `pipeline.score.router`; Redis outages likewise, by `pipeline.queue.connection.RedisRetry`).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pipeline.queue.runstate import Counts
from pipeline.queue.schema import DEFAULT_TEACHER, HB, Stat
from pipeline.score.metrics import WorkerMetrics
from pipeline.score.options import WorkerReport

if TYPE_CHECKING:
    from pipeline.score.router import Lane

log = logging.getLogger("gkd.worker")


class Telemetry:
    """Stats, metrics and teacher outage state of one worker named `name`."""

    def __init__(self, name: str, metrics: WorkerMetrics, report: WorkerReport) -> None:
        self.name = name
        self.metrics = metrics
        self.report = report
        self.stats = Counts()
        # Recent request latencies (ms) for the heartbeat's p50/p95, which `gkd status` shows.
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=512)

    # ---------------------------------------------------------------------------------- teacher events

    def on_event(self, name: str, fields: dict[str, Any], teacher: str = DEFAULT_TEACHER) -> None:
        """TeacherClient hook of `teacher`'s client: request latency, retries and errors into stats
        (run-wide and the teacher's own counters) and metrics (labelled by teacher)."""
        endpoint = str(fields.get("endpoint") or "?")
        if name == "request":
            latency_s = float(fields.get("latency_s", 0.0))
            self._count(teacher, Stat.TEACHER_REQUESTS)
            self._count(teacher, Stat.TEACHER_LATENCY_MS_SUM, int(latency_s * 1000))
            self.metrics.latency.labels(teacher=teacher, endpoint=endpoint).observe(latency_s)
            self._latencies_ms.append(latency_s * 1000)
        elif name == "retry":
            self.stats.add(Stat.TEACHER_RETRIES)
            self.metrics.retries.labels(teacher=teacher, endpoint=endpoint).inc()
        elif name == "error":
            err = fields.get("error")
            label = type(err).__name__ if isinstance(err, BaseException) else str(err or "error")
            self._count(teacher, Stat.TEACHER_ERRORS)
            self.metrics.errors.labels(error=label.split(":", 1)[0][:60]).inc()
            self.metrics.teacher_errors.labels(teacher=teacher, error=label.split(":", 1)[0][:60]).inc()
        elif name == "breaker_open":
            log.warning(
                "worker %s: teacher %s endpoint %s keeps failing; circuit breaker open",
                self.name,
                teacher,
                endpoint,
            )

    def _count(self, teacher: str, stat: str, n: int = 1) -> None:
        self.stats.add(stat, n)
        self.stats.add(Stat.per_teacher(teacher, stat), n)

    def teacher_down(self, exc: BaseException, teacher: str = DEFAULT_TEACHER) -> None:
        """A rollout's teacher call failed after the client's retries (the lane logs the outage once)."""
        self.report.teacher_outage_retries += 1
        self.metrics.retries.labels(teacher=teacher, endpoint="all").inc()

    def lanes(self, lanes: Iterable[Lane]) -> None:
        """Gauges of each teacher's state (set with every heartbeat)."""
        for lane in lanes:
            self.metrics.breakers_open.labels(teacher=lane.name).set(lane.breakers_open())
            self.metrics.waiting.labels(teacher=lane.name).set(lane.waiting)

    def teacher_answered(self, teacher: str, positions: int) -> None:
        """`teacher` scored a rollout of `positions` rows."""
        self.stats.add(Stat.per_teacher(teacher, Stat.SCORED))
        self.stats.add(Stat.per_teacher(teacher, Stat.SCORED_POSITIONS), positions)
        self.metrics.teacher_positions.labels(teacher=teacher).inc(positions)

    # ---------------------------------------------------------------------------------- heartbeat

    def heartbeat_fields(self, teacher: str) -> dict[str, object]:
        """This worker's extra heartbeat fields: progress, teacher, latency percentiles."""
        fields: dict[str, object] = {
            HB.POSITIONS: self.report.positions,
            HB.SCORED: self.report.scored,
            HB.TEACHER: teacher,
        }
        if self._latencies_ms:
            ordered = sorted(self._latencies_ms)
            fields[HB.LATENCY_P50_MS] = round(ordered[len(ordered) // 2], 1)
            fields[HB.LATENCY_P95_MS] = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 1)
        return fields
