"""Run-wide state against a real Redis: backpressure, heartbeats, the run config check, the policy."""

from __future__ import annotations

import asyncio
import sys

import pytest
import redis.asyncio as aioredis

from pipeline.errors import ConfigMismatch
from pipeline.queue.backpressure import Backpressure, WaterMarks
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.runstate import (
    Heartbeat,
    check_run_config,
    incr_stats,
    publish_policy,
    read_policy,
)
from pipeline.queue.schema import HB, RunKeys, Stat
from pipeline.queue.streams import add_rollouts, ensure_groups
from tests.redis_helpers import live_workers, read_config, read_stats


async def test_backpressure_blocks_above_high_and_releases_below_low(
    r: aioredis.Redis, keys: RunKeys
) -> None:
    await ensure_groups(r, keys)
    marks = WaterMarks(high_entries=10, low_entries=4, high_bytes=10**9, low_bytes=10**9)
    bp = Backpressure(r, keys.rollouts, marks, poll_s=0.01, max_poll_s=0.02)
    await add_rollouts(r, keys, [(f"r{i}", b"x") for i in range(9)])
    assert await bp.wait_for_room() == 0.0  # 9 < high: no wait
    await add_rollouts(r, keys, [("r9", b"x")])
    waiter = asyncio.create_task(bp.wait_for_room())
    await asyncio.sleep(0.05)
    assert bp.paused and not waiter.done()
    consumer = StreamConsumer(r, keys.rollouts, "c")
    entries = await consumer.read(count=10, block_ms=100)
    for n_left in (8, 6, 5):
        await consumer.ack(entries[: 10 - n_left])
        await asyncio.sleep(0.08)
        assert not waiter.done(), f"released at {n_left} entries, above the low mark 4"
        assert bp.paused
    await consumer.ack(entries[:6])  # 4 left = low mark
    waited = await asyncio.wait_for(waiter, timeout=5)
    assert waited > 0 and not bp.paused and await r.xlen(keys.rollouts.key) == 4


async def test_backpressure_counts_bytes(r: aioredis.Redis, keys: RunKeys) -> None:
    await ensure_groups(r, keys)
    marks = WaterMarks(high_entries=1000, low_entries=500, high_bytes=1000, low_bytes=100)
    bp = Backpressure(r, keys.rollouts, marks, poll_s=0.01, max_poll_s=0.02)
    await add_rollouts(r, keys, [("a", b"x" * 600), ("b", b"y" * 600)])
    assert await bp.level() == (2, 1200)
    stop = asyncio.Event()
    waiter = asyncio.create_task(bp.wait_for_room(stop))
    await asyncio.sleep(0.05)
    assert bp.paused
    consumer = StreamConsumer(r, keys.rollouts, "c")
    got = await consumer.read(count=2, block_ms=100)
    await consumer.ack(got[:1])  # 600 bytes left: still above low (100)
    await asyncio.sleep(0.08)
    assert not waiter.done()
    await consumer.ack(got[1:])
    await asyncio.wait_for(waiter, timeout=5)
    assert await bp.level() == (0, 0)


async def test_backpressure_wait_ends_when_stopping(r: aioredis.Redis, keys: RunKeys) -> None:
    await ensure_groups(r, keys)
    bp = Backpressure(r, keys.rollouts, WaterMarks(high_entries=1, low_entries=0), poll_s=0.01)
    await add_rollouts(r, keys, [("a", b"x")])
    stop = asyncio.Event()
    waiter = asyncio.create_task(bp.wait_for_room(stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(waiter, timeout=5)


def test_water_marks_validate() -> None:
    with pytest.raises(ValueError, match="low_entries <= high_entries"):
        WaterMarks(high_entries=10, low_entries=20)
    with pytest.raises(ValueError, match="low_bytes <= high_bytes"):
        WaterMarks(high_bytes=10, low_bytes=20)


async def test_heartbeats_are_listed_then_expire(r: aioredis.Redis, keys: RunKeys) -> None:
    await Heartbeat(
        r, keys, "w1", "worker", ttl_ms=200, fields=lambda: {HB.IN_FLIGHT: 3, "positions": 10}
    ).beat()
    await Heartbeat(r, keys, "t0", "trainer", ttl_ms=5000, fields=lambda: {HB.IN_FLIGHT: 0}).beat()
    live = await live_workers(r, keys)
    assert set(live) == {"w1", "t0"}
    assert (
        live["w1"]["role"] == "worker" and live["w1"]["in_flight"] == "3" and live["w1"]["positions"] == "10"
    )
    assert int(live["w1"]["pid"]) > 0
    await asyncio.sleep(0.3)
    assert set(await live_workers(r, keys)) == {"t0"}


async def test_heartbeats_of_other_runs_are_not_listed(r: aioredis.Redis, keys: RunKeys) -> None:
    other = RunKeys.for_run("other")
    await Heartbeat(r, other, "w9", "worker", ttl_ms=5000, fields=lambda: {HB.IN_FLIGHT: 0}).beat()
    assert await live_workers(r, keys) == {}


async def test_run_config_is_fixed_by_the_first_process(r: aioredis.Redis, keys: RunKeys) -> None:
    await check_run_config(r, keys, {"k": 20, "teacher_model": "tiny"})
    await check_run_config(r, keys, {"k": 20, "loss_mode": "tail"})  # a trainer adds its own setting
    assert await read_config(r, keys) == {"k": "20", "teacher_model": "tiny", "loss_mode": "tail"}
    with pytest.raises(ConfigMismatch) as info:
        await check_run_config(r, keys, {"k": 64, "teacher_model": "big"})
    msg = str(info.value)
    assert "k: run has '20', this process has '64'" in msg
    assert "teacher_model: run has 'tiny', this process has 'big'" in msg
    assert await read_config(r, keys) == {"k": "20", "teacher_model": "tiny", "loss_mode": "tail"}


async def test_policy_publish_and_read(r: aioredis.Redis, keys: RunKeys) -> None:
    assert await read_policy(r, keys) == (0, None)
    await publish_policy(r, keys, 3, "/ckpt/step-30")
    assert await read_policy(r, keys) == (3, "/ckpt/step-30")


async def test_stats_counters(r: aioredis.Redis, keys: RunKeys) -> None:
    await incr_stats(r, keys, {Stat.TRAINED_SAMPLES: 4, Stat.TRAINED_TOKENS: 100, Stat.TRAINER_STEPS: 0})
    await incr_stats(r, keys, {Stat.TRAINED_SAMPLES: 1})
    assert await read_stats(r, keys) == {Stat.TRAINED_SAMPLES: 5, Stat.TRAINED_TOKENS: 100}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is new in Python 3.11")
async def test_a_cancelled_heartbeat_loop_always_ends(r: aioredis.Redis, keys: RunKeys) -> None:
    """redis-py absorbs some cancellations that land inside a command; the client re-raises them, so a
    loop around Redis calls (heartbeat, lease renewal, retries) ends when cancelled. Before, about a
    third of these loops went on forever, and `gkd workers` could hang on SIGTERM."""
    hb = Heartbeat(r, keys, "n", "test", ttl_ms=3)  # beats every millisecond
    hung = 0
    for i in range(200):
        task = asyncio.create_task(hb.run())
        await asyncio.sleep(0.001 * (i % 7))
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=1.0)
        if not done:
            hung += 1
            task.cancel()
            await asyncio.wait([task], timeout=1.0)
    assert hung == 0
