"""The trained journal, the producer's batch marker and the bounded dead stream, against a real Redis."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.errors import NameInUse
from pipeline.queue import schema as K
from pipeline.queue.journal import Journal
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.runstate import Heartbeat
from pipeline.queue.schema import HB, Role, RunKeys, Stat
from pipeline.queue.streams import add_rollouts, batch_landed, ensure_groups
from pipeline.train.ready import retrain
from pipeline.wire.codec import META_RETRAIN_OF_STEP, Rollout, decode_rollout, encode_rollout
from tests.redis_helpers import read_stats


async def in_ready(r: aioredis.Redis, keys: RunKeys, n: int) -> list[str]:
    """n samples put into ready the way workers do; returns their ids."""
    await ensure_groups(r, keys)
    ids = [f"s{i}" for i in range(n)]
    await add_rollouts(r, keys, [(i, b"r") for i in ids])
    worker = StreamConsumer(r, keys.rollouts, "w")
    got = await worker.read(n, block_ms=100)
    await worker.handoff(keys.ready, [(e, b"scored-" + e.id.encode() * 10, 1) for e in got])
    return ids


def rollout(rid: str) -> bytes:
    return encode_rollout(Rollout(rid, np.arange(6, dtype=np.int32), prompt_len=2, policy_version=3))


async def journal_steps(r: aioredis.Redis, keys: RunKeys, step_of: dict[str, int]) -> None:
    """Train `step_of` (id -> step) as trainer-0 and journal each step."""
    t = StreamConsumer(r, keys.ready, "trainer-0")
    got = {e.id: e for e in await t.read(len(step_of), block_ms=100)}
    for step in sorted(set(step_of.values())):
        trained = [replace(got[i], data=rollout(i)) for i, s in step_of.items() if s == step]
        assert await t.journal(trained, step) == [True] * len(trained)


async def test_journal_moves_trained_samples_out_of_ready_with_their_step(
    r: aioredis.Redis, keys: RunKeys
) -> None:
    await in_ready(r, keys, 4)
    t = StreamConsumer(r, keys.ready, "trainer-0")
    other = StreamConsumer(r, keys.ready, "trainer-1")
    mine = await t.read(3, block_ms=100)
    theirs = await other.read(1, block_ms=100)
    flags = await t.journal([replace(e, data=rollout(e.id)) for e in [*mine, *theirs]], 7)
    assert flags == [True, True, True, False]  # trainer-0 does not own the last one
    assert (
        await r.xlen(keys.ready.key) == 1
        and (await r.xpending(keys.ready.key, K.TRAINERS_GROUP))["pending"] == 1
    )
    entries = await r.xrange(keys.journal.key)
    assert [f[b"id"] for _, f in entries] == [b"s0", b"s1", b"s2"]
    assert all(f[b"step"] == b"7" and f[b"consumer"] == b"trainer-0" for _, f in entries)
    assert decode_rollout(entries[0][1][b"data"]).id == "s0"
    stats = await read_stats(r, keys)
    assert stats[keys.ready.bytes_out] == sum(e.size for e in mine)  # the scored payloads left
    assert stats[keys.journal.bytes_in] == sum(len(rollout(e.id)) for e in mine)


async def test_trim_drops_the_journal_up_to_a_mark(r: aioredis.Redis, keys: RunKeys) -> None:
    await in_ready(r, keys, 6)
    await journal_steps(r, keys, {"s0": 1, "s1": 1, "s2": 2, "s3": 2})
    journal = Journal(r, keys)
    mark = await journal.mark()
    await journal_steps(r, keys, {"s4": 3, "s5": 3})  # the next steps, after the checkpoint's mark
    assert await journal.trim(mark) == 4
    assert [f[b"id"] for _, f in await r.xrange(keys.journal.key)] == [b"s4", b"s5"]
    assert await journal.trim(None) == 0 and await Journal(r, RunKeys.for_run("empty")).mark() is None
    stats = await read_stats(r, keys)
    assert stats[keys.journal.bytes_in] - stats[keys.journal.bytes_out] == 2 * len(rollout("s4"))


async def test_requeue_puts_steps_past_the_checkpoint_back_once(r: aioredis.Redis, keys: RunKeys) -> None:
    await in_ready(r, keys, 5)
    await journal_steps(r, keys, {"s0": 3, "s1": 4, "s2": 5, "s3": 5, "s4": 6})
    journal = Journal(r, keys)
    assert await journal.requeue(4, retrain) == (3, 2)  # steps 5, 6 back; 3, 4 in the checkpoint
    assert await journal.requeue(4, retrain) == (0, 0)  # a second resume finds nothing
    back = [decode_rollout(f[b"data"]) for _, f in await r.xrange(keys.rollouts.key)]
    assert [ro.id for ro in back] == ["s2", "s3", "s4"]
    assert [ro.meta[META_RETRAIN_OF_STEP] for ro in back] == [5, 5, 6]
    assert all(ro.policy_version == 3 and list(ro.input_ids) == list(range(6)) for ro in back)
    assert await r.xlen(keys.journal.key) == 0
    stats = await read_stats(r, keys)
    assert (stats[Stat.REQUEUED], stats[Stat.JOURNAL_DROPPED]) == (3, 2)
    assert stats[keys.journal.bytes_in] == stats[keys.journal.bytes_out]


async def test_settle_acknowledges_listed_entries_whoever_holds_them(
    r: aioredis.Redis, keys: RunKeys
) -> None:
    await in_ready(r, keys, 3)
    a, b = StreamConsumer(r, keys.ready, "trainer-0"), StreamConsumer(r, keys.ready, "trainer-1")
    got_a, got_b = await a.read(2, block_ms=100), await b.read(1, block_ms=100)
    listed = {"trainer-0": [(got_a[0].sid.decode(), got_a[0].size)], "gone-1": [(got_b[0].sid.decode(), 5)]}
    assert await Journal(r, keys).settle(listed) == 2
    assert await Journal(r, keys).settle(listed) == 0
    assert [f[b"id"] for _, f in await r.xrange(keys.ready.key)] == [got_a[1].id.encode()]


async def test_batch_marker_tells_a_landed_batch_after_it_was_consumed(
    r: aioredis.Redis, keys: RunKeys
) -> None:
    await ensure_groups(r, keys)
    await add_rollouts(r, keys, [("a", b"x"), ("b", b"y")], batch_id="batch-1")
    w = StreamConsumer(r, keys.rollouts, "w")
    await w.ack(await w.read(2, block_ms=100))  # scored, trained, acknowledged: the stream is empty
    assert await r.xlen(keys.rollouts.key) == 0
    assert await batch_landed(r, keys, "batch-1") and not await batch_landed(r, keys, "batch-2")
    ttl = await r.pttl(keys.batch_marker("batch-1"))
    assert K.BATCH_MARKER_TTL_MS - 60_000 < ttl <= K.BATCH_MARKER_TTL_MS


async def test_dead_stream_is_bounded_and_counts_what_it_trims_or_cuts(
    r: aioredis.Redis, keys: RunKeys
) -> None:
    await ensure_groups(r, keys)
    n = 260
    await add_rollouts(r, keys, [(f"r{i}", bytes([i % 256]) * (50 if i % 2 else 500)) for i in range(n)])
    w = StreamConsumer(r, keys.rollouts, "w", dead_max_entries=20, dead_max_payload_bytes=100)
    for e in await w.read(n, block_ms=100):
        assert await w.dead_letter(e, "decode", "bad")
    stats = await read_stats(r, keys)
    length = await r.xlen(keys.dead.key)
    assert stats[Stat.DEAD] == n and stats[Stat.DEAD_TRIMMED] + length == n
    assert 20 <= length <= 20 + 100  # approximate trimming keeps whole stream nodes (100 entries each)
    assert stats[Stat.DEAD_CUT] == n // 2
    for _, f in await r.xrange(keys.dead.key):
        cut = f.get(K.FIELD_CUT_FROM.encode())
        assert len(f[b"data"]) == (100 if cut else 50) and cut in (None, b"500")
    assert stats[keys.rollouts.bytes_out] == stats[keys.rollouts.bytes_in]  # the full payloads left


async def test_a_name_belongs_to_one_live_process(r: aioredis.Redis, keys: RunKeys) -> None:
    first = Heartbeat(r, keys, "trainer-0", Role.TRAINER, ttl_ms=600)
    await first.claim()
    beating = asyncio.create_task(first.run())
    try:
        with pytest.raises(NameInUse, match="another live process uses this name"):
            await Heartbeat(r, keys, "trainer-0", Role.TRAINER, ttl_ms=600).claim()
    finally:
        beating.cancel()
    # It stopped beating (a process that died elsewhere): the name is free once its heartbeat expires.
    second = Heartbeat(r, keys, "trainer-0", Role.TRAINER, ttl_ms=600)
    await asyncio.wait_for(second.claim(), 5)
    assert (await r.hget(keys.worker("trainer-0"), HB.INSTANCE)).decode() == second.instance


async def test_a_dead_pid_on_this_host_gives_up_its_name_at_once(r: aioredis.Redis, keys: RunKeys) -> None:
    stale = Heartbeat(r, keys, "w0", Role.WORKER, ttl_ms=60_000)
    await stale.claim()
    await r.hset(keys.worker("w0"), HB.PID, "999999999")  # no such process: it died, its hash stays
    fresh = Heartbeat(r, keys, "w0", Role.WORKER, ttl_ms=60_000)
    await asyncio.wait_for(fresh.claim(), 2)  # not the 60 s TTL
    shared = Heartbeat(r, keys, "w0", Role.PRODUCER, ttl_ms=60_000, exclusive=False)
    await shared.beat()  # producers share names: a beat takes the hash over without a claim
    assert (await r.hget(keys.worker("w0"), HB.INSTANCE)).decode() == shared.instance
