"""Teacher faults seen by `gkd workers` processes: transient HTTP and transport failures are retried until
the sample is right; permanent ones (malformed, truncated or invalid bodies, 4xx) dead-letter the rollout
with a reason that names the problem; k above the server's maximum refuses to start; one of two teachers
going down fails over to the other, opens its breaker, and gets traffic again once it is back.

Faults are planned per rollout (the fake teacher reads the rollout's index from its tokens), so the ledger
knows where each rollout must end. Every sample in ready is compared with the teacher's own top-k: a
failed call never becomes -inf, zero rows or another rollout's scores.
"""

from __future__ import annotations

import asyncio
import random
import signal
from typing import Any

import pytest
import redis.asyncio as aioredis

from pipeline.queue.schema import RunKeys
from pipeline.queue.streams import add_rollouts, ensure_groups
from tests.faults_harness import (
    FaultyTeacher,
    Procs,
    check_scores,
    outcome,
    procs,
    rollouts,
    stream_entries,
    wait_until,
    worker_cmd,
)

__all__ = ["procs"]

#: fault -> how many times it hits a rollout before the teacher answers correctly (retryable faults).
TRANSIENT = {"500": 1, "503": 2, "429": 2, "slow": 1, "trickle": 1, "disconnect": 1, "truncated": 1}
#: fault (every attempt) -> a phrase the dead-letter reason must contain.
PERMANENT = {
    "truncated_json": "do not decode",
    "malformed": "expected a JSON body",
    "wrong_rows": "rows",
    "nan": "NaN",
    "positive": "logprobs <= 0",
    "raw_logits": "logprobs <= 0",
    "unnormalized": "sum to <= 1",
    "bad_request": "HTTP 400",
    "bad_request_flat": "fake bad request",
}


async def _settled(r: aioredis.Redis, keys: RunKeys, n: int) -> bool:
    done = int(await r.xlen(keys.ready.key)) + int(await r.xlen(keys.dead.key))
    return done >= n and int(await r.xlen(keys.rollouts.key)) == 0


async def _stop(procs: Procs, *names: str) -> dict[str, int]:
    for n in names:
        procs.signal(n, signal.SIGTERM)
    return {n: await procs.wait(n, 30) for n in names}


