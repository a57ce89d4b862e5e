"""Trainer faults in the whole pipeline (in-test producer -> `gkd workers` -> `gkd train` processes):
kill -9 of the trainer and `--resume` (every sample in exactly one optimizer step of the continued run);
a stalled trainer (SIGSTOP) under load (ready stays under its high-water mark plus one read batch per
worker, the rollouts stream under its own, Redis memory bounded; all resumes on SIGCONT); malformed
samples in `ready` go to `dead` without stopping the trainer.

Ledger: the trainer's `--sample-log` (steps a killed trainer took after its last checkpoint are dropped:
the resumed run retrains them) plus the dead stream; every produced rollout id exactly once.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis.asyncio as aioredis

from pipeline.queue.backpressure import WaterMarks
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.schema import RunKeys
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.wire.codec import Rollout, ScoredSample, encode_scored
from tests.faults_harness import (
    FaultyTeacher,
    Procs,
    outcome,
    procs,
    produce,
    rollouts,
    sample_log_count,
    student_path,
    trained_steps,
    trainer_cmd,
    used_memory,
    wait_until,
    worker_cmd,
)

__all__ = ["procs"]

STARTED = "concurrency "  # a worker's start-up line


@pytest.fixture
async def teacher():  # type: ignore[no-untyped-def]
    fake = await FaultyTeacher(seed=6).start()
    yield fake
    await fake.stop()


async def _done(r: aioredis.Redis, keys: RunKeys, sample_log: Path, n: int) -> bool:
    return sample_log_count(sample_log) + int(await r.xlen(keys.dead.key)) >= n


async def _stop(procs: Procs, names: list[str]) -> dict[str, int]:
    for n in names:
        procs.signal(n, signal.SIGCONT)
        procs.signal(n, signal.SIGTERM)
    return {n: await procs.wait(n, 90) for n in names}


def _steps(sample_log: Path) -> list[int]:
    return sorted(step for _, step in trained_steps(sample_log))


async def test_trainer_kill_9_and_resume_trains_every_sample_exactly_once(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    keys = RunKeys.for_run("tkill")
    sample_log, out = tmp_path / "samples.jsonl", tmp_path / "out"
    items = rollouts(240, "tk")
    await ensure_groups(r, keys)
    for w in ("w0", "w1"):
        procs.spawn(w, worker_cmd(redis_url, keys.run, [teacher.url], w))
    train = trainer_cmd(redis_url, keys.run, student_path(), out, sample_log, checkpoint_every=3)
    procs.spawn("trainer", train)
    await produce(r, keys, items)
    for at_step in (5, 13):  # kill between checkpoints (3, 6, 9, 12, ...): the steps since are lost

        def between_checkpoints(s: int = at_step) -> bool:
            steps = _steps(sample_log)
            return bool(steps) and steps[-1] >= s and steps[-1] % 3 != 0

        await wait_until(between_checkpoints, 180, f"step {at_step}", procs=procs,
                         alive=["trainer", "w0", "w1"])  # fmt: skip
        assert procs.kill9("trainer") == -signal.SIGKILL
        procs.spawn("trainer", [*train, "--resume"])
    await wait_until(lambda: _done(r, keys, sample_log, len(items)), 240, "everything trained", procs=procs,
                     alive=["trainer", "w0", "w1"])  # fmt: skip
    assert await procs.wait("trainer", 90) == 0, procs.tail("trainer")  # idle exit: checkpoint, acks
    assert await _stop(procs, ["w0", "w1"]) == {"w0": 0, "w1": 0}
    result = await outcome(r, keys, [rid for rid, _ in items], sample_log)
    result.assert_exactly_once("trained")
    assert not result.dead, result.dead
    steps = _steps(sample_log)
    assert steps == list(range(1, len(steps) + 1)), "the continued run's steps are 1..n without gaps"
    # The killed runs really lost steps past their checkpoints, which the resumed runs trained again.
    logged = len(sample_log.read_text().splitlines())
    assert logged > len(steps), f"{logged} step lines, {len(steps)} kept: no kill discarded a step"
    assert int(await r.xlen(keys.ready.key)) == 0 and int(await r.xlen(keys.rollouts.key)) == 0


async def test_stalled_trainer_bounds_ready_and_redis_memory_then_everything_resumes(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    keys = RunKeys.for_run("stall")
    sample_log = tmp_path / "samples.jsonl"
    ready_high, rollouts_high, concurrency, workers = 60, 40, 8, ("w0", "w1")
    # Long rollouts (k=20): ~25 KB per ready sample, so an unbounded ready stream would be obvious.
    items = rollouts(300, "st", tail=(100, 150))
    await ensure_groups(r, keys)
    marks = ["--high-water", str(ready_high), "--low-water", str(ready_high // 2)]
    for w in workers:
        procs.spawn(w, worker_cmd(redis_url, keys.run, [teacher.url], w, k=20, concurrency=concurrency,
                                  extra=marks))  # fmt: skip
    train = trainer_cmd(redis_url, keys.run, student_path(), tmp_path / "out", sample_log, k=20,
                        checkpoint_every=2, idle_exit_s=20, extra=["--batch-tokens", "1600"])  # fmt: skip
    procs.spawn("trainer", train)
    base_memory = await used_memory(r)
    peak = {"ready": 0, "rollouts": 0, "memory": 0}
    sampling = asyncio.Event()
    sampling.set()

    async def sampler() -> None:  # from the first rollout until the trainer resumes
        while sampling.is_set():
            peak["ready"] = max(peak["ready"], int(await r.xlen(keys.ready.key)))
            peak["rollouts"] = max(peak["rollouts"], int(await r.xlen(keys.rollouts.key)))
            peak["memory"] = max(peak["memory"], await used_memory(r))
            await asyncio.sleep(0.05)

    sampler_task = asyncio.create_task(sampler())
    producer = asyncio.create_task(
        produce(r, keys, items, batch=10, marks=WaterMarks(rollouts_high, rollouts_high // 2))
    )
    await wait_until(lambda: sample_log_count(sample_log) >= 40, 180, "training under way", procs=procs,
                     alive=["trainer", *workers])  # fmt: skip
    procs.signal("trainer", signal.SIGSTOP)
    # Producer and workers go on until their marks stop them (hysteresis: workers that paused at the
    # high mark wait for the low one, which a stalled trainer never brings): wait until nothing moves.
    last: tuple[int, int, int] = (-1, -1, -1)
    still_since = asyncio.get_running_loop().time()

    async def quiet() -> bool:
        nonlocal last, still_since
        now = (int(await r.xlen(keys.ready.key)), int(await r.xlen(keys.rollouts.key)), teacher.scored)
        if now != last:
            last, still_since = now, asyncio.get_running_loop().time()
        return asyncio.get_running_loop().time() - still_since > 3.0

    await wait_until(quiet, 90, "the stalled pipeline to come to rest", procs=procs, alive=list(workers))
    sampling.clear()
    await sampler_task
    assert not producer.done(), "the producer must be held back by the stalled pipeline"
    # Workers read a batch of at most `concurrency` after their last look at the level.
    assert ready_high <= peak["ready"] <= ready_high + len(workers) * concurrency, peak
    assert rollouts_high <= peak["rollouts"] <= rollouts_high + 10, peak
    sample_bytes = 30_000  # > the largest encoded sample here (150 rows x k=20 x 8 bytes + ids)
    bound = (ready_high + len(workers) * concurrency + rollouts_high + 10) * sample_bytes * 2 + (4 << 20)
    assert peak["memory"] - base_memory <= bound, (peak, base_memory, bound)
    procs.signal("trainer", signal.SIGCONT)
    await producer
    await wait_until(lambda: _done(r, keys, sample_log, len(items)), 300, "everything trained", procs=procs,
                     alive=["trainer", *workers])  # fmt: skip
    assert await procs.wait("trainer", 90) == 0, procs.tail("trainer")
    assert await _stop(procs, list(workers)) == {"w0": 0, "w1": 0}
    result = await outcome(r, keys, [rid for rid, _ in items], sample_log)
    result.assert_exactly_once("trained")
    assert not result.dead
    print(f"stall peaks: {peak}, base memory {base_memory}, bound {bound}")


async def test_malformed_ready_samples_go_to_dead_and_training_goes_on(
    redis_url: str, r: aioredis.Redis, procs: Procs, tmp_path: Path
) -> None:
    """Bad entries put straight into ready (bad msgpack, wrong version, wrong k, ids beyond the
    student's vocabulary, shape mismatch) are dead-lettered by the trainer; the good ones train."""
    keys = RunKeys.for_run("badready")
    sample_log = tmp_path / "samples.jsonl"
    await ensure_groups(r, keys)

    def scored(rid: str, i: int, k: int = 4, top: int = 60) -> tuple[str, bytes]:
        ids = np.arange(2 + i % 5, 12 + i % 5, dtype=np.int32)
        ro = Rollout(id=rid, input_ids=ids, prompt_len=3)
        rows = len(ids) - 3
        top_ids = (np.arange(rows * k, dtype=np.int32).reshape(rows, k) * 37 % top).astype(np.int32)
        lp = np.log(np.full((rows, k), 0.8 / k, dtype=np.float32))
        return ro.id, encode_scored(ScoredSample(ro, top_ids, lp, "t", k))

    good = [scored(f"good-{i:03d}", i) for i in range(60)]
    obj = msgpack.unpackb(scored("bad-version", 2)[1], raw=False)
    obj["v"] = 9
    bad = [
        ("bad-msgpack", b"\xc1garbage"),
        ("bad-version", msgpack.packb(obj, use_bin_type=True)),
        scored("bad-k", 0, k=5),
        scored("bad-id", 1, top=1000),  # teacher ids beyond the student's vocabulary of 320
        ("bad-shape", _reshaped(scored("bad-shape", 3)[1])),
    ]
    # Put samples into ready the way workers do (add rollouts, hand off), bad ones in the middle.
    mixed = good[:30] + bad + good[30:]
    await add_rollouts(r, keys, [(rid, b"x") for rid, _ in mixed])
    consumer = StreamConsumer(r, keys.rollouts, "filler")
    by_id = dict(mixed)
    got = await consumer.read(len(mixed), block_ms=100)
    await consumer.handoff(keys.ready, [(e, by_id[e.id], 1) for e in got])
    procs.spawn("trainer", trainer_cmd(redis_url, keys.run, student_path(), tmp_path / "out", sample_log))
    await wait_until(lambda: _done(r, keys, sample_log, len(mixed)), 120, "all settled", procs=procs,
                     alive=["trainer"])  # fmt: skip
    assert await procs.wait("trainer", 90) == 0, procs.tail("trainer")
    result = await outcome(r, keys, [rid for rid, _ in mixed], sample_log)
    result.assert_exactly_once("trained")
    assert set(result.dead) == {rid for rid, _ in bad}, result.summary("trained")
    assert all(stage == "trainer" for recs in result.dead.values() for stage, _ in recs), result.dead
    assert "k mismatch" in result.dead["bad-k"][0][1]
    assert "vocabulary" in result.dead["bad-id"][0][1]


def _reshaped(payload: bytes) -> bytes:
    obj = msgpack.unpackb(payload, raw=False)
    rows, k = obj["topk_ids"]["shape"]
    obj["topk_ids"]["shape"] = [rows + 1, k]  # the data no longer fits the declared shape
    return msgpack.packb(obj, use_bin_type=True)


async def test_trainer_holding_more_than_the_ready_high_water_mark_does_not_deadlock(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    """The trainer keeps trained samples unacknowledged until its next checkpoint, and they count toward
    ready's high-water mark. When a checkpoint interval needs more samples than the mark lets through,
    workers pause and the trainer must still make progress: it checkpoints early when starved. (Found by
    this suite as T1, a deadlock; fixed in workers/trainer.py 0e4ebe0.)"""
    keys = RunKeys.for_run("hold")
    sample_log = tmp_path / "samples.jsonl"
    items = rollouts(60, "hold")
    await ensure_groups(r, keys)
    marks = ["--high-water", "16", "--low-water", "8"]
    procs.spawn("w0", worker_cmd(redis_url, keys.run, [teacher.url], "w0", extra=marks))
    # ~10 samples per step, a checkpoint every 10 steps: ~100 samples held, far above the mark of 16.
    procs.spawn("trainer", trainer_cmd(redis_url, keys.run, student_path(), tmp_path / "out", sample_log,
                                       checkpoint_every=10))  # fmt: skip
    await produce(r, keys, items)
    last, last_change = -1, asyncio.get_running_loop().time()

    async def done_or_stuck() -> bool:
        nonlocal last, last_change
        n = sample_log_count(sample_log)
        now = asyncio.get_running_loop().time()
        if n != last:
            last, last_change = n, now
        stuck_s = now - last_change
        assert stuck_s < 15, f"no training progress for {stuck_s:.0f} s at {n} of {len(items)} samples"
        return await _done(r, keys, sample_log, len(items))

    await wait_until(done_or_stuck, 180, "everything trained", procs=procs, alive=["trainer", "w0"])
    assert await procs.wait("trainer", 90) == 0, procs.tail("trainer")
    assert await _stop(procs, ["w0"]) == {"w0": 0}
    result = await outcome(r, keys, [rid for rid, _ in items], sample_log)
    result.assert_exactly_once("trained")


async def test_trainer_sigterm_as_the_stream_runs_dry_exits_promptly(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    """SIGTERM right as the last sample is trained: checkpoint, acknowledge, exit 0 at once. (Found by
    this suite as T2: the prefetch loop spun after the stop event and the trainer hung for 15-90 s;
    fixed in pipeline/prefetch.py 938abdc.)"""
    keys = RunKeys.for_run("term")
    sample_log = tmp_path / "samples.jsonl"
    items = rollouts(120, "term")
    await ensure_groups(r, keys)
    procs.spawn("w0", worker_cmd(redis_url, keys.run, [teacher.url], "w0"))
    procs.spawn("trainer", trainer_cmd(redis_url, keys.run, student_path(), tmp_path / "out", sample_log,
                                       idle_exit_s=0))  # fmt: skip
    await produce(r, keys, items)
    await wait_until(lambda: sample_log_count(sample_log) >= len(items), 120, "all trained", procs=procs,
                     alive=["trainer"], poll_s=0.01)  # fmt: skip
    procs.signal("trainer", signal.SIGTERM)
    try:
        rc = await procs.wait("trainer", 20)
    except Exception as exc:
        raise AssertionError(f"gkd train did not exit within 20 s of SIGTERM: {exc!r}") from None
    assert rc == 0
    assert await _stop(procs, ["w0"]) == {"w0": 0}
    result = await outcome(r, keys, [rid for rid, _ in items], sample_log)
    result.assert_exactly_once("trained")


@pytest.mark.long
async def test_long_full_pipeline_trainer_and_workers_killed_repeatedly(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    """1500 rollouts through two workers and a trainer; the trainer is killed -9 and resumed four times,
    and a random worker is killed -9 and restarted every few seconds. Exactly once in training."""
    keys = RunKeys.for_run("longkill")
    sample_log, out = tmp_path / "samples.jsonl", tmp_path / "out"
    items = rollouts(1500, "lk")
    await ensure_groups(r, keys)
    workers = {w: worker_cmd(redis_url, keys.run, [teacher.url], w, max_deliveries=50) for w in ("w0", "w1")}
    for w, cmd in workers.items():
        procs.spawn(w, cmd)
    train = trainer_cmd(redis_url, keys.run, student_path(), out, sample_log, checkpoint_every=5)
    procs.spawn("trainer", train)
    producer = asyncio.create_task(produce(r, keys, items, marks=WaterMarks(200, 100)))
    rng = random.Random(7)
    trainer_kills = 0
    for target in (200, 450, 750, 1050):
        while sample_log_count(sample_log) < target:
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            w = rng.choice(list(workers))
            procs.kill9(w)
            procs.spawn(w, workers[w])
            assert procs.alive("trainer"), procs.tail("trainer")
        procs.kill9("trainer")
        trainer_kills += 1
        procs.spawn("trainer", [*train, "--resume"])
    await producer
    await wait_until(lambda: _done(r, keys, sample_log, len(items)), 600, "everything trained", procs=procs,
                     alive=["trainer", *workers])  # fmt: skip
    assert await procs.wait("trainer", 120) == 0, procs.tail("trainer")
    await asyncio.sleep(3)  # let restarted workers install their signal handlers
    assert await _stop(procs, list(workers)) == {"w0": 0, "w1": 0}
    result = await outcome(r, keys, [rid for rid, _ in items], sample_log)
    result.assert_exactly_once("trained")
    print(f"{trainer_kills} trainer kills; {result.summary('trained')}")
