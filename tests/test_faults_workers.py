"""Worker-process faults: kill -9 at every phase of a rollout's life, a stalled worker whose lease is taken
over, SIGTERM mid-batch, a poison rollout, malformed rollouts. `gkd workers` runs as real processes
against a real Redis and loopback fake vLLM teachers.

Judge: the ledger (tests/faults_harness.py). Nothing consumes `ready` here, so a duplicate handoff would
show as two entries; every ready sample is also checked against the teacher's own top-k (no corrupted,
empty or misaligned sample). Phases of a kill, for the worker w0 and its own teacher tA:
- before the teacher answered: tA is down (503); w0 holds its rollouts in its outage retry loop;
- during the teacher call: tA holds the requests (gate closed);
- after the teacher answered, before the handoff: Redis writes are paused (CLIENT PAUSE WRITE), tA answers,
  w0's handoff script waits in Redis; then w0 dies;
- right after a handoff: publish + acknowledge + delete are one Lua script, so no kill can fall between
  them; w0 dies as soon as ready grows;
- lease takeover: w0 is SIGSTOPped mid-call past its lease; w1 reclaims and publishes; w0 resumes, gets
  its (now stale) answers and tries to publish: the handoff is refused, w0 reports the loss.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis

from pipeline.queue import schema as K
from pipeline.queue.schema import TEACHERS_GROUP, RunKeys
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.wire.codec import decode_scored
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

__all__ = ["procs"]  # the fixture, imported for pytest
#: The line a worker logs once its start-up checks passed and it begins reading.
STARTED = "concurrency "


async def _pending(r: aioredis.Redis, keys: RunKeys, consumer: str) -> list[dict[str, Any]]:
    return await r.xpending_range(keys.rollouts.key, TEACHERS_GROUP, "-", "+", 10_000, consumername=consumer)


async def _settled(r: aioredis.Redis, keys: RunKeys, n: int) -> bool:
    """Every one of `n` produced rollouts is in ready or dead, and the rollouts stream is empty."""
    done = int(await r.xlen(keys.ready.key)) + int(await r.xlen(keys.dead.key))
    return done >= n and int(await r.xlen(keys.rollouts.key)) == 0


async def _stop_all(procs: Procs, names: list[str]) -> dict[str, int]:
    for name in names:
        procs.signal(name, signal.SIGCONT)
        procs.signal(name, signal.SIGTERM)
    return {name: await procs.wait(name, 30) for name in names}


async def _started(procs: Procs, names: list[str], timeout_s: float = 60) -> None:
    """Wait until the current process of each worker passed its start-up checks and reads."""
    for name in names:
        marker_seen = functools.partial(lambda n: STARTED in procs.since_spawn(n), name)
        await wait_until(marker_seen, timeout_s, f"{name} to start", procs=procs, alive=[name])


async def _verify_ready(r: aioredis.Redis, keys: RunKeys, fake: FaultyTeacher) -> None:
    for e in await stream_entries(r, keys.ready.key):
        assert check_scores(fake, e["data"]) == e["id"].decode()


@pytest.fixture
async def teachers():  # type: ignore[no-untyped-def]
    """Two identical fake teachers (same table), one per worker, so each worker's calls can be steered."""
    fakes = [await FaultyTeacher(seed=1, delay_s=0.01).start() for _ in range(2)]
    yield fakes
    for fake in fakes:
        fake.gate.set()
        await fake.stop()


