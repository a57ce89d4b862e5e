"""Exactly once into training across trainer crashes (in-test producer -> `gkd workers` -> `gkd train`).

The trainer is killed with SIGKILL between checkpoints, then a new job resumes from the last checkpoint
(a) with the same ranks and names, (b) with fewer ranks (torchrun 2 -> 1 on gloo), (c) under another
consumer name. The steps the killed job took after its checkpoint are in no checkpoint the run continues
from: their samples left `ready` into the trained journal, which the resume puts back into `rollouts`
(scored again by the workers), or they were still pending for a consumer that is gone (taken over after
the lease). The judge is the ledger: every produced rollout id in exactly one optimizer step of the
checkpoint lineage (tests.faults_harness.trained_steps), nothing in `dead`, and nothing left anywhere:
no entry in rollouts, ready or the journal, nothing pending. Short versions run in `make test`, long
ones (more rollouts, repeated kills, workers killed too) in `make test-long`.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.queue import schema as K
from pipeline.queue.backpressure import WaterMarks
from pipeline.queue.schema import RunKeys, Stat
from pipeline.queue.streams import ensure_groups
from tests.faults_harness import (
    FaultyTeacher,
    Procs,
    outcome,
    procs,
    produce,
    rollouts,
    sample_log_count,
    sample_log_jobs,
    student_path,
    torchrun_cmd,
    trained_steps,
    trainer_cmd,
    wait_until,
    worker_cmd,
)
from tests.redis_helpers import read_stats

__all__ = ["procs"]

CHECKPOINT_EVERY = 3


@pytest.fixture
async def teacher():  # type: ignore[no-untyped-def]
    fake = await FaultyTeacher(seed=6).start()
    yield fake
    await fake.stop()


def _last_step(sample_log: Path) -> int:
    return max((step for _, step in trained_steps(sample_log)), default=0)


def _between_checkpoints(sample_log: Path, at_least: int) -> bool:
    """The trainer has passed `at_least` and its latest step is not a checkpoint step."""
    step = _last_step(sample_log)
    return step >= at_least and step % CHECKPOINT_EVERY != 0


async def _settled(r: aioredis.Redis, keys: RunKeys, sample_log: Path, n: int, partitions: int = 1) -> bool:
    dead = sum([int(await r.xlen(p.dead.key)) for p in keys.parts(partitions)])
    return sample_log_count(sample_log) + dead >= n


async def _nothing_left(r: aioredis.Redis, keys: RunKeys, partitions: int = 1) -> None:
    """No entry in any stream of the run (of any partition), nothing pending in either group."""
    for part in keys.parts(partitions):
        for stream in (part.rollouts, part.ready, part.journal):
            assert int(await r.xlen(stream.key)) == 0, stream.key
        for stream in part.work_streams:
            assert (await r.xpending(stream.key, stream.group))["pending"] == 0, stream.key


async def _crash_and_resume(
    redis_url: str,
    r: aioredis.Redis,
    teacher: FaultyTeacher,
    procs: Procs,
    tmp_path: Path,
    *,
    run: str,
    n: int,
    first: list[str],
    resumed: list[str],
    kill_at: list[int],
    worker_kills: bool = False,
    partitions: int = 1,
) -> None:
    """Start `first`, SIGKILL it between checkpoints past each step of `kill_at` (restarting it as `first`
    before the last kill, as `resumed` after it); check the ledger once everything has settled."""
    keys = RunKeys.for_run(run)
    sample_log = tmp_path / "samples.jsonl"
    items = rollouts(n, run)
    await ensure_groups(r, keys, partitions)
    env = {"GKD_PARTITIONS": str(partitions)}  # every process of the run, as a deployment sets it
    workers = {w: worker_cmd(redis_url, run, [teacher.url], w, max_deliveries=50) for w in ("w0", "w1")}
    for w, cmd in workers.items():
        procs.spawn(w, cmd, env)
    procs.spawn("trainer", first, env, group=True)
    marks = WaterMarks(200, 100)
    producer = asyncio.create_task(produce(r, keys, items, marks=marks, partitions=partitions))
    rng = random.Random(5)
    for i, step in enumerate(kill_at):

        async def ready_to_kill(s: int = step) -> bool:
            if worker_kills and rng.random() < 0.02:  # now and then (every ~2.5 s) a worker dies too
                w = rng.choice(list(workers))
                procs.kill9(w)
                procs.spawn(w, workers[w], env)
            return _between_checkpoints(sample_log, s)

        await wait_until(ready_to_kill, 300, f"step {step}", procs=procs, alive=["trainer"], poll_s=0.05)
        procs.kill9("trainer")
        procs.spawn("trainer", [*(resumed if i == len(kill_at) - 1 else first), "--resume"], env, group=True)
    await producer
    await wait_until(lambda: _settled(r, keys, sample_log, n, partitions), 600, "everything trained",
                     procs=procs, alive=["trainer"])  # fmt: skip
    assert await procs.wait("trainer", 120) == 0, procs.tail("trainer")  # idle exit: final checkpoint
    for w in workers:
        procs.signal(w, signal.SIGTERM)
    assert {w: await procs.wait(w, 90) for w in workers} == {"w0": 0, "w1": 0}
    result = await outcome(r, keys, [rid for rid, _ in items], sample_log, partitions)
    result.assert_exactly_once("trained")
    assert not result.dead, result.dead
    await _nothing_left(r, keys, partitions)
    logged = len(sample_log.read_text().splitlines())
    kept = len(trained_steps(sample_log))
    assert logged > kept, f"{logged} step lines, {kept} kept: no kill discarded a step"
    stats: dict[str, int] = {}
    for part in keys.parts(partitions) if partitions > 1 else []:  # the partitions' script counters
        for name, value in (await read_stats(r, part)).items():
            stats[name] = stats.get(name, 0) + value
    for name, value in (await read_stats(r, keys)).items():
        stats[name] = stats.get(name, 0) + value
    # The discarded steps' samples came back: from the journal (requeued) or still pending (taken over).
    assert stats.get(Stat.REQUEUED, 0) + stats.get(Stat.RECLAIMED, 0) > 0, stats
    print(f"{result.summary('trained')}; requeued {stats.get(Stat.REQUEUED, 0)}, "
          f"journal entries dropped {stats.get(Stat.JOURNAL_DROPPED, 0)}")  # fmt: skip


def _train(redis_url: str, run: str, tmp_path: Path, *extra: str) -> list[str]:
    return trainer_cmd(redis_url, run, student_path(), tmp_path / "out", tmp_path / "samples.jsonl",
                       checkpoint_every=CHECKPOINT_EVERY, extra=list(extra))  # fmt: skip


async def test_kill_9_then_resume_with_the_same_ranks_trains_every_sample_once(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    train = _train(redis_url, "same", tmp_path)
    await _crash_and_resume(redis_url, r, teacher, procs, tmp_path, run="same", n=160, first=train,
                            resumed=train, kill_at=[4, 11])  # fmt: skip
    steps = sorted(step for _, step in trained_steps(tmp_path / "samples.jsonl"))
    assert steps == list(range(1, len(steps) + 1)), "the continued run's steps are 1..n without gaps"


async def test_kill_9_then_resume_of_a_run_of_three_partitions_trains_every_sample_once(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    """A partitioned run (P = 3, one node): the killed job's journal entries go back into their own
    partition's rollouts, its unjournaled ones are settled in their partition (`<p>/<id>` listings)."""
    train = _train(redis_url, "parts", tmp_path)
    await _crash_and_resume(redis_url, r, teacher, procs, tmp_path, run="parts", n=160, first=train,
                            resumed=train, kill_at=[4], partitions=3)  # fmt: skip


