"""`gkd status` against a real Redis populated through the foundation API: the numbers it prints."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import Any

import pytest
import redis.asyncio as aioredis

from pipeline.local.redis_server import RedisServer, env_without_proxy, free_port
from pipeline.monitor.report import build_report, take_sample
from pipeline.queue.connection import connect_sync
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.runstate import Heartbeat, check_run_config, incr_stats, publish_policy
from pipeline.queue.schema import HB, RunKeys, Stat
from pipeline.queue.streams import add_rollouts, ensure_groups
from workers import cli, status

ROLLOUT_BYTES = 100
SCORED_BYTES = 300
COUNTERS = {
    Stat.TEACHER_REQUESTS: 10,
    Stat.TEACHER_LATENCY_MS_SUM: 1500,
    Stat.TEACHER_ERRORS: 2,
    Stat.STEP_MS: 2000,
    Stat.DATA_WAIT_MS: 50,
    Stat.TRAINER_STEPS: 4,
    Stat.TRAINED_SAMPLES: 8,
    Stat.TRAINED_TOKENS: 512,
}


async def populate(r: aioredis.Redis, keys: RunKeys) -> None:
    """10 rollouts: 2 scored, 2 dead, 1 pending with w1, 5 waiting; 1 of 2 ready samples read by t0."""
    await ensure_groups(r, keys)
    await add_rollouts(r, keys, [(f"r{i}", bytes([i]) * ROLLOUT_BYTES) for i in range(10)])
    w1 = StreamConsumer(r, keys.rollouts, "w1")
    got = await w1.read(count=5, block_ms=100)
    assert await w1.handoff(keys.ready, [(e, b"s" * SCORED_BYTES, 7) for e in got[:2]]) == [True, True]
    assert await w1.dead_letter(got[2], "teacher", "HTTP 400: first reason")
    assert await w1.dead_letter(got[3], "decode", "latest reason: bad\ntensor")
    t0 = StreamConsumer(r, keys.ready, "t0")
    assert len(await t0.read(count=1, block_ms=100)) == 1
    await incr_stats(r, keys, COUNTERS)
    lat1 = {"latency_p50_ms": 40.0, "latency_p95_ms": 90.0, "paused": 0}
    await Heartbeat(r, keys, "w1", "worker", ttl_ms=60_000, fields=lambda: {HB.IN_FLIGHT: 3, **lat1}).beat()
    lat2 = {"latency_p50_ms": 60.0, "latency_p95_ms": 80, "paused": 1}  # an int parses too
    await Heartbeat(r, keys, "w2", "worker", ttl_ms=60_000, fields=lambda: {HB.IN_FLIGHT: 0, **lat2}).beat()
    await Heartbeat(
        r, keys, "t0", "trainer", ttl_ms=60_000, fields=lambda: {HB.IN_FLIGHT: 1, "step": 4}
    ).beat()
    await publish_policy(r, keys, 3, "/ckpt/step-3")
    await check_run_config(r, keys, {"k": 20, "loss": "tail"})


def check_numbers(rep: dict[str, Any]) -> None:
    """The numbers `populate` leaves, as the JSON report shows them."""
    assert rep["has_data"] is True and rep["run"] == "test"
    ro, rd = rep["streams"]["rollouts"], rep["streams"]["ready"]
    assert (ro["length"], ro["pending"], ro["lag"], ro["consumers"]) == (6, 1, 5, 1)
    assert ro["lag_estimated"] is False and ro["group"] == "teachers"
    assert ro["oldest_pending"]["consumer"] == "w1" and ro["oldest_pending"]["deliveries"] == 1
    assert ro["oldest_pending"]["age_s"] >= 0
    assert (rd["length"], rd["pending"], rd["lag"]) == (2, 1, 1)
    assert rep["streams"]["dead"]["length"] == 2
    assert rep["backpressure"]["rollouts"] == {"entries": 6, "bytes": 6 * ROLLOUT_BYTES}
    assert rep["backpressure"]["ready"] == {"entries": 2, "bytes": 2 * SCORED_BYTES}
    dead = rep["dead"]
    assert dead["count"] == 2 and dead["total"] == 2
    latest = dead["latest"][0]
    assert latest["id"] == "r3" and latest["stage"] == "decode" and latest["deliveries"] == 1
    assert latest["reason"] == "latest reason: bad\ntensor" and "data" not in latest
    assert [w["name"] for w in rep["workers"]] == ["t0", "w1", "w2"]
    w1 = rep["workers"][1]
    assert (w1["role"], w1["in_flight"], w1["latency_p95_ms"], w1["paused"]) == ("worker", 3, 90.0, "0")
    assert rep["teacher"]["latency_mean_ms_total"] == 150.0
    assert (rep["teacher"]["latency_p50_ms"], rep["teacher"]["latency_p95_ms"]) == (60.0, 90.0)
    assert rep["teacher"]["errors"] == 2
    assert rep["trainer"]["steps"] == 4 and rep["trainer"]["data_wait_fraction_total"] == 0.025
    assert rep["stats"][Stat.SCORED] == 2 and rep["stats"][Stat.SCORED_POSITIONS] == 14
    assert rep["stats"][Stat.ROLLOUTS_PRODUCED] == 10
    assert rep["config"] == {"k": "20", "loss": "tail"}
    assert rep["policy"]["version"] == 3 and rep["policy"]["checkpoint"] == "/ckpt/step-3"


def gkd(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "workers.cli", "status", *args]
    return subprocess.run(cmd, env=env_without_proxy(), capture_output=True, text=True, timeout=60)


async def test_json_in_process(r: aioredis.Redis, keys: RunKeys, redis_url: str, capsys: Any) -> None:
    await populate(r, keys)
    assert status.main(["--run", "test", "--redis", redis_url, "--json", "--interval-s", "0"]) == 0
    rep = json.loads(capsys.readouterr().out)
    check_numbers(rep)
    assert rep["interval_s"] is None and rep["throughput"]["scored_per_s"] is None


async def test_json_subprocess_with_rates(r: aioredis.Redis, keys: RunKeys, redis_url: str) -> None:
    await populate(r, keys)
    proc = gkd("--run", "test", "--redis", redis_url, "--json", "--interval-s", "0.2")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    check_numbers(rep)
    assert rep["interval_s"] > 0
    # Nothing ran between the two samples: every rate is exactly zero.
    assert set(rep["throughput"].values()) == {0.0}


async def test_rates_are_counter_deltas(r: aioredis.Redis, keys: RunKeys, redis_url: str) -> None:
    await populate(r, keys)
    client = connect_sync(redis_url)
    try:
        before = take_sample(client, keys)
        delta = {
            Stat.SCORED: 30, Stat.SCORED_POSITIONS: 900, Stat.TRAINED_SAMPLES: 12, Stat.TRAINED_TOKENS: 4096,
            Stat.TRAINER_STEPS: 3, Stat.ROLLOUTS_PRODUCED: 25, Stat.TEACHER_REQUESTS: 4,
            Stat.TEACHER_LATENCY_MS_SUM: 1000, Stat.STEP_MS: 3000, Stat.DATA_WAIT_MS: 30,
        }  # fmt: skip
        await incr_stats(r, keys, delta)
        after = take_sample(client, keys)
    finally:
        client.close()
    rep = build_report(before, after, run="test", redis_url=redis_url)
    dt = rep["interval_s"]
    tp = rep["throughput"]
    assert tp["scored_per_s"] * dt == pytest.approx(30)
    assert tp["scored_positions_per_s"] * dt == pytest.approx(900)
    assert tp["trained_samples_per_s"] * dt == pytest.approx(12)
    assert tp["trained_tokens_per_s"] * dt == pytest.approx(4096)
    assert tp["trainer_steps_per_s"] * dt == pytest.approx(3)
    assert tp["rollouts_produced_per_s"] * dt == pytest.approx(25)
    assert tp["dead_per_s"] == 0.0
    assert rep["teacher"]["latency_mean_ms"] == 250.0  # 1000 ms over 4 requests in the interval
    assert rep["trainer"]["data_wait_fraction"] == 0.01  # 30 ms of 3000 ms of steps


async def test_human_output(r: aioredis.Redis, keys: RunKeys, redis_url: str, capsys: Any) -> None:
    await populate(r, keys)
    assert status.main(["--run", "test", "--redis", redis_url, "--interval-s", "0"]) == 0
    out = capsys.readouterr().out
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.strip():
            rows.setdefault(line.split()[0], line.split())  # the first line that starts with a word
    assert rows["rollouts"][:7] == ["rollouts", "6", "600", "B", "teachers", "1", "1"]
    assert rows["rollouts"][7] == "5"  # lag
    assert rows["ready"][:8] == ["ready", "2", "600", "B", "trainers", "1", "1", "1"]
    assert rows["dead"][:2] == ["dead", "2"]
    assert "policy version 3 (checkpoint /ckpt/step-3" in out
    assert "config k=20 loss=tail" in out
    assert "workers: 3 live" in out and rows["w1"][:2] == ["w1", "worker"] and rows["t0"][1] == "trainer"
    assert "p50 60.0 ms, p95 90.0 ms" in out and "150.0 ms (run)" in out
    assert "dead letters: 2 in stream (2 dead-lettered in total, 0 trimmed" in out
    assert "latest reason: bad tensor" in out and "HTTP 400: first reason" in out
    assert "data-wait" in out and "2.5% (run)" in out


def test_empty_run_says_no_data_and_masks_password(capsys: Any) -> None:
    with RedisServer(password="s3cret") as server:
        proc = gkd("--run", "nothing-here", "--redis", server.url, "--interval-s", "0")
        assert proc.returncode == 0, proc.stderr
        assert "run 'nothing-here' has no data yet in Redis at redis://:***@127.0.0.1" in proc.stdout
        assert "s3cret" not in proc.stdout + proc.stderr
        client = connect_sync(server.url)
        client.hset(RunKeys.for_run("other").stats, Stat.SCORED, 1)
        client.close()
        assert status.main(["--run", "nothing-here", "--redis", server.url, "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["has_data"] is False and rep["other_runs"] == ["other"]
        assert cli.main(["status", "--redis", server.url.replace("s3cret", "b4dpass")]) == 2
        err = capsys.readouterr().err
        assert "gkd status: Redis at redis://:***@" in err and "refused the credentials" in err
        assert "b4dpass" not in err


def test_unreachable_redis_exits_2() -> None:
    url = f"redis://:pw@127.0.0.1:{free_port()}/0"
    proc = gkd("--redis", url, "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gkd status: cannot reach Redis at redis://:***@127.0.0.1")
    assert ":pw@" not in proc.stderr


async def test_watch_refreshes_until_ctrl_c(r: aioredis.Redis, keys: RunKeys, redis_url: str) -> None:
    await populate(r, keys)
    cmd = [sys.executable, "-m", "workers.cli", "status", "--run", "test", "--redis", redis_url]
    proc = await asyncio.create_subprocess_exec(
        *cmd, "--watch", "--json", "--interval-s", "0.2", env=env_without_proxy(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        check_numbers(first)
        await incr_stats(r, keys, {Stat.SCORED: 40})
        # The increment lands in one refresh interval; whichever it is, rate x interval is the delta.
        seen = 0.0
        for _ in range(50):
            rep = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            seen += rep["throughput"]["scored_per_s"] * rep["interval_s"]
            if seen:
                break
        assert seen == pytest.approx(40)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