async def test_transient_faults_retry_to_the_right_answer_and_permanent_ones_dead_letter(
    redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    # Rollout i gets fault faults[i % len(faults)] ("ok" for a third of them).
    faults = [*TRANSIENT, *PERMANENT, *["ok"] * 8]

    def plan(i: int, attempt: int) -> str | None:
        fault = faults[i % len(faults)]
        if fault in PERMANENT or attempt < TRANSIENT.get(fault, 0):
            return fault
        return None

    fake = await FaultyTeacher(plan=plan, seed=2, slow_s=4.0).start()
    fake.trickle_s = 4.0  # past the worker's 2 s request timeout
    keys = RunKeys.for_run("tfault")
    try:
        await ensure_groups(r, keys)
        procs.spawn("w0", worker_cmd(redis_url, keys.run, [fake.url], "w0", concurrency=16))
        items = rollouts(2 * len(faults), "tf")
        await add_rollouts(r, keys, items)
        await wait_until(lambda: _settled(r, keys, len(items)), 120, "every rollout settled", procs=procs,
                         alive=["w0"])  # fmt: skip
        assert (await _stop(procs, "w0")) == {"w0": 0}, procs.tail("w0")
        result = await outcome(r, keys, [rid for rid, _ in items])
        result.assert_exactly_once("ready")
        want_dead = {rid for i, (rid, _) in enumerate(items) if faults[i % len(faults)] in PERMANENT}
        assert set(result.dead) == want_dead, result.summary("ready")
        for i, (rid, _) in enumerate(items):
            fault = faults[i % len(faults)]
            if fault in PERMANENT:
                ((stage, reason),) = result.dead[rid]
                assert stage == "teacher" and PERMANENT[fault] in reason, (fault, reason)
            elif fault in TRANSIENT:
                assert fake.attempts[i] == TRANSIENT[fault] + 1, (fault, fake.attempts[i])
        for e in await stream_entries(r, keys.ready.key):
            assert check_scores(fake, e["data"]) == e["id"].decode()
    finally:
        await fake.stop()


async def test_k_above_the_teachers_maximum_refuses_to_start_and_touches_nothing(
    redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    fake = await FaultyTeacher(k_max=2).start()
    keys = RunKeys.for_run("kmax")
    try:
        await ensure_groups(r, keys)
        await add_rollouts(r, keys, rollouts(5, "km"))
        procs.spawn("w0", worker_cmd(redis_url, keys.run, [fake.url], "w0", k=4))
        rc = await procs.wait("w0", 60)
        log = procs.tail("w0")
        assert rc == 2, log
        assert "max-logprobs" in log and "greater than max allowed: 2" in log, log
        assert int(await r.xlen(keys.rollouts.key)) == 5
        pending: Any = await r.xpending(keys.rollouts.key, "teachers")
        assert pending["pending"] == 0
    finally:
        await fake.stop()


async def test_one_of_two_teachers_down_fails_over_opens_its_breaker_and_recovers(
    redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    ta = await FaultyTeacher(seed=3, delay_s=0.02).start()
    tb = await FaultyTeacher(seed=3, delay_s=0.02).start()
    keys = RunKeys.for_run("failover")
    try:
        await ensure_groups(r, keys)
        procs.spawn("w0", worker_cmd(redis_url, keys.run, [ta.url, tb.url], "w0"))
        items = rollouts(240, "fo")
        await add_rollouts(r, keys, items[:60])
        await wait_until(lambda: _settled(r, keys, 60), 60, "the first 60", procs=procs, alive=["w0"])
        assert ta.scored > 0 and tb.scored > 0, "both teachers share the load while up"

        await ta.stop()  # connection refused from now on
        b_before = tb.scored
        await add_rollouts(r, keys, items[60:150])
        await wait_until(lambda: _settled(r, keys, 150), 60, "failover to tB", procs=procs, alive=["w0"])
        assert tb.scored - b_before >= 90
        await wait_until(lambda: "circuit breaker open" in procs.tail("w0", 10**6), 10, "tA's breaker")

        a_before = ta.scored
        await ta.start(ta.port)  # back on the same address
        await asyncio.sleep(2.5)  # the breaker lets a probe through after breaker_reset_s (2 s)
        await add_rollouts(r, keys, items[150:])
        await wait_until(lambda: _settled(r, keys, len(items)), 60, "the rest", procs=procs, alive=["w0"])
        assert ta.scored > a_before, "tA gets traffic again after it came back"

        assert (await _stop(procs, "w0")) == {"w0": 0}, procs.tail("w0")
        result = await outcome(r, keys, [rid for rid, _ in items])
        result.assert_exactly_once("ready")
        assert not result.dead, result.dead
        for e in await stream_entries(r, keys.ready.key):
            assert check_scores(tb, e["data"]) == e["id"].decode()
    finally:
        await ta.stop()
        await tb.stop()


async def test_all_teachers_down_keeps_rollouts_and_finishes_when_one_returns(
    redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    """A full outage never dead-letters: rollouts stay owned (leases renewed) and complete afterwards."""
    ta = await FaultyTeacher(seed=4).start()
    keys = RunKeys.for_run("outage")
    try:
        await ensure_groups(r, keys)
        procs.spawn("w0", worker_cmd(redis_url, keys.run, [ta.url], "w0"))
        await wait_until(lambda: "concurrency " in procs.tail("w0"), 60, "w0 to start", procs=procs,
                         alive=["w0"])  # fmt: skip
        await ta.stop()
        items = rollouts(30, "out")
        await add_rollouts(r, keys, items)
        await asyncio.sleep(4.0)  # well past the 1.5 s lease: nothing may be lost or dead meanwhile
        assert int(await r.xlen(keys.dead.key)) == 0 and int(await r.xlen(keys.ready.key)) == 0
        await ta.start(ta.port)
        await wait_until(lambda: _settled(r, keys, len(items)), 60, "recovery", procs=procs, alive=["w0"])
        assert (await _stop(procs, "w0")) == {"w0": 0}
        result = await outcome(r, keys, [rid for rid, _ in items])
        result.assert_exactly_once("ready")
        assert not result.dead
    finally:
        await ta.stop()


@pytest.mark.long
async def test_long_random_teacher_faults_and_flapping_endpoints(
    redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    """2000 rollouts, two workers, two teachers; every request has a 15% chance of a transient fault and
    2% of rollouts fail permanently; each teacher goes down and comes back twice."""
    rng = random.Random(11)
    kinds = list(TRANSIENT)
    permanent = {i: rng.choice(list(PERMANENT)) for i in range(2000) if rng.random() < 0.02}

    def plan(i: int, attempt: int) -> str | None:
        if i in permanent:
            return permanent[i]
        return rng.choice(kinds) if attempt < 3 and rng.random() < 0.15 else None

    teachers = [await FaultyTeacher(plan=plan, seed=8, slow_s=3.0).start() for _ in range(2)]
    keys = RunKeys.for_run("tlong")
    try:
        await ensure_groups(r, keys)
        urls = [t.url for t in teachers]
        for w in ("w0", "w1"):
            procs.spawn(w, worker_cmd(redis_url, keys.run, urls, w, concurrency=16, max_deliveries=50))
        items = rollouts(2000, "tl")
        await add_rollouts(r, keys, items[:1000])
        for round_ in range(4):
            t = teachers[round_ % 2]
            await asyncio.sleep(3)
            await t.stop()
            await asyncio.sleep(3)
            await t.start(t.port)
            if round_ == 1:
                await add_rollouts(r, keys, items[1000:])
        await wait_until(lambda: _settled(r, keys, len(items)), 600, "everything settled", procs=procs,
                         alive=["w0", "w1"])  # fmt: skip
        assert (await _stop(procs, "w0", "w1")) == {"w0": 0, "w1": 0}
        result = await outcome(r, keys, [rid for rid, _ in items])
        result.assert_exactly_once("ready")
        assert set(result.dead) == {items[i][0] for i in permanent}, result.summary("ready")
        for e in await stream_entries(r, keys.ready.key):
            assert check_scores(teachers[0], e["data"]) == e["id"].decode()
    finally:
        for t in teachers:
            await t.stop()
