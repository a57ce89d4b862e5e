"""Prometheus metrics of a teacher worker process (prometheus_client, one registry per worker).

Each `WorkerMetrics` owns its own `CollectorRegistry`, so several workers in one process (tests, the
demo, benchmarks) never clash on the global registry. `serve()` exposes it on
``http://<addr>:<port>/metrics``; the address defaults to 127.0.0.1 because metrics name endpoints and
error classes that need not leave the host.

Names (all prefixed ``gkd_``):
- ``gkd_worker_positions_total``            scored teacher positions (rate() = positions/s)
- ``gkd_worker_rollouts_total``             rollouts handed off to the ready stream
- ``gkd_teacher_request_seconds{teacher,endpoint}`` histogram of teacher request latency
- ``gkd_teacher_positions_total{teacher}``  positions each named teacher scored (rate() = its positions/s)
- ``gkd_teacher_errors_total{teacher,error}`` teacher errors by teacher and class
- ``gkd_teacher_breakers_open{teacher}``    endpoints of the teacher whose circuit breaker is open
- ``gkd_teacher_waiting{teacher}``          rollouts held that wait for the teacher (down or at its limit)
- ``gkd_worker_errors_total{error}``        errors by class (teacher, decode, redis, lease lost)
- ``gkd_worker_in_flight``                  rollouts owned by this process right now
- ``gkd_teacher_retries_total{teacher,endpoint}`` teacher request retries (client-level and outage backoff)
- ``gkd_worker_dead_lettered_total{stage}`` rollouts sent to the dead stream
- ``gkd_worker_reclaimed_total``            stale rollouts taken over from dead workers
- ``gkd_worker_lease_lost_total``           results dropped because another worker owns the rollout
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class WorkerMetrics:
    """The metrics of one worker; every update is a cheap in-memory increment."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.positions = Counter("gkd_worker_positions", "Scored teacher positions.", registry=reg)
        self.rollouts = Counter("gkd_worker_rollouts", "Rollouts handed off to ready.", registry=reg)
        self.latency = Histogram(
            "gkd_teacher_request_seconds",
            "Teacher request latency.",
            ["teacher", "endpoint"],
            buckets=_LATENCY_BUCKETS_S,
            registry=reg,
        )
        self.errors = Counter("gkd_worker_errors", "Errors by class.", ["error"], registry=reg)
        self.in_flight = Gauge("gkd_worker_in_flight", "Rollouts owned by this process.", registry=reg)
        self.retries = Counter(
            "gkd_teacher_retries", "Teacher request retries.", ["teacher", "endpoint"], registry=reg
        )
        self.teacher_positions = Counter(
            "gkd_teacher_positions", "Positions scored, by teacher.", ["teacher"], registry=reg
        )
        self.teacher_errors = Counter(
            "gkd_teacher_errors", "Teacher errors by teacher and class.", ["teacher", "error"], registry=reg
        )
        self.breakers_open = Gauge(
            "gkd_teacher_breakers_open",
            "Endpoints whose breaker is open, by teacher.",
            ["teacher"],
            registry=reg,
        )
        self.waiting = Gauge(
            "gkd_teacher_waiting", "Rollouts held waiting for their teacher.", ["teacher"], registry=reg
        )
        self.dead = Counter("gkd_worker_dead_lettered", "Rollouts dead-lettered.", ["stage"], registry=reg)
        self.reclaimed = Counter("gkd_worker_reclaimed", "Stale rollouts taken over.", registry=reg)
        self.lease_lost = Counter("gkd_worker_lease_lost", "Results dropped: lease lost.", registry=reg)
        self._server: Any = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on addr:port in a daemon thread (port 0 means off: nothing is served)."""
        if port <= 0 or self._server is not None:
            return
        self._server = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        """Stop serving (the registry stays readable)."""
        if self._server is None:
            return
        server, thread = self._server
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        self._server = None
