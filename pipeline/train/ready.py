"""`ReadyLeases`: everything one trainer rank does with the `ready` stream, in one place.

From the read to the acknowledgement a rank owns its entries of `ready` (consumer ``<name>-<rank>``):
it reads its own pending entries first (left by an earlier process of the same name), then new ones;
keeps every entry it holds renewed; dead-letters what can never train (stage "trainer") and
acknowledges stale samples as counted skips; remembers which trained samples no checkpoint includes
yet and acknowledges them once one does. It also carries the rank's heartbeat, its `stats` counters
and the policy announcements. Redis work runs on the trainer's IO loop (`pipeline.train.ioloop`);
methods meant for the training thread say so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from pipeline.errors import RedisUnavailable, StreamGroupMissing
from pipeline.queue.connection import RedisRetry
from pipeline.queue.lease import Entry, Held, StreamConsumer
from pipeline.queue.runstate import Counts, Heartbeat, publish_policy
from pipeline.queue.schema import HB, Role, RunKeys, Stage, Stat
from pipeline.queue.streams import ensure_groups
from pipeline.train.ioloop import IOLoop

log = logging.getLogger("gkd.train")

#: Attempts at acknowledging trained samples after a checkpoint before keeping them for the next one.
ACK_ATTEMPTS = 6


class ReadyLeases:
    """This rank's entries of the `ready` stream, read and not yet acknowledged."""

    def __init__(
        self,
        io: IOLoop,
        r: aioredis.Redis,
        keys: RunKeys,
        consumer: str,
        *,
        lease_ms: int,
        stop: threading.Event,
    ) -> None:
        self.io, self.r, self.keys = io, r, keys
        self.consumer = StreamConsumer(r, keys.ready, consumer, lease_ms=lease_ms)
        self.held = Held(self.consumer)
        self.retry = RedisRetry(f"trainer {consumer}")
        self.counts = Counts()
        self.unacked: list[Entry] = []
        """Trained entries (payloads dropped) that wait for a checkpoint to be acknowledged."""
        self._stop = stop
        self._cursor: bytes | None = b"0"  # own-pending phase until a page comes back empty
        self._heartbeat: Heartbeat | None = None
        self._tasks: list[Any] = []
        io.run(ensure_groups(r, keys))

    # ---------------------------------------------------------------------- IO loop (prefetcher)

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """Up to `count` entries to train on: this consumer's own pending entries first, in stream order,
        then new ones (waiting up to `block_ms`). Retried through Redis outages; [] once stopping."""
        try:
            read = lambda: self._read(count, block_ms)  # noqa: E731
            return await self.retry.call("reading ready samples", read, stop=self._stop)
        except RedisUnavailable:
            return []  # stopped during an outage
        except StreamGroupMissing:
            log.warning("%s: ready's consumer group is gone (Redis lost its data?); recreating it", self.name)
            await ensure_groups(self.r, self.keys)
            return []

    async def _read(self, count: int, block_ms: int) -> list[Entry]:
        try:
            while self._cursor is not None:
                page, self._cursor = await self.consumer.read_own_pending(count, after=self._cursor)
                fresh = [e for e in page if e.sid not in self.held]
                if fresh:
                    self.held.add(fresh)
                    return fresh
            entries = await self.consumer.read(count, block_ms=block_ms)
        except RedisUnavailable:
            # A read whose reply was lost may have delivered entries to this consumer: look for them
            # among its own pending entries before reading new ones.
            self._cursor = b"0"
            raise
        self.held.add(entries)
        return entries

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
            if entry.sid in self.held:
                log.error("ready entry %s (%s) dead-lettered: %s", entry.sid, entry.id, reason)
                await self.consumer.dead_letter(entry, Stage.TRAINER, reason)
                self.held.drop([entry])
        if skipped:
            flags = await self.consumer.ack(skipped)
            self.held.drop(skipped)
            self.counts.add(Stat.STALE_SKIPPED, sum(flags))
            log.info("skipped %d stale samples", sum(flags))

    # ---------------------------------------------------------------------- training thread

    @property
    def name(self) -> str:
        return self.consumer.consumer

    def trained(self, entries: Sequence[Entry]) -> None:
        """These entries' samples are in the current update: drop payloads, wait for a checkpoint."""
        hollowed = [e.hollow() for e in entries]
        self.held.add(hollowed)  # replaces the full entries: same sids, still renewed
        self.unacked += hollowed

    def listing(self) -> list[tuple[str, int]]:
        """(entry id, payload bytes) of the trained, unacknowledged entries (for the checkpoint)."""
        return [(e.sid.decode(), e.size) for e in self.unacked]

    def ack_trained(self) -> None:
        """Acknowledge the trained entries. If Redis stays down they are kept (and listed again by the
        next checkpoint, which includes them too)."""
        todo = list(self.unacked)
        if not todo:
            return
        try:
            acked = self.retry.call("acking trained", lambda: self.consumer.ack(todo), attempts=ACK_ATTEMPTS)
            flags = self.io.run(acked)
        except RedisUnavailable as exc:
            log.error("acknowledging %d samples failed (%s); kept for the next checkpoint", len(todo), exc)
            return
        except StreamGroupMissing:
            flags = [False] * len(todo)  # Redis lost its data: nothing left to acknowledge
        lost = [e.id for e, ok in zip(todo, flags, strict=True) if not ok]
        if lost:
            log.error("%d trained samples were no longer owned by %s at the ack (lease lost): %s",
                      len(lost), self.name, lost[:5])  # fmt: skip
        self.held.drop(todo)
        self.unacked = self.unacked[len(todo) :]

    def settle_listed(self, listed: Mapping[str, Sequence[tuple[str, int]]], rank: int, world: int) -> int:
        """On resume: acknowledge the entries a checkpoint includes. Each rank settles its own; rank 0
        also those of consumers whose rank no longer exists (a smaller world). Returns how many."""
        done = 0
        for name, entries in listed.items():
            idx = name.rsplit("-", 1)[-1]
            theirs = idx.isdigit() and int(idx) >= world and rank == 0
            if name != self.name and not theirs:
                continue
            consumer = StreamConsumer(self.r, self.keys.ready, name)
            es = [Entry(sid=sid.encode(), id="", data=b"", size=n) for sid, n in entries]
            done += sum(self.io.run(consumer.ack(es)))
        return done

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

    def start(self, fields: Callable[[], dict[str, object]]) -> None:
        """Start renewing held entries and beating (heartbeat fields: in flight plus `fields()`)."""
        self._heartbeat = Heartbeat(
            self.r, self.keys, self.name, Role.TRAINER,
            fields=lambda: {HB.IN_FLIGHT: len(self.held), **fields()}, counts=self.counts,
        )  # fmt: skip
        self._tasks = [self.io.submit(self.held.renew_forever()), self.io.submit(self._heartbeat.run())]

    def close(self) -> None:
        """Stop the background tasks, flush the counters, remove the heartbeat (best effort)."""
        for t in self._tasks:
            self.io.loop.call_soon_threadsafe(t.cancel)
        try:
            self.io.run(self.counts.flush(self.r, self.keys), timeout_s=10)
            if self._heartbeat is not None:
                self.io.run(self._heartbeat.remove(), timeout_s=10)
        except Exception as exc:  # best effort at exit
            log.warning("final stats flush failed: %r", exc)
