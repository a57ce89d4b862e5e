"""A worker's start and stop around its loop: releasing what an earlier process left, saying why it idles,
and draining in-flight rollouts at stop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Set

import redis.asyncio as aioredis

from pipeline.notice import WaitNotice
from pipeline.queue.connection import where
from pipeline.queue.partitions import Partitioned
from pipeline.queue.runstate import other_runs
from pipeline.queue.schema import RunKeys

log = logging.getLogger("gkd.worker")

#: While stopping, how often the worker says how many rollouts are still in flight and for how long.
COUNTDOWN_EVERY_S = 5.0


async def release_own_pending(consumer: Partitioned) -> int:
    """Make the entries an earlier process with this consumer name left pending reclaimable now; returns
    how many."""
    released = 0
    cursor: bytes | None = b"0"
    while cursor is not None:
        mine, cursor = await consumer.read_own_pending(1000, after=cursor)
        released += sum(await consumer.release(mine))
    return released


async def note_idle(idle: WaitNotice, busy: bool, r: aioredis.Redis, keys: RunKeys, name: str) -> None:
    """Count an idle read; every ~30 s of them, say what the worker waits for (and which other runs
    this Redis holds: a mistyped or forgotten --run)."""
    if busy:
        idle.over()
        return
    if not idle.due():
        idle.waiting("")  # counts the wait; silent until it is due
        return
    run = keys.run
    others = await other_runs(r, keys)
    elsewhere = f"; other runs in this Redis: {', '.join(others[:5])}" if others else ""
    idle.waiting(
        f"worker {name}: no rollouts to score in {keys.rollouts.key} (Redis at "
        f"{where(r)}); is a producer feeding run {run!r}? (gkd status --run {run}){elsewhere}"
    )


async def drain(tasks: Set[asyncio.Task[None]], grace_s: float, hurry: asyncio.Event, who: str) -> None:
    """Give in-flight rollouts `grace_s` to finish (or until `hurry` is set), counting down in the log;
    the caller cancels the rest (then released). `tasks` is the live set (tasks leave it as they end)."""
    if not tasks:
        return
    deadline = time.monotonic() + grace_s
    log.info("%s: stopping; %d rollouts in flight get %.0f s to finish, then the rest is handed "
             "back (stop again, e.g. Ctrl-C, to hand them back now)", who, len(tasks), grace_s)  # fmt: skip
    hurried = asyncio.ensure_future(hurry.wait())
    said = time.monotonic()
    try:
        # A task ends once its result is published (or dead-lettered): this covers the handoffs.
        while tasks and not hurry.is_set() and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait({*tasks, hurried}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if time.monotonic() - said >= COUNTDOWN_EVERY_S and tasks:
                said = time.monotonic()
                log.info("%s: %d rollouts still in flight; handing them back in %.0f s",
                         who, len(tasks), max(deadline - said, 0))  # fmt: skip
    finally:
        hurried.cancel()
    if hurry.is_set() and tasks:
        log.info("%s: stopped again: handing back %d rollouts now", who, len(tasks))