async def test_kill_9_at_every_phase_and_a_lease_takeover_lose_and_duplicate_nothing(
    redis_url: str, r: aioredis.Redis, teachers: list[FaultyTeacher], procs: Procs
) -> None:
    keys = RunKeys.for_run("kill")
    ta, tb = teachers
    await ensure_groups(r, keys)
    # Request timeouts are long here so that the stalled worker, once resumed, reads its teacher's
    # answers and tries to publish them (instead of timing out first).
    # max_deliveries is high: a rollout may be in w0's hands at several of its kills, and the Redis write
    # pause of phase 3 makes every lease look lapsed (reclaims count as deliveries too).
    extra = ["--request-timeout-s", "30"]
    cmd = {
        n: worker_cmd(redis_url, keys.run, [t.url], n, max_deliveries=20, extra=extra)
        for n, t in (("w0", ta), ("w1", tb))
    }
    for name, args in cmd.items():
        procs.spawn(name, args)
    await _started(procs, list(cmd))
    produced: list[str] = []

    async def add(n: int) -> None:
        items = rollouts(n, "kill", start=len(produced))
        await add_rollouts(r, keys, items)
        produced.extend(rid for rid, _ in items)

    killed_holding: list[set[bytes]] = []  # per kill: the rollouts w0 owned when it died

    async def restart_w0(then: Callable[[], Awaitable[None] | None] = lambda: None) -> set[bytes]:
        """kill -9 w0, run `then`, start w0 again and wait until it reads (its teacher checks passed).
        Returns the entries w0 owned when it died."""
        held = {p["message_id"] for p in await _pending(r, keys, "w0")}
        assert procs.kill9("w0") == -signal.SIGKILL
        killed_holding.append(held)
        done = then()
        if done is not None:
            await done
        before = procs.started("w0", STARTED)
        procs.spawn("w0", cmd["w0"])
        await wait_until(lambda: procs.started("w0", STARTED) > before, 60, "w0 restarted", procs=procs,
                         alive=["w0"])  # fmt: skip
        return held

    async def w0_holds() -> bool:
        return len(await _pending(r, keys, "w0")) > 0

    await add(20)
    await wait_until(lambda: _settled(r, keys, len(produced)), 60, "the first batch", procs=procs,
                     alive=["w0", "w1"])  # fmt: skip

    # 1. Before the teacher answered: tA is down, w0 keeps its rollouts in the outage retry loop.
    ta.mode = "503"
    await add(30)
    await wait_until(w0_holds, 30, "w0 to hold rollouts while tA answers 503", procs=procs, alive=["w0"])
    await wait_until(lambda: ta.scored > 0, 30, "tA to answer 503s")
    await restart_w0(then=lambda: setattr(ta, "mode", "ok"))

    # 2. During the teacher call: tA holds the requests.
    ta.gate.clear()
    await add(30)
    await wait_until(lambda: ta.waiting > 0, 30, "w0 mid-call", procs=procs, alive=["w0"])
    await restart_w0(then=ta.gate.set)

    # 3. After the teacher answered, before the handoff: Redis refuses writes for a while.
    ta.gate.clear()
    await add(30)
    await wait_until(lambda: ta.waiting > 0, 30, "w0 mid-call", procs=procs, alive=["w0"])
    answered = ta.scored
    await r.client_pause(20_000, all=False)  # writes (XREADGROUP, handoff scripts) wait; reads go on
    try:
        ta.gate.set()
        await wait_until(lambda: ta.scored > answered and ta.inflight == 0, 10, "answers")
        await asyncio.sleep(0.3)  # w0 parses, packs and sends its handoff, which waits in Redis
        still_pending: set[bytes] = set()

        async def unpause() -> None:
            await r.client_unpause()  # the new w0 needs writes to start
            # The dead w0's handoff never ran: what it held is still pending, unpublished.
            pend: Any = await r.xpending_range(keys.rollouts.key, TEACHERS_GROUP, "-", "+", 10_000)
            still_pending.update(p["message_id"] for p in pend)

        held = await restart_w0(then=unpause)
        assert held and held <= still_pending, (held, still_pending)
    finally:
        await r.client_unpause()

    # 4. Right after a handoff (publish + ack + delete are one script: nothing falls between them).
    before = int(await r.xlen(keys.ready.key))
    await add(30)
    await wait_until(lambda: _grew(r, keys.ready.key, before), 30, "a handoff")
    await restart_w0()

    # 5. Lease takeover: w0 stalls mid-call past its lease; w1 reclaims and publishes; w0 resumes and must
    # not publish its stale results.
    await wait_until(lambda: _settled(r, keys, len(produced)), 60, "phases 1-4 to settle", procs=procs,
                     alive=["w0", "w1"])  # fmt: skip
    ta.gate.clear()
    await add(30)
    await wait_until(lambda: ta.waiting > 0, 30, "w0 mid-call", procs=procs, alive=["w0"])
    stalled = {p["message_id"] for p in await _pending(r, keys, "w0")}
    assert stalled
    procs.signal("w0", signal.SIGSTOP)
    ta.gate.set()  # the answers wait in w0's socket

    async def taken_over() -> bool:
        mine = {p["message_id"] for p in await _pending(r, keys, "w0")}
        return not (mine & stalled)

    await wait_until(taken_over, 30, "w1 to reclaim w0's stalled rollouts", procs=procs, alive=["w1"])
    await wait_until(lambda: _settled(r, keys, len(produced)), 60, "w1 to publish them", procs=procs,
                     alive=["w1"])  # fmt: skip
    procs.signal("w0", signal.SIGCONT)
    refused = "another worker owns it now"
    await wait_until(lambda: refused in procs.tail("w0", 10**6), 30, "w0 to try publishing a stale result",
                     procs=procs, alive=["w0"])  # fmt: skip

    assert all(killed_holding[:3]), f"w0 held nothing at a kill of phases 1-3: {killed_holding}"
    assert "reclaimed" in procs.tail("w1", 10**6) or "reclaimed" in procs.tail("w0", 10**6)
    codes = await _stop_all(procs, ["w0", "w1"])
    assert codes == {"w0": 0, "w1": 0}, {n: procs.tail(n) for n in codes}
    lost = re.findall(r"(\d+) lost to other workers", procs.tail("w0", 10**6))
    assert lost and int(lost[-1]) >= 1, procs.tail("w0")
    result = await outcome(r, keys, produced)
    result.assert_exactly_once("ready")
    assert not result.dead, result.dead
    await _verify_ready(r, keys, ta)
    assert int(await r.xlen(keys.rollouts.key)) == 0


