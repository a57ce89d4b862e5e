"""Redis killed (SIGKILL) and restarted with AOF persistence under a running pipeline: `gkd rollouts`, two
`gkd workers` and `gkd train` reconnect and carry on; the ledger says what was lost or duplicated.

What each `appendfsync` setting can lose (measured by `gkd bench redis_loss`, see /work/notes/GUARANTEES.md):
- a Redis *process* crash (kill -9) loses no acknowledged write with `always`, and normally none with
  `everysec` either: Redis write()s the AOF buffer before it replies, and the kernel keeps written data
  when a process dies. `everysec` can lose acknowledged writes on a process crash only while an fsync
  has been stalled for over a second (Redis then postpones its AOF writes for up to 2 s);
- a machine crash or power loss loses, with `everysec`, what was written since the last fsync: up to
  about a second of writes (up to 2 s when the disk is slow); with `always`, nothing acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from pipeline.local.redis_server import RedisServer
from pipeline.queue.connection import connect
from pipeline.queue.schema import RunKeys
from tests.faults_harness import (
    FaultyTeacher,
    Procs,
    dead_letters,
    procs,
    rollouts_cmd,
    sample_log_count,
    student_path,
    trained_steps,
    trainer_cmd,
    wait_until,
    worker_cmd,
    write_prompts,
)
from workers.bench.redis_loss import measure_kill9

__all__ = ["procs"]


@pytest.fixture
def aof_redis(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True, appendfsync=request.param).start()
    yield server
    server.cleanup()


async def _ledger(r: aioredis.Redis, keys: RunKeys, sample_log: Path) -> tuple[collections.Counter[str], int]:
    """(occurrences of each rollout id in trained steps and dead, how many dead)."""
    seen: collections.Counter[str] = collections.Counter()
    for ids in trained_steps(sample_log).values():
        seen.update(ids)
    dead = await dead_letters(r, keys)
    for rid, records in dead.items():
        seen[rid] += len(records)
    return seen, sum(map(len, dead.values()))


async def _run_pipeline_through_redis_crashes(
    server: RedisServer, procs: Procs, tmp_path: Path, n: int, kills: int
) -> tuple[collections.Counter[str], int, dict[str, int]]:
    """Producer, two workers and a trainer; Redis is SIGKILLed `kills` times while they run (down 1.5 s
    each, restarted on the same port and data directory). Returns the ledger and the exit codes."""
    keys = RunKeys.for_run("crash")
    url = server.url
    fake = await FaultyTeacher(seed=5, delay_s=0.01).start()
    sample_log = tmp_path / "samples.jsonl"
    student = student_path()
    prompts = write_prompts(tmp_path / "prompts.jsonl", 200)
    pace = ["--high-water", "48", "--low-water", "24"]
    try:
        procs.spawn("producer", rollouts_cmd(url, keys.run, student, prompts, n, extra=pace))
        for w in ("w0", "w1"):
            procs.spawn(w, worker_cmd(url, keys.run, [fake.url], w, max_deliveries=50, extra=pace))
        procs.spawn(
            "trainer", trainer_cmd(url, keys.run, student, tmp_path / "out", sample_log, idle_exit_s=10)
        )
        everyone = ["w0", "w1", "trainer"]
        for i in range(kills):
            target = (i + 1) * n // (kills + 2)
            await wait_until(lambda t=target: sample_log_count(sample_log) >= t, 240,  # type: ignore[misc]
                             f"{target} samples trained", procs=procs, alive=everyone)  # fmt: skip
            server.stop(kill=True)
            await asyncio.sleep(1.5)
            server.start()
        r = connect(url)
        try:

            async def all_settled() -> bool:
                seen, _ = await _ledger(r, keys, sample_log)
                return len(seen) >= n and not procs.alive("producer")

            await wait_until(
                all_settled, 300, f"all {n} rollouts trained or dead", procs=procs, alive=everyone
            )
            codes = {"producer": await procs.wait("producer", 10)}
            codes["trainer"] = await procs.wait("trainer", 90)  # idle exit: final checkpoint and acks
            for name in ("w0", "w1"):
                procs.signal(name, signal.SIGTERM)
            for name in ("w0", "w1"):
                codes[name] = await procs.wait(name, 60)
            seen, dead = await _ledger(r, keys, sample_log)
            assert int(await r.xlen(keys.rollouts.key)) == 0 and int(await r.xlen(keys.ready.key)) == 0
            return seen, dead, codes
        finally:
            await r.aclose()
    finally:
        await fake.stop()


@pytest.mark.parametrize("aof_redis", ["always"], indirect=True)
async def test_redis_kill_9_and_restart_with_aof_always_loses_and_duplicates_nothing(
    aof_redis: RedisServer, procs: Procs, tmp_path: Path
) -> None:
    n = 160
    seen, dead, codes = await _run_pipeline_through_redis_crashes(aof_redis, procs, tmp_path, n, kills=1)
    assert codes == {"producer": 0, "w0": 0, "w1": 0, "trainer": 0}, {k: procs.tail(k) for k in codes}
    assert dead == 0, "every rollout here is valid: all must be trained"
    dup = {rid: c for rid, c in seen.items() if c > 1}
    assert not dup, f"duplicated: {dup}"
    assert len(seen) == n, f"{n} acknowledged by Redis to the producer, {len(seen)} trained or dead"
    for name in ("w0", "w1", "producer", "trainer"):  # each saw the outage and carried on
        assert "ConnectionError" in procs.tail(name, 10**7) or "Redis back" in procs.tail(name, 10**7), name


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_kill_9_of_redis_loses_no_acknowledged_write(fsync: str, tmp_path: Path) -> None:
    """Writers XADD as fast as they can; Redis is SIGKILLed mid-stream and restarted from its AOF.

    `always` guarantees it. `everysec` normally matches it on a process crash (Redis writes the AOF
    before replying; the kernel keeps the data), and only the fsync differs, which matters for a machine
    crash; see the module docstring. The test asserts the guarantee for `always` only."""
    res = measure_kill9(fsync, seconds=1.0, data_dir=str(tmp_path))
    assert res.acked > 500, res
    if fsync == "always":
        assert res.lost == 0, res
    print(f"appendfsync {fsync}: {res}")


@pytest.mark.long
@pytest.mark.parametrize("aof_redis", ["always", "everysec"], indirect=True)
async def test_long_redis_killed_three_times_under_load(
    aof_redis: RedisServer, procs: Procs, tmp_path: Path
) -> None:
    n = 1200
    seen, _, codes = await _run_pipeline_through_redis_crashes(aof_redis, procs, tmp_path, n, kills=3)
    assert codes == {"producer": 0, "w0": 0, "w1": 0, "trainer": 0}
    dup = {rid: c for rid, c in seen.items() if c > 1}
    print(f"appendfsync {aof_redis.appendfsync}: {len(seen)} of {n} accounted for, {len(dup)} duplicated")
    if aof_redis.appendfsync == "always":
        assert not dup and len(seen) == n


class ReplyDropper:
    """A TCP proxy in front of Redis that forwards everything, except that the first script adding a
    batch of rollouts (EVALSHA of `scripts.ADD` with the rollouts stream and the batch's marker as keys) is
    executed by Redis but its reply never comes back: the proxy closes the connection instead, as a Redis
    crash between executing and replying would do. A NOSCRIPT error (the script not loaded yet: nothing
    was executed) passes, and the script's next call is the one whose reply is lost."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> ReplyDropper:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        drop_next_reply = asyncio.Event()

        async def client_to_redis() -> None:
            while data := await c_reader.read(65536):
                if not self.dropped and b"EVALSHA" in data and b":rollouts" in data and b":batch:" in data:
                    drop_next_reply.set()
                u_writer.write(data)
                await u_writer.drain()

        async def redis_to_client() -> None:
            while data := await u_reader.read(65536):
                if drop_next_reply.is_set() and data.startswith(b"-NOSCRIPT"):
                    drop_next_reply.clear()
                elif drop_next_reply.is_set():
                    self.dropped += 1
                    return  # executed by Redis; the client never hears of it
                c_writer.write(data)
                await c_writer.drain()

        tasks = [asyncio.create_task(client_to_redis()), asyncio.create_task(redis_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (ConnectionError, OSError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (c_writer, u_writer):
                w.close()


async def test_producer_batch_whose_reply_was_lost_is_not_written_twice(
    redis_url: str, procs: Procs, tmp_path: Path
) -> None:
    """Redis executes a batch of XADDs (one script with the batch's marker) but the reply is lost (as on a
    crash between the two; `gkd bench redis_loss` counts such writes as persisted_unacked). The producer
    used to retry blindly and write the batch twice, training it twice (R1, fixed in workers/rollouts.py
    3e0205e)."""
    keys = RunKeys.for_run("dup")
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = await ReplyDropper(port).start()
    try:
        prompts = write_prompts(tmp_path / "prompts.jsonl", 40)
        url = f"redis://127.0.0.1:{proxy.port}/0"
        procs.spawn("producer", rollouts_cmd(url, keys.run, student_path(), prompts, 16))
        assert await procs.wait("producer", 120) == 0, procs.tail("producer")
        assert proxy.dropped == 1, "the proxy never saw a rollout batch"
        r = connect(redis_url)
        try:
            entries: Any = await r.xrange(keys.rollouts.key)
            ids = collections.Counter(e[1][b"id"] for e in entries)
        finally:
            await r.aclose()
        assert sum(ids.values()) == 16 and len(ids) == 16, f"{sum(ids.values())} entries, {len(ids)} ids"
    finally:
        await proxy.stop()
