"""`TeacherWorker`: the event loop that turns rollouts into ScoredSamples (see the package docstring).

Shape legend: T = tokens of a rollout, R = T - prompt_len scored rows, K = teacher top-k.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping

import numpy as np

from pipeline.errors import (
    PermanentError,
    RedisUnavailable,
    RetryableError,
    SettingsError,
    StreamGroupMissing,
)
from pipeline.notice import WaitNotice
from pipeline.queue.backpressure import Backpressure
from pipeline.queue.connection import RedisRetry, connect, wait_event, wait_for_redis
from pipeline.queue.lease import Entry, Held
from pipeline.queue.partitions import Partitioned
from pipeline.queue.runstate import Heartbeat, check_run_config, record_run_info
from pipeline.queue.schema import DEFAULT_TEACHER, HB, Config, Role, Stage, Stat
from pipeline.queue.streams import ensure_groups
from pipeline.score.handoff import HandoffBatcher, dead_reason, pack_scored
from pipeline.score.lifecycle import drain, note_idle, release_own_pending
from pipeline.score.metrics import WorkerMetrics
from pipeline.score.options import WorkerOptions, WorkerReport
from pipeline.score.router import Lane, TeacherRouter, counted
from pipeline.score.telemetry import Telemetry
from pipeline.sections import FlowSettings, RunSettings
from pipeline.teacher import sampled
from pipeline.teacher.config import TeacherConfig, TeacherScores
from pipeline.wire.codec import Rollout, decode_rollout

log = logging.getLogger("gkd.worker")


class TeacherWorker:
    """One consumer of the rollouts stream: `await run(stop)` works until `stop` is set.

    `teacher` is one TeacherConfig (the run's default teacher) or teacher name -> TeacherConfig."""

    def __init__(
        self,
        run: RunSettings,
        teacher: TeacherConfig | Mapping[str, TeacherConfig],
        name: str,
        flow: FlowSettings | None = None,
        options: WorkerOptions | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        configs = {DEFAULT_TEACHER: teacher} if isinstance(teacher, TeacherConfig) else dict(teacher)
        for tname, cfg in configs.items():
            if (cfg.k, cfg.sampled) != (run.width, run.sampled):
                raise SettingsError(
                    f"k: teacher {tname}'s client asks for k={cfg.k} (sampled: {cfg.sampled}), the run has "
                    f"k={run.width} (sampled: {run.sampled}) (one k per run)"
                )
        self.run_settings = run
        self.keys = run.keys
        self.name = name
        self.flow = flow or FlowSettings()
        self.opts = options or WorkerOptions()
        self.metrics = metrics or WorkerMetrics()
        self.report = WorkerReport()
        self.tel = Telemetry(name, self.metrics, self.report)
        self.retry = RedisRetry(
            f"worker {name}",
            max_s=self.opts.redis_backoff_max_s,
            on_failure=self.metrics.errors.labels(error="redis").inc,
        )
        self.router = TeacherRouter(configs, self.opts.concurrency, self._on_teacher_event)
        self.started = asyncio.Event()
        """Set once the start-up checks passed and reading begins."""
        self._dtype = np.dtype(run.logprob_dtype)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._idle = WaitNotice(log)

    def hurry(self) -> None:
        """Stop waiting for in-flight rollouts (a second Ctrl-C): hand them back now."""
        self._hurry.set()

    # ---------------------------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> WorkerReport:
        """Start, work until `stop` is set, give in-flight work `grace_s`, release the rest, close.

        Raises ConfigMismatch (the run has another k, model or dtype) or the teacher client's
        PermanentError from its start-up checks, before any rollout is read.
        """
        self._stop = stop
        run = self.run_settings
        self.r = connect(run.redis_url, cluster=run.redis_cluster)
        self.consumer = Partitioned(
            self.r, self.keys.rollouts, run.parts, self.name,
            lease_ms=self.flow.lease_ms, max_deliveries=self.flow.max_deliveries,
            replicas=run.replicas(self.r),
        )  # fmt: skip
        self._owned = Held(self.consumer)  # until published, dead-lettered or released
        self._heartbeat = Heartbeat(
            self.r, self.keys, self.name, Role.WORKER, ttl_ms=self.opts.heartbeat_ttl_ms,
            fields=self._heartbeat_fields, counts=self.tel.stats,
        )  # fmt: skip
        self._bp = Backpressure(self.r, self.keys.ready, self.flow.marks, parts=run.parts)
        self._handoff = HandoffBatcher(
            self.consumer, self.keys.ready, self.retry, self._published,
            max_items=self.opts.handoff_max_items, max_bytes=self.opts.handoff_max_bytes,
            linger_s=self.opts.handoff_linger_s,
        )  # fmt: skip
        aux: list[asyncio.Task[None]] = []
        try:
            if await self._start():
                aux = [
                    asyncio.create_task(self._heartbeat.run(), name="heartbeat"),
                    asyncio.create_task(self._owned.renew_forever(), name="renew"),
                    asyncio.create_task(self._handoff.run(), name="handoff"),
                ]
                self.started.set()
                await self._read_loop()
                await self._drain()
        finally:
            for group in (self._tasks, aux):
                for t in group:
                    t.cancel()
                await asyncio.gather(*group, return_exceptions=True)
            await self._shutdown()
        return self.report

    async def _start(self) -> bool:
        """The start-up checks; False if the worker was stopped while waiting for Redis.

        The run config is compared first (refusing at once) and recorded last: a worker that fails to
        start fixes nothing for the run."""
        if not await self._wait_for_redis():
            return False
        own = {
            **self.run_settings.fixed(Config.K, Config.LOGPROB_DTYPE, Config.PARTITIONS, Config.TEACHER_MODE),
            **self.router.fixed(),
        }
        await check_run_config(self.r, self.keys, own, record=False)
        await self.router.start(self._stop, self.opts.outage_backoff_s, self.tel.teacher_down)
        self.metrics.serve(self.opts.metrics_port, self.opts.metrics_addr)
        await check_run_config(self.r, self.keys, {**own, **self.router.teacher_fixed()})
        max_tokens = self.router.max_tokens()
        if max_tokens is not None:  # producers refuse prompts that cannot fit
            await record_run_info(self.r, self.keys, {Config.TEACHER_MAX_MODEL_LEN: max_tokens + 1})
        await self._heartbeat.claim()  # NameInUse: the name's pending entries belong to a live process
        released = await release_own_pending(self.consumer)  # an earlier process's, with this name
        if released:
            log.info("worker %s: released %d rollouts left pending by an earlier run", self.name, released)
        run = self.run_settings
        what = f"{run.width} draws per position (sampled)" if run.sampled else f"k={run.k}"
        log.info(
            "worker %s: run %r, teachers %s, %s, %s, concurrency %d per teacher, at most %d held",
            self.name, self.keys.run, self.router.describe(), what,
            self.run_settings.logprob_dtype, self.opts.concurrency, self._max_held(),
        )  # fmt: skip
        return True

    async def _wait_for_redis(self) -> bool:
        """Create the consumer groups, waiting for a Redis that is not up yet; False if stopped first."""
        if not await wait_for_redis(self.r, f"worker {self.name}", self._stop):
            return False
        try:
            groups = lambda: ensure_groups(self.r, self.keys, self.run_settings.partitions)  # noqa: E731
            await self.retry.call("start", groups, stop=self._stop)
        except RedisUnavailable:
            return False  # stopped while Redis was down
        return not self._stop.is_set()

    async def _drain(self) -> None:
        """Give in-flight rollouts `grace_s` (or until `hurry()`); the caller cancels the rest."""
        await drain(self._tasks, self.opts.grace_s, self._hurry, f"worker {self.name}")

    async def _shutdown(self) -> None:
        left = self._owned.entries()
        with contextlib.suppress(RedisUnavailable, StreamGroupMissing):
            if left:
                flags = await self.consumer.release(left)
                self.report.released += sum(flags)
                log.info("worker %s: released %d unfinished rollouts", self.name, sum(flags))
            await self.tel.stats.flush(self.r, self.keys)
            await self._heartbeat.remove()
        await self.router.close()
        with contextlib.suppress(Exception):
            await self.r.aclose()
        self.metrics.close()

    # ---------------------------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        delay = 0.0
        next_reclaim = 0.0
        regroup = False
        while not self._stop.is_set():
            try:
                if regroup:
                    await ensure_groups(self.r, self.keys, self.run_settings.partitions)
                    regroup = False
                # Slots first, then room: the level is read after the results it waited for have
                # landed, so ready overshoots its high-water mark by at most one read batch.
                if not await self._wait_for_slot():
                    break
                await self._bp.wait_for_room(self._stop)
                free = self._free()
                if self._stop.is_set() or free <= 0:
                    continue
                if time.monotonic() >= next_reclaim:
                    taken = await self._reclaim(free)
                    free -= taken
                    # A full reclaim batch means more may be stale: look again at once.
                    next_reclaim = 0.0 if free == 0 else time.monotonic() + self._reclaim_every_s()
                if free > 0:
                    full = await self._bp.full()  # partitions whose ready stream is at its share
                    got = await self.consumer.read(free, block_ms=self.opts.read_block_ms, skip=full)
                    for entry in got:
                        self._spawn(entry)
                    await note_idle(self._idle, bool(got or self._tasks), self.r, self.keys, self.name)
                self.retry.recovered()
                delay = 0.0
            except RedisUnavailable as exc:
                delay = await self.retry.backoff("read", exc, delay, self._stop)
            except StreamGroupMissing:
                # A Redis restarted without persistence has lost the groups: recreate them.
                log.warning(
                    "worker %s: consumer groups missing (Redis lost its data?); recreating", self.name
                )
                regroup = True

    def _reclaim_every_s(self) -> float:
        return min(max(self.flow.lease_ms / 2000, 0.05), 10.0)

    def _max_held(self) -> int:
        return self.router.max_held(self.opts.concurrency, self.opts.max_held)

    def _free(self) -> int:
        return self.router.free(len(self._tasks), self.opts.concurrency, self.opts.max_held)

    async def _wait_for_slot(self) -> bool:
        """Wait until a rollout may be read (`_free`); False when stopping."""
        while self._free() <= 0 and not self._stop.is_set():
            self._slot_freed.clear()
            await wait_event(self._slot_freed, 0.1)
        return not self._stop.is_set()

    def _parking(self, lane: Lane) -> contextlib.AbstractContextManager[None]:
        """The calling task waits for `lane`: count it as parked, and let the read loop know."""
        return counted(lane, self._slot_freed.set)

    async def _reclaim(self, count: int) -> int:
        """Take over stale entries of dead workers; dead-letter those delivered too often. Returns taken."""
        ok, over = await self.consumer.reclaim(count)
        for entry in over:
            if entry.ref not in self._owned:
                self._owned.add([entry])
                reason = (
                    f"delivered {entry.deliveries} times (max_deliveries={self.flow.max_deliveries}); "
                    f"workers kept dying or stalling on it"
                )
                await self._dead_letter(entry, Stage.TEACHER, reason)
        fresh = [e for e in ok if e.ref not in self._owned]  # owned ones: our renewal lagged, still ours
        for entry in fresh:
            self._spawn(entry)
        if fresh:
            self.report.reclaimed += len(fresh)
            self.tel.stats.add(Stat.RECLAIMED, len(fresh))
            self.metrics.reclaimed.inc(len(fresh))
            log.info("worker %s: reclaimed %d stale rollouts", self.name, len(fresh))
        return len(fresh)

    def _spawn(self, entry: Entry) -> None:
        self._owned.add([entry])
        task = asyncio.create_task(self._process(entry))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        self.metrics.in_flight.set(len(self._owned))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("worker %s: unexpected %s while scoring: %s", self.name, type(exc).__name__, exc)

    # ---------------------------------------------------------------------------------- one rollout

    async def _process(self, entry: Entry) -> None:
        """Decode, score, encode and hand off one entry; every way out leaves it published, dead,
        released (stop), or let go (lost lease, or a bug in the teacher call: reclaimed after the lease
        and dead after max_deliveries). It is never held forever."""
        try:
            rollout = decode_rollout(entry.data)
        except Exception as exc:  # decoding is a function of the payload alone: retrying cannot help
            await self._dead_letter(entry, Stage.DECODE, dead_reason(exc))
            return
        try:
            lane = self.router.lane(rollout.teacher_name)
            scores = await self._score(entry, rollout, lane)
        except PermanentError as exc:
            await self._dead_letter(entry, Stage.TEACHER, f"{type(exc).__name__}: {exc}")
            return
        except Exception:
            # A bug, not a verdict on the data: let go of the entry without releasing it, so it is
            # reclaimed after the lease with its delivery count raised, and reaches `dead` eventually.
            self._forget(entry)
            raise
        if scores is None:
            return  # stopping during an outage (released at shutdown), or the lease was lost
        try:
            payload, positions = pack_scored(
                rollout, scores, lane.client.model_id, self.run_settings.width, self._dtype
            )
        except Exception as exc:  # deterministic too (this rollout with this answer)
            await self._dead_letter(
                entry, Stage.ENCODE, f"cannot encode the scored sample: {dead_reason(exc)}"
            )
            return
        await self._handoff.submit(entry, payload, positions)

    async def _score(self, entry: Entry, rollout: Rollout, lane: Lane) -> TeacherScores | None:
        """`lane`'s scores. A RetryableError (the client's own retries and failover exhausted) is an
        outage of that teacher: keep the entry (the renew loop holds its lease; renewal is no delivery,
        so max_deliveries is not spent) parked, and retry with capped backoff until the teacher answers;
        None if the worker stops meanwhile or the lease was lost."""
        attempt = 0
        while True:
            try:
                scores = await lane.call(
                    rollout.input_ids, rollout.prompt_len, self._parking, sampled.draw_seed(rollout.id)
                )
            except RetryableError as exc:
                attempt += 1
                lane.failed(exc)
                self.tel.teacher_down(exc, lane.name)
                delay = min(self.opts.outage_backoff_s * 2 ** (attempt - 1), self.opts.outage_backoff_max_s)
                with self._parking(lane):
                    await lane.wait_back(delay * random.uniform(0.5, 1.0), self._stop)
                if self._stop.is_set():
                    return None
                if entry.ref in self._owned.lost:
                    self._forget(entry)
                    self._count_lease_lost(1)
                    return None
                continue
            positions = int(scores.ids_RK.shape[0])
            lane.answered(scores, positions)
            self.tel.teacher_answered(lane.name, positions)
            return scores

    def _on_teacher_event(self, teacher: str, event: str, fields: dict[str, object]) -> None:
        """A lane's client event: the lane's own figures, then stats and metrics by teacher."""
        self.router.lanes[teacher].note(event, fields)
        self.tel.on_event(event, fields, teacher)

    async def _dead_letter(self, entry: Entry, stage: str, reason: str) -> None:
        consumer = self.consumer
        try:
            ok = await self.retry.call("dead-letter", lambda: consumer.dead_letter(entry, stage, reason))
        except StreamGroupMissing:
            ok = False  # Redis lost its data: nobody owns the entry any more
        self._forget(entry)
        if not ok:
            self._count_lease_lost(1)
            return
        self.report.dead += 1
        self.metrics.dead.labels(stage=stage).inc()
        self.metrics.errors.labels(error=stage).inc()
        log.warning("worker %s: rollout %s -> dead (%s): %.300s", self.name, entry.id, stage, reason)

    def _published(self, entry: Entry, positions: int, ok: bool) -> None:
        """HandoffBatcher callback: the entry is no longer ours either way."""
        self._forget(entry)
        if ok:
            self.report.scored += 1
            self.report.positions += positions
            self.metrics.positions.inc(positions)
            self.metrics.rollouts.inc()
        else:
            self._count_lease_lost(1)
            log.info("worker %s: result of %s dropped; another worker owns it now", self.name, entry.id)

    def _forget(self, entry: Entry) -> None:
        self._owned.drop([entry])
        self.metrics.in_flight.set(len(self._owned))

    def _count_lease_lost(self, n: int) -> None:
        self.report.lease_lost += n
        self.metrics.lease_lost.inc(n)
        self.metrics.errors.labels(error="LeaseLost").inc(n)

    # ---------------------------------------------------------------------------------- heartbeat

    def _heartbeat_fields(self) -> dict[str, object]:
        self.tel.lanes(self.router.lanes.values())
        fields = {HB.IN_FLIGHT: len(self._owned), **self.tel.heartbeat_fields(self.router.models())}
        return {**fields, **self.router.heartbeat_fields()}