async def _grew(r: aioredis.Redis, stream: str, before: int) -> bool:
    return int(await r.xlen(stream)) > before


@pytest.mark.parametrize("finish", ["within-grace", "after-grace"])
async def test_sigterm_mid_batch_exits_0_and_loses_nothing(
    redis_url: str, r: aioredis.Redis, teachers: list[FaultyTeacher], procs: Procs, finish: str
) -> None:
    """SIGTERM while w0 has a batch in flight: it stops reading, lets the batch finish within --grace-s
    (5 s) or releases it at once after the grace; exit 0; w1 scores what was released."""
    keys = RunKeys.for_run("term")
    ta, tb = teachers
    await ensure_groups(r, keys)
    procs.spawn("w0", worker_cmd(redis_url, keys.run, [ta.url], "w0"))
    await _started(procs, ["w0"])
    items = rollouts(40, "term")
    ta.gate.clear()
    await add_rollouts(r, keys, items)
    await wait_until(lambda: ta.waiting >= 4, 30, "w0's batch in flight", procs=procs,
                     alive=["w0"])  # fmt: skip
    held = len(await _pending(r, keys, "w0"))
    procs.signal("w0", signal.SIGTERM)
    if finish == "within-grace":
        await asyncio.sleep(1.0)
        ta.gate.set()
    rc = await procs.wait("w0", 30)
    assert rc == 0, procs.tail("w0")
    log = procs.tail("w0", 10**6)
    left = await _pending(r, keys, "w0")
    if finish == "after-grace":
        # Released: still in w0's pending list, but idle beyond the lease (any worker may take them now)
        # and without the hand-back counted as a delivery.
        released = re.findall(r"released (\d+) unfinished rollouts", log)
        assert released and int(released[-1]) == len(left) >= 4, (released, len(left), log[-2000:])
        assert all(int(p["time_since_delivered"]) >= 1500 and p["times_delivered"] == 0 for p in left), left
    else:
        assert not left and int(await r.xlen(keys.ready.key)) >= held, (held, left)
    ta.gate.set()
    procs.spawn("w1", worker_cmd(redis_url, keys.run, [tb.url], "w1"))
    await wait_until(lambda: _settled(r, keys, len(items)), 60, "w1 to finish", procs=procs, alive=["w1"])
    assert (await _stop_all(procs, ["w1"])) == {"w1": 0}
    result = await outcome(r, keys, [rid for rid, _ in items])
    result.assert_exactly_once("ready")
    assert not result.dead
    await _verify_ready(r, keys, ta)


