"""A worker's teachers: one lane per named teacher, each with its own client, limit and outage state.

A rollout names its teacher (`Rollout.teacher_name`; none: ``default``, the unnamed `--teacher URL`).
Each lane owns a `TeacherClient` (so its own endpoints, balancing, circuit breakers and start-up checks:
model id, k, tokenizer), an in-flight limit (`--concurrency` requests per teacher) and its outage state.
While a teacher is down (its client gave up after its own retries and failover), its rollouts wait in
the worker, leases renewed, and one of them at a time probes the teacher; the others are woken when it
answers. A task that waits for its lane (down, or at its limit) is "parked": with several teachers the
worker reads on for the other teachers' rollouts, up to `--max-held` held in all, so a slow or dead
teacher holds back only its own samples.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from pipeline.errors import PermanentError, RetryableError, TeacherIncompatible, UnknownTeacher
from pipeline.notice import WaitNotice
from pipeline.queue.connection import wait_event
from pipeline.queue.schema import DEFAULT_TEACHER, HB, Config
from pipeline.score.teachers import teacher_names_field
from pipeline.teacher.client import TeacherClient
from pipeline.teacher.config import TeacherConfig, TeacherScores
from pipeline.teacher.endpoints import CLOSED

log = logging.getLogger("gkd.worker")

#: on_event hook of a lane's client, with the teacher's name first.
LaneEvent = Callable[[str, str, dict[str, Any]], None]
#: A context in which a task counts as parked on `lane` (waiting for it, not using a slot of its own).
Parking = Callable[["Lane"], AbstractContextManager[None]]


class Lane:
    """One named teacher of a worker: client, in-flight limit, outage state and its own figures."""

    def __init__(self, name: str, config: TeacherConfig, limit: int, on_event: LaneEvent) -> None:
        self.name = name
        self.config = config
        self.limit = limit
        self.client = TeacherClient(config, on_event=lambda ev, f: on_event(name, ev, f))
        self.down_since: float | None = None
        """Monotonic time the teacher stopped answering (None while it answers)."""
        self.waiting = 0
        """Tasks parked on this lane now."""
        self.positions = 0
        self.scored = 0
        self.errors = 0
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=512)
        self._slots = asyncio.Semaphore(limit)
        self._probe = asyncio.Lock()
        self._back = asyncio.Event()
        self._back.set()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def model_or(self, unknown: str) -> str:
        """The teacher's model id, or `unknown` before its start-up checks found it."""
        try:
            return self.client.model_id
        except RuntimeError:
            return unknown

    async def start(
        self, stop: asyncio.Event, backoff_s: float, on_down: Callable[[BaseException], None]
    ) -> None:
        """The client's start-up checks, waiting out a teacher that is not up yet (still loading; polled at
        least every 2 s). Permanent failures (k above the server's limit, another tokenizer) raise at once,
        naming the teacher; a stop while waiting raises the last RetryableError."""
        delay = backoff_s
        notice = WaitNotice(log, level=logging.WARNING)
        while True:
            try:
                await self.client.start()
                return
            except RetryableError as exc:
                on_down(exc)
                if notice.waited_s == 0.0:  # said at once, then every NOTICE_EVERY_S while it lasts
                    log.warning("teacher %s unavailable at start (%s); waiting for it", self.name, exc)
                notice.waiting(f"still waiting for teacher {self.name} to start ({exc})")
                if await wait_event(stop, delay):
                    raise
                delay = min(delay * 2, 2.0)
            except PermanentError as exc:
                if self.name == DEFAULT_TEACHER:
                    raise
                raise type(exc)(f"teacher {self.name}: {exc}") from None

    def breakers_open(self) -> int:
        """Endpoints of this teacher whose circuit breaker is open (or half-open)."""
        return sum(ep.state != CLOSED for ep in self.client.endpoints.endpoints)

    def breaker(self) -> str:
        """ "closed", or "open n/m" when n of the teacher's m endpoint breakers are open."""
        n = self.breakers_open()
        return CLOSED if n == 0 else f"open {n}/{len(self.client.endpoints.endpoints)}"

    async def call(self, ids: np.ndarray, prompt_len: int, parking: Parking, seed: int = 0) -> TeacherScores:
        """One scoring call within the lane's in-flight limit (`seed`: of a sampled teacher's draws). While
        the teacher is down only one call at a time goes out (a probe); the others are parked behind it.
        Raises what `TeacherClient.score` does."""
        if self.down:
            with parking(self):
                async with self._probe, self._slots:
                    return await self.client.score(ids, prompt_len, seed)
        if self._slots.locked():
            with parking(self):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            return await self.client.score(ids, prompt_len, seed)
        finally:
            self._slots.release()

    def failed(self, exc: RetryableError) -> bool:
        """The client gave up on a call; True when this starts an outage (log it once)."""
        if self.down_since is not None:
            return False
        self.down_since = time.monotonic()
        self._back.clear()
        log.warning(
            "teacher %s unavailable (%s); its rollouts wait, the other teachers' go on", self.name, exc
        )
        return True

    def answered(self, scores: TeacherScores, positions: int) -> None:
        """A call succeeded: end an outage (waking the parked tasks) and count the figures."""
        self.scored += 1
        self.positions += positions
        if self.down_since is not None:
            log.info("teacher %s back after %.1fs", self.name, time.monotonic() - self.down_since)
            self.down_since = None
            self._back.set()

    async def wait_back(self, delay_s: float, stop: asyncio.Event) -> None:
        """Wait `delay_s`, or less when the teacher answers again or `stop` is set."""
        waits = [asyncio.ensure_future(self._back.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def note(self, event: str, fields: Mapping[str, Any]) -> None:
        """Client event hook: this teacher's latency and error figures."""
        if event == "request":
            self.latencies_ms.append(float(fields.get("latency_s", 0.0)) * 1000)
        elif event == "error":
            self.errors += 1

    def heartbeat_fields(self) -> dict[str, object]:
        """This teacher's heartbeat fields (names from `HB.per_teacher`)."""
        f = HB.per_teacher
        out: dict[str, object] = {
            f(self.name, HB.T_MODEL): self.model_or("?"),
            f(self.name, HB.T_POSITIONS): self.positions,
            f(self.name, HB.T_SCORED): self.scored,
            f(self.name, HB.T_ERRORS): self.errors,
            f(self.name, HB.T_WAITING): self.waiting,
            f(self.name, HB.T_BREAKER): self.breaker(),
        }
        if self.down_since is not None:
            out[f(self.name, HB.T_DOWN_S)] = round(time.monotonic() - self.down_since, 1)
        if self.latencies_ms:
            ordered = sorted(self.latencies_ms)
            out[f(self.name, HB.LATENCY_P50_MS)] = round(ordered[len(ordered) // 2], 1)
            p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
            out[f(self.name, HB.LATENCY_P95_MS)] = round(p95, 1)
        return out


class TeacherRouter:
    """The lanes of one worker, by teacher name."""

    def __init__(self, configs: Mapping[str, TeacherConfig], limit: int, on_event: LaneEvent) -> None:
        if not configs:
            raise ValueError("configs: expected at least one teacher, got none")
        self.lanes = {name: Lane(name, cfg, limit, on_event) for name, cfg in sorted(configs.items())}

    @property
    def several(self) -> bool:
        """More than one teacher: parked tasks free read capacity for the others."""
        return len(self.lanes) > 1

    @property
    def names(self) -> list[str]:
        return list(self.lanes)

    def lane(self, teacher_name: str | None) -> Lane:
        """The lane of a rollout's teacher. Raises UnknownTeacher naming the teachers this worker has."""
        name = teacher_name or DEFAULT_TEACHER
        lane = self.lanes.get(name)
        if lane is None:
            raise UnknownTeacher(
                f"rollout names teacher {name!r}; expected one of this run's teachers "
                f"{', '.join(self.lanes)} (gkd workers --teacher NAME=URL)"
            )
        return lane

    def parked(self) -> int:
        """Tasks waiting for their teacher (down, or at its in-flight limit)."""
        return sum(lane.waiting for lane in self.lanes.values())

    def max_held(self, concurrency: int, max_held: int) -> int:
        """Most rollouts a worker holds at once: in flight, plus (with several teachers) parked ones
        (`max_held`; 0: 4 x concurrency per teacher)."""
        if not self.several:
            return concurrency
        return max_held or 4 * concurrency * len(self.lanes)

    def free(self, held: int, concurrency: int, max_held: int) -> int:
        """Rollouts a worker holding `held` may read now: `concurrency` in flight per teacher, where a
        parked one (with several teachers) counts only against `max_held`, so the others' keep coming."""
        active = held - self.parked() if self.several else held
        return min(concurrency * len(self.lanes) - active, self.max_held(concurrency, max_held) - held)

    def fixed(self) -> dict[str, object]:
        """The run-config fields known before start: the teacher names."""
        return {Config.TEACHERS: teacher_names_field(self.names)}

    def teacher_fixed(self) -> dict[str, object]:
        """The run-config fields of the started teachers: each one's model id, their common tokenizer.

        Raises TeacherIncompatible when two teachers report different tokenizers (the student distils
        from all of them with one vocabulary)."""
        fixed: dict[str, object] = {
            Config.teacher_model(n): lane.client.model_id for n, lane in self.lanes.items()
        }
        for attr, fld in (
            ("fingerprint", Config.TEACHER_TOKENIZER),
            ("tokenizer_size", Config.TEACHER_TOKENIZER_SIZE),
        ):
            seen = {n: getattr(lane.client.vocabulary, attr) for n, lane in self.lanes.items()}
            told = {n: v for n, v in seen.items() if v is not None}
            if len(set(told.values())) > 1:
                raise TeacherIncompatible(
                    f"teachers disagree on their tokenizer ({fld}: {told}); expected one vocabulary for "
                    f"all the teachers of a run (the student distils from each of them token by token)"
                )
            if told:
                fixed[fld] = next(iter(told.values()))
        return fixed

    def max_tokens(self) -> int | None:
        """The longest rollout every teacher accepts (None: none says)."""
        limits = [
            lane.client.max_tokens for lane in self.lanes.values() if lane.client.max_tokens is not None
        ]
        return min(limits) if limits else None

    def heartbeat_fields(self) -> dict[str, object]:
        out: dict[str, object] = {HB.TEACHERS: ",".join(self.lanes)}
        for lane in self.lanes.values():
            out.update(lane.heartbeat_fields())
        return out

    async def start(
        self, stop: asyncio.Event, backoff_s: float, on_down: Callable[[BaseException], None]
    ) -> None:
        """Every teacher's start-up checks, together (see `Lane.start`)."""
        tasks = [asyncio.create_task(lane.start(stop, backoff_s, on_down)) for lane in self.lanes.values()]
        try:
            await asyncio.gather(*tasks)
        finally:  # one refused: the others stop waiting
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def models(self) -> str:
        """The heartbeat's `teacher`: the model id of a lone default teacher, else NAME=model, ..."""
        if list(self.lanes) == [DEFAULT_TEACHER]:
            return self.lanes[DEFAULT_TEACHER].model_or("?")
        return ",".join(f"{n}={lane.model_or('?')}" for n, lane in self.lanes.items())

    def describe(self) -> str:
        return ", ".join(f"{n}={lane.client.model_id}" for n, lane in self.lanes.items())

    async def close(self) -> None:
        for lane in self.lanes.values():
            with contextlib.suppress(Exception):
                await lane.client.close()


@contextlib.contextmanager
def counted(lane: Lane, on_change: Callable[[], None]) -> Iterator[None]:
    """Count a task as parked on `lane` while inside (calls `on_change` on entry and exit)."""
    lane.waiting += 1
    on_change()
    try:
        yield
    finally:
        lane.waiting -= 1
        on_change()
