"""Trainer faults under FSDP: a 2-rank `gkd train --sharding fsdp` job (torchrun, gloo) killed -9 between
checkpoints, resumed by one process from its sharded checkpoint (resharded 2 -> 1): every rollout ends in
exactly one optimizer step of the continued lineage, and the published policy loads with from_pretrained.

Ledger: one `--sample-log` per job (`lineage_steps`: the steps a killed job took after the checkpoint
the next one resumed from are dropped), plus the dead stream.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from pipeline.local.redis_server import free_port
from pipeline.queue.schema import POLICY_CHECKPOINT, POLICY_VERSION, TRAINERS_GROUP, RunKeys
from pipeline.queue.streams import ensure_groups
from pipeline.train import checkpoint as ckpt
from tests.faults_harness import (
    FaultyTeacher,
    Procs,
    lineage_steps,
    outcome,
    procs,
    produce,
    rollouts,
    student_path,
    trained_steps,
    trainer_cmd,
    wait_until,
    worker_cmd,
)

__all__ = ["procs"]


@pytest.fixture
async def teacher():  # type: ignore[no-untyped-def]
    fake = await FaultyTeacher(seed=11).start()
    yield fake
    await fake.stop()


def under_torchrun(cmd: list[str], ranks: int) -> list[str]:
    """`gkd train ...` (as trainer_cmd builds it) as a torchrun job of `ranks` processes."""
    assert cmd[:3] == [sys.executable, "-m", "workers.cli"], cmd[:3]
    args = ["--run-name" if a == "--run" else a for a in cmd[3:]]  # torchrun owns --run(-path)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", str(free_port()), "-m", "workers.cli", *args]  # fmt: skip


async def test_fsdp_job_of_2_ranks_killed_9_resumes_on_1_rank_training_every_sample_exactly_once(
    redis_url: str, r: aioredis.Redis, teacher: FaultyTeacher, procs: Procs, tmp_path: Path
) -> None:
    keys = RunKeys.for_run("fsdpkill")
    items = rollouts(400, "fk")
    produced = [rid for rid, _ in items]
    await ensure_groups(r, keys)
    procs.spawn("w0", worker_cmd(redis_url, keys.run, [teacher.url], "w0"))
    out = tmp_path / "out"
    logs = [tmp_path / "samples-2-ranks.jsonl", tmp_path / "samples-1-rank.jsonl"]

    def train(log: Path, *extra: str) -> list[str]:
        return trainer_cmd(redis_url, keys.run, student_path(), out, log, checkpoint_every=3,
                           extra=("--sharding", "fsdp", *extra))  # fmt: skip

    procs.spawn("job", under_torchrun(train(logs[0]), ranks=2), group=True)

    # The tiny student trains faster than a poll: once the job runs, steps follow a paced supply.
    await produce(r, keys, items[:20])
    await wait_until(lambda: bool(trained_steps(logs[0])), 120, "a first step", procs=procs, alive=["job"])

    async def paced() -> None:
        for i in range(20, len(items), 10):
            await produce(r, keys, items[i : i + 10])
            await asyncio.sleep(0.2)

    producer = asyncio.create_task(paced())

    def between_checkpoints() -> bool:  # checkpoints at steps 3, 6, 9, ...
        steps = {step for _, step in trained_steps(logs[0])}
        return bool(steps) and max(steps) >= 5 and max(steps) % 3 != 0

    await wait_until(between_checkpoints, 240, "step 5 of the 2-rank job", procs=procs, alive=["job", "w0"],
                     poll_s=0.01)  # fmt: skip
    assert procs.kill9("job") == -signal.SIGKILL
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None
    written = ckpt.read_state(latest)
    assert written.world_size == 2 and written.step % 3 == 0
    ranks_logged = {rank for rank, _ in trained_steps(logs[0])}
    assert ranks_logged == {0, 1}, "both ranks trained before the kill"

    procs.spawn("single", train(logs[1], "--resume"))
    # Until the resumed job's first step, the ledger cannot tell which steps of the killed one it redoes.
    await wait_until(lambda: bool(trained_steps(logs[1])), 120, "a first step", procs=procs, alive=["single"])

    async def done() -> bool:
        trained = sum(len(ids) for ids in lineage_steps(logs).values())
        return trained + int(await r.xlen(keys.dead.key)) >= len(items)

    await producer
    await wait_until(done, 240, "everything trained", procs=procs, alive=["single", "w0"])
    assert await procs.wait("single", 90) == 0, procs.tail("single")  # idle exit: checkpoint, acks
    procs.signal("w0", signal.SIGTERM)
    assert await procs.wait("w0", 90) == 0

    result = await outcome(r, keys, produced)
    kept = lineage_steps(logs)
    for ids in kept.values():
        result.trained.update(ids)
    result.assert_exactly_once("trained")
    assert not result.dead, result.dead
    resumed = trained_steps(logs[1])
    assert min(step for _, step in resumed) == written.step + 1, "the 1-rank job went on from the checkpoint"
    steps = sorted({step for _, step in kept})
    assert steps == list(range(1, len(steps) + 1)), "the lineage's steps are 1..n without gaps"
    lost = {key for key in trained_steps(logs[0]) if key[1] > written.step}
    assert lost, "the kill discarded trained steps past the checkpoint (retrained by the 1-rank job)"
    assert int(await r.xlen(keys.ready.key)) == 0 and int(await r.xlen(keys.rollouts.key)) == 0
    pending: Any = await r.xpending(keys.ready.key, TRAINERS_GROUP)
    assert pending["pending"] == 0, pending

    # The producers' contract: the published policy is the final checkpoint, a from_pretrained folder.
    from transformers import AutoModelForCausalLM

    final = ckpt.latest_checkpoint(out)
    assert final is not None and ckpt.read_state(final).world_size == 1
    policy = await r.hgetall(keys.policy)
    assert policy[POLICY_CHECKPOINT.encode()] == str(final).encode()
    assert int(policy[POLICY_VERSION.encode()]) == ckpt.read_state(final).step == steps[-1]
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert model.get_output_embeddings().weight.shape[0] == 320