async def test_poison_rollout_that_kills_its_worker_ends_in_dead_while_others_flow(
    redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    """A rollout that crashes whichever worker holds it, every time.

    Construction: the teacher never answers for the poison (it hangs), and the test kills -9 the worker
    process holding it as soon as the poison is the only rollout that worker holds, then restarts it
    under the same name (as `gkd workers --procs` restarts a child). This runs the real crash path:
    the poison stays pending, is reclaimed after the lease with its delivery count raised, and after
    max_deliveries (3) the reclaiming worker dead-letters it. The other rollouts flow meanwhile.
    """
    keys = RunKeys.for_run("poison")
    poison = 7
    fake = await FaultyTeacher(seed=1, plan=lambda i, n: "hang" if i == poison else None).start()
    try:
        await ensure_groups(r, keys)
        cmd = {n: worker_cmd(redis_url, keys.run, [fake.url], n, max_deliveries=3) for n in ("w0", "w1")}
        for n, args in cmd.items():
            procs.spawn(n, args)
        await _started(procs, list(cmd))
        items = rollouts(60, "poison")
        poison_id = items[poison][0]
        await add_rollouts(r, keys, items[:30])
        kills = 0
        calls_at_kill = 0  # the teacher's count of calls for the poison when we last crashed a worker

        async def poison_dead() -> bool:
            nonlocal kills, calls_at_kill
            if any(e["id"].decode() == poison_id for e in await stream_entries(r, keys.dead.key)):
                return True
            if fake.attempts[poison] == calls_at_kill:
                return False  # no worker is processing the poison right now
            for n in cmd:
                pend = await _pending(r, keys, n)
                if len(pend) == 1 and await _is(r, keys, pend[0]["message_id"], poison_id):
                    # n is scoring the poison (its call hangs) and nothing else: it "crashes" on it.
                    assert procs.kill9(n) == -signal.SIGKILL
                    kills += 1
                    calls_at_kill = fake.attempts[poison]
                    procs.spawn(n, cmd[n])
                    if kills == 2:
                        await add_rollouts(r, keys, items[30:])  # more work arrives while it crashes
            return False

        await wait_until(poison_dead, 120, "the poison in dead", procs=procs, poll_s=0.1)
        await wait_until(
            lambda: _settled(r, keys, len(items)), 60, "the others", procs=procs, alive=list(cmd)
        )
        await _started(procs, list(cmd))  # a SIGTERM before a worker's handlers exist kills it (-15)
        assert (await _stop_all(procs, list(cmd))) == {"w0": 0, "w1": 0}
        result = await outcome(r, keys, [rid for rid, _ in items])
        result.assert_exactly_once("ready")
        assert list(result.dead) == [poison_id]
        ((stage, reason),) = result.dead[poison_id]
        assert stage == "teacher" and "max_deliveries=3" in reason, reason
        assert kills == 3, f"expected 3 crashes before the 4th delivery dead-letters it, got {kills}"
        dead = (await stream_entries(r, keys.dead.key))[0]
        assert dead["data"] == items[poison][1] and int(dead["deliveries"]) == 4
        await _verify_ready(r, keys, fake)
    finally:
        await fake.stop()


async def _is(r: aioredis.Redis, keys: RunKeys, sid: bytes, rid: str) -> bool:
    got: Any = await r.xrange(keys.rollouts.key, min=sid, max=sid)
    return bool(got) and got[0][1][b"id"].decode() == rid


def _bad_payloads(good: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (payload, the field the dead-letter reason must name)."""
    obj = msgpack.unpackb(good, raw=False)

    def edited(**changes: object) -> bytes:
        o = msgpack.unpackb(good, raw=False)
        for path, value in changes.items():
            target = o
            *parents, last = path.split("__")
            for p in parents:
                target = target[p]
            target[last] = value
        return msgpack.packb(o, use_bin_type=True)

    n = len(obj["input_ids"]["data"]) // 4
    return {
        "not-msgpack": (b"\xc1\x00garbage", "rollout"),
        "not-a-map": (msgpack.packb([1, 2, 3]), "rollout"),
        "truncated": (good[: len(good) // 2], "rollout"),
        "wrong-version": (edited(v=2), "v"),
        "wrong-dtype": (edited(input_ids__dtype="<f4"), "input_ids.dtype"),
        "big-endian": (edited(input_ids__dtype=">i4"), "input_ids.dtype"),
        "huge-shape": (edited(input_ids__shape=[2**62]), "input_ids.data"),
        "shape-mismatch": (edited(input_ids__shape=[n + 1]), "input_ids.data"),
        "too-long": (edited(input_ids__shape=[40_000], input_ids__data=b"\x00" * 160_000), "input_ids.shape"),
        "bad-prompt-len": (edited(prompt_len=n), "prompt_len"),
        "missing-id": (msgpack.packb({k: v for k, v in obj.items() if k != "id"}), "id"),
        "ext-type": (edited(meta=msgpack.ExtType(1, b"x")), "rollout"),
    }


async def test_malformed_rollouts_go_to_dead_and_no_process_crashes(
    redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    keys = RunKeys.for_run("bad")
    fake = await FaultyTeacher(seed=1).start()
    try:
        await ensure_groups(r, keys)
        for n in ("w0", "w1"):
            procs.spawn(n, worker_cmd(redis_url, keys.run, [fake.url], n))
        good = rollouts(40, "bad")
        bad = _bad_payloads(good[0][1])
        mixed = list(good[:20]) + [(f"bad-{name}", payload) for name, (payload, _) in bad.items()] + good[20:]
        random.Random(0).shuffle(mixed)
        await add_rollouts(r, keys, mixed)
        await wait_until(lambda: _settled(r, keys, len(mixed)), 60, "all settled", procs=procs,
                         alive=["w0", "w1"])  # fmt: skip
        assert (await _stop_all(procs, ["w0", "w1"])) == {"w0": 0, "w1": 0}
        result = await outcome(r, keys, [rid for rid, _ in mixed])
        result.assert_exactly_once("ready")
        assert set(result.ready) == {rid for rid, _ in good}
        assert set(result.dead) == {f"bad-{name}" for name in bad}
        for name, (_, field) in bad.items():
            ((stage, reason),) = result.dead[f"bad-{name}"]
            assert stage == "decode" and reason.startswith(f"{field}:"), (name, stage, reason)
        # Dead keeps the original payload, cut at --dead-max-payload-bytes (64 KiB) and marked when longer.
        kept = {e["id"].decode(): e for e in await stream_entries(r, keys.dead.key)}
        for n, (p, _) in bad.items():
            e, limit = kept[f"bad-{n}"], K.DEAD_MAX_PAYLOAD_BYTES
            assert e["data"] == p[:limit] and e.get(K.FIELD_CUT_FROM) == (
                str(len(p)).encode() if len(p) > limit else None
            ), n
        assert len(bad["too-long"][0]) > K.DEAD_MAX_PAYLOAD_BYTES  # one of them was cut
        await _verify_ready(r, keys, fake)
    finally:
        await fake.stop()


async def test_rollout_with_a_huge_meta_map_is_scored_or_dead_never_held_forever(
    redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    """A rollout whose meta map has 70,000 entries (0.5 MB, under every limit). It once broke the encoder
    (C1, fixed in pipeline/mpack.py 9279516), and the worker then held such a rollout and renewed its
    lease forever (W1, fixed in pipeline/worker/loop.py 0448f5e: any encode failure dead-letters). Now
    it is scored like any other, with its meta intact."""
    keys = RunKeys.for_run("reenc")
    fake = await FaultyTeacher(seed=1).start()
    try:
        await ensure_groups(r, keys)
        procs.spawn("w0", worker_cmd(redis_url, keys.run, [fake.url], "w0", max_deliveries=1))
        good = rollouts(5, "reenc")
        obj = msgpack.unpackb(good[0][1], raw=False)
        obj["id"] = "big-meta"
        obj["meta"] = {str(i): i for i in range(70_000)}
        items = [*good[1:], ("big-meta", msgpack.packb(obj, use_bin_type=True))]
        await add_rollouts(r, keys, items)
        await wait_until(lambda: _settled(r, keys, len(items)), 30, "all settled", procs=procs, alive=["w0"])
        result = await outcome(r, keys, [rid for rid, _ in items])
        result.assert_exactly_once("ready")
        assert not result.dead, result.dead
        (big,) = [e for e in await stream_entries(r, keys.ready.key) if e["id"] == b"big-meta"]
        assert decode_scored(big["data"]).rollout.meta == obj["meta"]
        await _verify_ready(r, keys, fake)
    finally:
        await fake.stop()


# ------------------------------------------------------------------------------------------- long


@pytest.mark.long
async def test_long_chaos_three_workers_thousands_of_rollouts(
    redis_url: str, r: aioredis.Redis, procs: Procs
) -> None:
    """3000 rollouts produced under backpressure while a chaos loop, every 0.3-1.0 s, kills -9 a random
    worker (at a random moment, mid-call or not), stalls one past its lease, or SIGTERMs one, and
    restarts it. Then the ledger: exactly once in ready, every sample equal to the teacher's."""
    keys = RunKeys.for_run("chaos")
    fakes = [await FaultyTeacher(seed=1, delay_s=0.005).start() for _ in range(3)]
    rng = random.Random(1)
    try:
        await ensure_groups(r, keys)
        names = ["w0", "w1", "w2"]
        cmd = {n: worker_cmd(redis_url, keys.run, [f.url], n) for n, f in zip(names, fakes, strict=True)}
        for n in names:
            procs.spawn(n, cmd[n])
        items = rollouts(3000, "chaos")
        producer = asyncio.create_task(_produce_slowly(r, keys, items))
        actions = {"kill9": 0, "kill9-mid-call": 0, "stall": 0, "sigterm": 0}
        while not producer.done() or not await _settled(r, keys, len(items)):
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            if producer.done() and sum(actions.values()) > 40:
                continue  # enough chaos: let it drain
            i = rng.randrange(3)
            n, fake = names[i], fakes[i]
            action = rng.choice(list(actions))
            actions[action] += 1
            if action == "kill9-mid-call":
                fake.gate.clear()
                await asyncio.sleep(0.2)
                procs.kill9(n)
                fake.gate.set()
            elif action == "stall":
                procs.signal(n, signal.SIGSTOP)
                await asyncio.sleep(2.5)  # past the 1.5 s lease: others reclaim
                procs.signal(n, signal.SIGCONT)
                continue
            elif action == "sigterm":
                procs.signal(n, signal.SIGTERM)
                await procs.wait(n, 30)
            else:
                procs.kill9(n)
            procs.spawn(n, cmd[n])
        await producer
        await wait_until(lambda: _settled(r, keys, len(items)), 300, "drain", procs=procs, alive=names)
        await _started(procs, names)  # a SIGTERM before a worker's handlers exist kills it (-15)
        assert (await _stop_all(procs, names)) == dict.fromkeys(names, 0)
        result = await outcome(r, keys, [rid for rid, _ in items])
        result.assert_exactly_once("ready")
        assert not result.dead, result.dead
        await _verify_ready(r, keys, fakes[0])
        print(f"chaos actions: {actions}; {result.summary('ready')}")
    finally:
        for f in fakes:
            f.gate.set()
            await f.stop()


async def _produce_slowly(r: aioredis.Redis, keys: RunKeys, items: list[tuple[str, bytes]]) -> None:
    for i in range(0, len(items), 50):
        await add_rollouts(r, keys, items[i : i + 50])
        await asyncio.sleep(0.5)