async def test_kill_9_of_two_torchrun_ranks_then_resume_with_one(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    """Rank 1 (consumer trainer-1) is gone after the resume: its pending entries are taken over after
    the lease, its journaled ones put back by the resume."""
    train = _train(redis_url, "fewer", tmp_path)
    await _crash_and_resume(redis_url, r, teacher, procs, tmp_path, run="fewer", n=160,
                            first=torchrun_cmd(2, train), resumed=train, kill_at=[4])  # fmt: skip
    assert len(sample_log_jobs(tmp_path / "samples.jsonl")) == 2
    assert {rank for rank, _ in trained_steps(tmp_path / "samples.jsonl")} == {0, 1}


async def test_kill_9_then_resume_under_another_consumer_name(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    first = _train(redis_url, "renamed", tmp_path, "--name", "old")
    resumed = _train(redis_url, "renamed", tmp_path, "--name", "new")
    await _crash_and_resume(redis_url, r, teacher, procs, tmp_path, run="renamed", n=160, first=first,
                            resumed=resumed, kill_at=[4])  # fmt: skip
    consumers = {c["name"] for c in await r.xinfo_consumers(RunKeys.for_run("renamed").ready.key,
                                                            K.TRAINERS_GROUP)}  # fmt: skip
    assert consumers <= {b"old-0", b"new-0"} and b"new-0" in consumers


@pytest.mark.long
@pytest.mark.parametrize("scenario", ["same", "fewer", "renamed"])
async def test_long_repeated_trainer_kills_with_workers_dying_too(
    scenario: str, redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    """1000 rollouts; the trainer is killed -9 four times (the last resume with fewer ranks or another
    name), and now and then a worker is killed -9 and restarted. Exactly once in training."""
    run = f"long-{scenario}"
    first = _train(redis_url, run, tmp_path, "--name", "a")
    resumed = _train(redis_url, run, tmp_path, "--name", "b" if scenario == "renamed" else "a")
    if scenario == "fewer":
        first = torchrun_cmd(2, first)
    await _crash_and_resume(redis_url, r, teacher, procs, tmp_path, run=run, n=1000, first=first,
                            resumed=resumed, kill_at=[5, 14, 26, 38], worker_kills=True)  # fmt: skip
