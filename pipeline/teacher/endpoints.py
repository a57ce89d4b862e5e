"""Endpoint state for a teacher client: least-outstanding-requests balancing, circuit breakers, semaphores.

Each endpoint has a semaphore (at most `concurrency` requests on the wire) and a count of outstanding
requests (on the wire plus waiting for the semaphore); `pick` chooses the available endpoint with the
fewest outstanding, ties broken by rotation so equal endpoints share load evenly.

Circuit breaker per endpoint: `breaker_failures` consecutive retryable failures open it; while open the
endpoint gets no requests. After `breaker_reset_s` it is half-open: exactly one request (a probe) is let
through; success closes the breaker, failure opens it again for another `breaker_reset_s`.
`failure` and `success` report state changes (not every failed probe), so a caller logs an outage once
when it starts and once when it ends, with its length and counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class Endpoint:
    """One teacher base URL and its load and health state (owned by one event loop)."""

    url: str
    concurrency: int
    outstanding: int = 0
    consecutive_failures: int = 0
    state: str = CLOSED
    opened_at: float = 0.0
    probing: bool = False
    requests: int = 0
    failures: int = 0
    binary: bool = False
    """The endpoint advertised the binary top-k response (pipeline/teacher/binary.py)."""
    max_samples: int = 0
    """Draws per position the endpoint offers (pipeline/teacher/sampled.py; 0: none)."""
    max_model_len: int | None = None
    """Longest sequence the server accepts, prompt plus generated tokens (from /v1/models; None: unknown)."""
    outage_since: float = 0.0
    """When the breaker last opened from closed (the start of the current outage)."""
    failed_probes: int = 0
    """Half-open probes that failed during the current outage."""
    semaphore: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.concurrency)


class EndpointSet:
    """The endpoints of one client. Not thread-safe: use from the client's event loop only."""

    def __init__(
        self, urls: Iterable[str], *, concurrency: int, breaker_failures: int, breaker_reset_s: float
    ) -> None:
        self.endpoints = [Endpoint(u.rstrip("/"), concurrency) for u in urls]
        if not self.endpoints:
            raise ValueError("expected at least one teacher endpoint URL, got none")
        self.breaker_failures = max(1, breaker_failures)
        self.breaker_reset_s = breaker_reset_s
        self._rotation = 0
        self._now = time.monotonic

    def __len__(self) -> int:
        return len(self.endpoints)

    def in_flight(self) -> int:
        """Requests outstanding over all endpoints."""
        return sum(e.outstanding for e in self.endpoints)

    def _available(self, ep: Endpoint, now: float) -> bool:
        if ep.state == CLOSED:
            return True
        # open -> half-open after the reset time; half-open admits one probe at a time
        return not ep.probing and now - ep.opened_at >= self.breaker_reset_s

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> Endpoint | None:
        """The available endpoint with the fewest outstanding requests, preferring ones not in `exclude`
        (endpoints that already failed this request); None when every breaker is open."""
        now = self._now()
        candidates = [e for e in self.endpoints if self._available(e, now)]
        preferred = [e for e in candidates if e.url not in exclude] or candidates
        if not preferred:
            return None
        n = len(self.endpoints)
        self._rotation = (self._rotation + 1) % n
        order = {e.url: (i - self._rotation) % n for i, e in enumerate(self.endpoints)}
        best = min(preferred, key=lambda e: (e.outstanding, order[e.url]))
        if best.state != CLOSED:
            best.state = HALF_OPEN
            best.probing = True
        return best

    def next_ready_in(self) -> float:
        """Seconds until some open breaker turns half-open (0 if an endpoint is available now)."""
        now = self._now()
        waits = [
            0.0 if self._available(e, now) else max(0.0, e.opened_at + self.breaker_reset_s - now)
            for e in self.endpoints
            if not e.probing
        ]
        return min(waits) if waits else self.breaker_reset_s

    @asynccontextmanager
    async def slot(self, ep: Endpoint) -> AsyncIterator[None]:
        """Hold one of `ep`'s concurrency slots; counts as outstanding from the moment of asking."""
        ep.outstanding += 1
        try:
            async with ep.semaphore:
                yield
        finally:
            ep.outstanding -= 1

    def success(self, ep: Endpoint) -> float | None:
        """The endpoint answered (any HTTP answer that is not a retryable failure): close its breaker.
        Returns the outage's length in seconds when this closed an open breaker, else None."""
        ep.requests += 1
        ep.consecutive_failures = 0
        ep.probing = False
        if ep.state == CLOSED:
            return None
        ep.state = CLOSED
        return self._now() - ep.outage_since

    def failure(self, ep: Endpoint) -> str | None:
        """A retryable failure on `ep`. Returns OPEN when this opened a closed breaker (an outage starts),
        else None (a failed half-open probe re-opens the breaker silently, counted in `failed_probes`)."""
        ep.requests += 1
        ep.failures += 1
        ep.consecutive_failures += 1
        was_probe = ep.probing
        ep.probing = False
        if was_probe:
            ep.failed_probes += 1
            ep.state = OPEN
            ep.opened_at = self._now()
            return None
        if ep.state == CLOSED and ep.consecutive_failures >= self.breaker_failures:
            self.force_open(ep)
            return OPEN
        return None

    def release_probe(self, ep: Endpoint) -> None:
        """A probe ended without a verdict (cancelled): let another request probe."""
        if ep.probing:
            ep.probing = False
            if ep.state == HALF_OPEN:
                ep.state = OPEN

    def force_open(self, ep: Endpoint) -> None:
        """Open `ep`'s breaker now (e.g. it failed its start-up health check); it is re-probed later."""
        ep.state = OPEN
        ep.opened_at = ep.outage_since = self._now()
        ep.failed_probes = 0
        ep.probing = False
