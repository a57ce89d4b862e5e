"""`ReadyLeases`: everything one trainer rank does with the `ready` stream, in one place.

From the read to the optimizer step a rank owns its entries of `ready` (consumer ``<name>-<rank>``):
it reads its own pending entries first (left by an earlier process of the same name), then takes over
entries idle longer than the lease (their trainer died, or the job resumed with fewer ranks or other
names), then reads new ones; it keeps every entry it holds renewed, dead-letters what can never train
(stage "trainer") and acknowledges stale samples as counted skips. Right after each optimizer step a
background writer moves the step's samples out of `ready` and into the run's trained journal, keeping
only their compact rollouts (`pipeline.queue.journal`); until that write is confirmed they stay held,
and a checkpoint written meanwhile lists them (`unjournaled`). It also carries the rank's heartbeat,
its `stats` counters and the policy announcements. Redis work runs on the trainer's IO loop
(`pipeline.train.ioloop`); methods meant for the training thread say so.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from pipeline.errors import RedisUnavailable, StreamGroupMissing, WireFormatError
from pipeline.queue.connection import RedisRetry
from pipeline.queue.durable import Replicas
from pipeline.queue.journal import Journals
from pipeline.queue.lease import Entry, Held
from pipeline.queue.partitions import Partitioned
from pipeline.queue.runstate import Counts, Heartbeat, publish_policy
from pipeline.queue.schema import HB, Role, RunKeys, Stage, Stat
from pipeline.queue.streams import ensure_groups
from pipeline.sections import FlowSettings
from pipeline.train.ioloop import IOLoop
from pipeline.wire.codec import META_RETRAIN_OF_STEP, decode_rollout, encode_rollout

log = logging.getLogger("gkd.train")


def retrain(payload: bytes, step: int) -> bytes:
    """A journaled rollout marked for retraining (exempt from the staleness filter); as it was if it
    does not decode (a worker then dead-letters it, naming the field)."""
    try:
        rollout = decode_rollout(payload)
    except WireFormatError:
        return payload
    rollout.meta = {**rollout.meta, META_RETRAIN_OF_STEP: step}
    return encode_rollout(rollout)


class ReadyLeases:
    """This rank's entries of the `ready` stream, from the read to the journal."""

    def __init__(
        self,
        io: IOLoop,
        r: aioredis.Redis,
        keys: RunKeys,
        consumer: str,
        *,
        flow: FlowSettings,
        stop: threading.Event,
        partitions: int = 1,
        replicas: Replicas | None = None,
    ) -> None:
        self.io, self.r, self.keys, self.partitions = io, r, keys, partitions
        # With replicas, reads wait too: a delivery a failover forgot would hand a trained sample out again.
        self.consumer = Partitioned(
            r, keys.ready, keys.parts(partitions), consumer, lease_ms=flow.lease_ms,
            max_deliveries=flow.max_deliveries, dead_max_entries=flow.dead_max_entries,
            dead_max_payload_bytes=flow.dead_max_payload_bytes, replicas=replicas, wait_reads=True,
        )  # fmt: skip
        self.held = Held(self.consumer)
        self.journal = Journals(r, keys.parts(partitions))
        self.retry = RedisRetry(f"trainer {consumer}")
        self.counts = Counts()
        self._stop = stop
        self._cursor: bytes | None = b"0"  # own-pending phase until a page comes back empty
        self._next_reclaim = 0.0
        self._pending: list[tuple[int, list[Entry]]] = []  # (step, entries) not yet journaled
        self._pending_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._step_fields: Callable[[], dict[str, object]] = dict
        self._heartbeat = Heartbeat(r, keys, consumer, Role.TRAINER, fields=self._fields, counts=self.counts)
        self._tasks: list[Any] = []
        io.run(ensure_groups(r, keys, partitions))
        io.run(self._heartbeat.claim())  # NameInUse: another live process has this consumer name

    @property
    def name(self) -> str:
        return self.consumer.consumer

    # ---------------------------------------------------------------------- IO loop (prefetcher)

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """Up to `count` entries to train on: this consumer's own pending entries first, in stream order,
        then stranded ones (idle past the lease), then new ones (waiting up to `block_ms`). Retried
        through Redis outages; [] once stopping."""
        try:
            read = lambda: self._read(count, block_ms)  # noqa: E731
            return await self.retry.call("reading ready samples", read, stop=self._stop)
        except RedisUnavailable:
            return []  # stopped during an outage
        except StreamGroupMissing:
            log.warning("%s: ready's consumer group is gone (Redis lost its data?); recreating it", self.name)
            await ensure_groups(self.r, self.keys, self.partitions)
            return []

    async def _read(self, count: int, block_ms: int) -> list[Entry]:
        try:
            while self._cursor is not None:
                page, self._cursor = await self.consumer.read_own_pending(count, after=self._cursor)
                fresh = [e for e in page if e.ref not in self.held]
                if fresh:
                    self._hold(fresh)
                    return fresh
            if time.monotonic() >= self._next_reclaim and (taken := await self._reclaim(count)):
                return taken
            entries = await self.consumer.read(count, block_ms=block_ms)
        except RedisUnavailable:
            # A read whose reply was lost may have delivered entries to this consumer: look for them
            # among its own pending entries before reading new ones.
            self._cursor = b"0"
            raise
        self._hold(entries)
        return entries

    def _hold(self, entries: Sequence[Entry]) -> None:
        self.held.add(e.hollow() for e in entries)  # renewing needs no payload: the batches have it

    async def _reclaim(self, count: int) -> list[Entry]:
        """Take over entries idle past the lease; dead-letter those delivered too often."""
        ok, over = await self.consumer.reclaim(count)
        full = len(ok) + len(over) >= count
        self._next_reclaim = 0.0 if full else time.monotonic() + min(self.consumer.lease_ms / 2000, 10.0)
        for e in over:
            reason = (f"delivered {e.deliveries} times (max_deliveries={self.consumer.max_deliveries}); "
                      f"trainers kept dying or stalling on it")  # fmt: skip
            await self.consumer.dead_letter(e, Stage.TRAINER, reason)
        fresh = [e for e in ok if e.ref not in self.held]  # held ones: our renewal lagged, still ours
        if fresh:
            self._hold(fresh)
            self.counts.add(Stat.RECLAIMED, len(fresh))
            log.info("%s: took over %d stranded samples (their trainer is gone)", self.name, len(fresh))
        return fresh

    async def reject(self, skipped: Sequence[Entry], dead: Sequence[tuple[Entry, str]]) -> None:
        """Settle entries that will not train: dead-letter `dead` (with reasons), acknowledge `skipped`
        (stale samples, counted). Both leave the held set. Kept pending if stopped during an outage."""
        try:
            settle = lambda: self._reject(skipped, dead)  # noqa: E731
            await self.retry.call("settling rejected samples", settle, stop=self._stop)
        except (RedisUnavailable, StreamGroupMissing) as exc:
            log.warning("%s: rejected samples left pending (%s); settled after a restart", self.name, exc)

    async def _reject(self, skipped: Sequence[Entry], dead: Sequence[tuple[Entry, str]]) -> None:
        for entry, reason in dead:
            if entry.ref in self.held:
                log.error("ready entry %s (%s) dead-lettered: %s", entry.sid, entry.id, reason)
                await self.consumer.dead_letter(entry, Stage.TRAINER, reason)
                self.held.drop([entry])
        if skipped:
            flags = await self.consumer.ack(skipped)
            self.held.drop(skipped)
            self.counts.add(Stat.STALE_SKIPPED, sum(flags))
            log.info("skipped %d stale samples", sum(flags))

    async def _journal_forever(self) -> None:
        """Journal trained steps in order, each retried until Redis takes it."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                with self._pending_lock:
                    step, entries = self._pending[0]
                flags = await self._journal_step(entries, step)
                lost = [e.id for e, ok in zip(entries, flags, strict=True) if not ok]
                if lost:  # journaled by an attempt whose reply was lost, or taken over after a stall
                    log.warning("%s: %d trained samples were no longer ours to journal: %s",
                                self.name, len(lost), lost[:5])  # fmt: skip
                self.held.drop(entries)
                with self._pending_lock:
                    self._pending.pop(0)

    async def _journal_step(self, entries: Sequence[Entry], step: int) -> list[bool]:
        """One journal write per partition, each retried on its own until Redis takes it: a partition
        whose master fails over does not make the others' entries look lost on the retry."""
        by_part: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            by_part.setdefault(e.part, []).append(i)
        flags = [False] * len(entries)
        for idx in by_part.values():
            part = [entries[i] for i in idx]
            try:
                write = functools.partial(self.consumer.journal, part, step)
                done = await self.retry.call("journaling trained samples", write)
            except StreamGroupMissing:
                done = [False] * len(part)  # Redis lost its data: nothing left to move
            for i, ok in zip(idx, done, strict=True):
                flags[i] = ok
        return flags

    # ---------------------------------------------------------------------- training thread

    def trained(self, entries: Sequence[Entry], step: int) -> None:
        """These entries (payload: the compact rollout) were trained in optimizer step `step`: journal
        them in the background."""
        with self._pending_lock:
            self._pending.append((step, list(entries)))
        self.io.loop.call_soon_threadsafe(self._wake.set)

    def unjournaled(self, wait_s: float) -> list[tuple[str, int]]:
        """Wait up to `wait_s` for the trained samples' journal writes; (entry id, payload bytes) of those
        still not confirmed (for the checkpoint to list: a resume acknowledges them)."""
        deadline = time.monotonic() + wait_s
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.005)
        with self._pending_lock:
            return [(e.ref.decode(), e.size) for _, entries in self._pending for e in entries]

    def recover(self, listed: Mapping[str, Sequence[tuple[str, int]]], step: int) -> None:
        """Before any rank reads (rank 0 at start): settle the ready entries the checkpoint of `step` lists,
        put journal entries of later steps back into rollouts, drop the rest."""
        settled = self.io.run(
            self.retry.call("settling checkpointed samples", lambda: self.journal.settle(listed))
        )
        requeue = lambda: self.journal.requeue(step, retrain)  # noqa: E731
        requeued, dropped = self.io.run(self.retry.call("requeuing the journal", requeue), timeout_s=None)
        if settled or requeued or dropped:
            log.info(
                "resume at step %d: %d checkpointed samples settled, %d trained samples after it put "
                "back into rollouts, %d journal entries dropped",
                *(step, settled, requeued, dropped),
            )

    def journal_mark(self) -> list[bytes | None]:
        """The journal's newest entry (rank 0, after every rank journaled the checkpoint's steps)."""
        return self.io.run(self.retry.call("reading the journal", self.journal.mark))

    def trim_journal(self, mark: list[bytes | None]) -> None:
        """Drop the journal up to `mark` once the checkpoint that includes it is written (best effort:
        what stays is dropped by the next trim or a resume)."""
        try:
            self.io.run(self.retry.call("trimming the journal", lambda: self.journal.trim(mark), attempts=6))
        except (RedisUnavailable, StreamGroupMissing) as exc:
            log.warning("trimming the journal failed (%s); the next checkpoint trims it", exc)

    def count_step(self, *, samples: int, tokens: int, wait_ms: int, step_ms: int, steps: int) -> None:
        """Add to the run's counters (sent with the next heartbeat; kept and resent if Redis is down)."""
        self.counts.update(
            {
                Stat.TRAINED_SAMPLES: samples,
                Stat.TRAINED_TOKENS: tokens,
                Stat.DATA_WAIT_MS: wait_ms,
                Stat.STEP_MS: step_ms,
                Stat.TRAINER_STEPS: steps,
            }
        )

    def publish(self, version: int, path: str) -> None:
        """Announce the policy of a written checkpoint (rank 0); a failure waits for the next one."""
        try:
            self.io.run(publish_policy(self.r, self.keys, version, path), timeout_s=30)
        except (RedisUnavailable, TimeoutError) as exc:
            log.error(
                "publishing policy version %d failed (%s); the next checkpoint publishes again", version, exc
            )

    def _fields(self) -> dict[str, object]:
        return {HB.IN_FLIGHT: len(self.held), **self._step_fields()}

    def start(self, fields: Callable[[], dict[str, object]]) -> None:
        """Start renewing held entries, journaling and beating (heartbeat fields: in flight + `fields()`)."""
        self._step_fields = fields
        self._tasks = [
            self.io.submit(self.held.renew_forever()),
            self.io.submit(self._heartbeat.run()),
            self.io.submit(self._journal_forever()),
        ]

    def close(self) -> None:
        """Stop the background tasks, flush the counters, remove the heartbeat (best effort)."""
        for t in self._tasks:
            self.io.loop.call_soon_threadsafe(t.cancel)
        try:
            self.io.run(self.counts.flush(self.r, self.keys), timeout_s=10)
            self.io.run(self._heartbeat.remove(), timeout_s=10)
        except Exception as exc:  # best effort at exit
            log.warning("final stats flush failed: %r", exc)
