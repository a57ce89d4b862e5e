"""Trainer faults in the whole pipeline (in-test producer -> `gkd workers` -> `gkd train` processes):
a stalled trainer (SIGSTOP) under load with a checkpoint every 1000 steps (ready stays under its
high-water mark plus one read batch per worker, the rollouts stream under its own, Redis memory under
its bound; all resumes on SIGCONT); malformed samples in `ready` go to `dead` without stopping the
trainer; SIGTERM as the stream runs dry. Kill -9 and --resume: test_faults_resume.py.

Ledger: the trainer's `--sample-log` plus the dead stream; every produced rollout id exactly once.
"""

from __future__ import annotations

import asyncio
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
from pipeline.train import checkpoint as ckpt
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
    trainer_cmd,
    used_memory,
    wait_until,
    worker_cmd,
)
from tests.redis_helpers import read_stats

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


async def test_stalled_trainer_bounds_ready_and_redis_memory_then_everything_resumes(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    """No checkpoint for 1000 steps: trained samples still leave ready after their step (only their
    compact rollouts wait in the journal), so the byte mark alone bounds ready, and Redis memory stays
    under the configured bounds while the trainer is stalled and the workers run."""
    keys = RunKeys.for_run("stall")
    sample_log = tmp_path / "samples.jsonl"
    ready_high_bytes, rollouts_high, concurrency, workers = 1_200_000, 40, 8, ("w0", "w1")
    sample_bytes = 30_000  # > the largest encoded sample here (150 rows x k=20 x 8 bytes + ids)
    # Long rollouts (k=20): ~25 KB per ready sample, so an unbounded ready stream would be obvious.
    items = rollouts(300, "st", tail=(100, 150))
    await ensure_groups(r, keys)
    marks = ["--high-water", "100000", "--low-water", "50000", "--high-water-bytes", str(ready_high_bytes),
             "--low-water-bytes", str(ready_high_bytes // 2)]  # fmt: skip
    for w in workers:
        procs.spawn(w, worker_cmd(redis_url, keys.run, [teacher.url], w, k=20, concurrency=concurrency,
                                  extra=marks))  # fmt: skip
    train = trainer_cmd(redis_url, keys.run, student_path(), tmp_path / "out", sample_log, k=20,
                        checkpoint_every=1000, idle_exit_s=20, extra=["--batch-tokens", "1600"])  # fmt: skip
    procs.spawn("trainer", train)
    base_memory = await used_memory(r)
    peak = {"ready_bytes": 0, "rollouts": 0, "memory": 0, "journal_bytes": 0}
    sampling = asyncio.Event()
    sampling.set()

    async def sampler() -> None:  # from the first rollout until the trainer resumes
        while sampling.is_set():
            st = await read_stats(r, keys)
            level = st.get(keys.ready.bytes_in, 0) - st.get(keys.ready.bytes_out, 0)
            peak["ready_bytes"] = max(peak["ready_bytes"], level)
            journal = st.get(keys.journal.bytes_in, 0) - st.get(keys.journal.bytes_out, 0)
            peak["journal_bytes"] = max(peak["journal_bytes"], journal)
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
    assert ckpt.latest_checkpoint(tmp_path / "out") is None  # no checkpoint while it ran
    # Workers read a batch of at most `concurrency` after their last look at the level.
    overshoot = len(workers) * concurrency * sample_bytes
    assert ready_high_bytes <= peak["ready_bytes"] <= ready_high_bytes + overshoot, peak
    assert rollouts_high <= peak["rollouts"] <= rollouts_high + 10, peak
    assert 0 < peak["journal_bytes"] <= 300 * 1_000, peak  # compact rollouts: < 1 KB each
    payload = ready_high_bytes + overshoot + (rollouts_high + 10) * 1_000 + peak["journal_bytes"]
    bound = 2 * payload + (4 << 20)  # allocator and stream overhead, Redis's own buffers
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
    assert int(await r.xlen(keys.journal.key)) == 0  # the final checkpoint trimmed it
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
    """A checkpoint interval that needs far more samples than ready's high-water mark lets through. The
    trainer once held trained samples in ready until its checkpoint, so workers paused and it starved (T1,
    a deadlock). Now a trained sample leaves ready right after its step (the trained journal keeps its
    rollout), so the mark never counts trained samples and training goes on to the end."""
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
    last, last_change = 0, asyncio.get_running_loop().time()

    async def done_or_stuck() -> bool:
        # A deadlock shows as training that started and then stopped: fail early with where it stopped.
        # Counted from the first trained sample (start-up takes what the machine's load makes it), with
        # a window far above a step's time, so a loaded machine is not taken for a deadlock.
        nonlocal last, last_change
        n = sample_log_count(sample_log)
        now = asyncio.get_running_loop().time()
        if n != last:
            last, last_change = n, now
        stuck_s = now - last_change
        assert n == 0 or stuck_s < 60, f"no training progress for {stuck_s:.0f} s at {n} of {len(items)}"
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
