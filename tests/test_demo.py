"""`gkd demo` end to end: every part as its own process; the KL falls, nothing is lost, Ctrl-C cleans up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pipeline.local.redis_server import RedisServer, env_without_proxy


def demo_cmd(redis_url: str | None, run: str, workdir: Path, steps: int) -> list[str]:
    redis = ["--redis", redis_url] if redis_url else []  # none: the demo's own private redis-server
    return [
        sys.executable, "-m", "workers.cli", "demo", *redis, "--run", run,
        "--workdir", str(workdir), "--steps", str(steps), "--timeout-s", "400",
    ]  # fmt: skip


def processes_of_run(run: str) -> list[int]:
    """Pids of live processes whose environment names the run (the demo gives each child GKD_RUN)."""
    pids = []
    needle = f"GKD_RUN={run}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_demo_json_kl_falls_and_nothing_is_lost(
    redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    run = f"demo-{uuid.uuid4().hex[:6]}"
    proc = subprocess.run(
        [*demo_cmd(redis_url, run, tmp_path, steps=30), "--json"],
        env=env_without_proxy(), capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) == {
        "steps", "kl_first", "kl_last", "rollouts", "scored", "trained", "dead", "queued_rollouts",
        "queued_ready", "lost", "data_wait_after_warmup", "stalled_intervals",
    }  # fmt: skip
    assert 0 <= summary["data_wait_after_warmup"] <= 1 and summary["stalled_intervals"] >= 0
    assert summary["steps"] == 30
    assert summary["lost"] == 0 and summary["dead"] == 0
    queued = summary["queued_rollouts"] + summary["queued_ready"]
    assert summary["rollouts"] == summary["trained"] + summary["dead"] + queued
    assert summary["kl_last"] < 0.9 * summary["kl_first"], summary
    assert summary["trained"] > 0 and summary["scored"] >= summary["trained"]
    assert summary["rollouts"] >= summary["scored"]
    assert processes_of_run(run) == []


def test_ctrl_c_stops_every_process_the_demo_started(redis_url: str, tmp_path: Path) -> None:
    """On its own private Redis (the default: never a shared server by chance)."""
    run = f"demo-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in env_without_proxy().items() if k != "GKD_REDIS_URL"}
    proc = subprocess.Popen(
        demo_cmd(None, run, tmp_path, steps=1000), env={**env, "GKD_REDIS_URL": redis_url},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "(a private redis-server, stopped at the end)" in first and redis_url not in first, first
        for line in proc.stdout:  # wait until the pipeline is running (a step was taken)
            if "step=" in line and "step=0 " not in line:
                break
            assert time.monotonic() < deadline, "the demo took no step in time"
        assert len(processes_of_run(run)) >= 4  # teacher, workers, rollouts, trainer
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    deadline = time.monotonic() + 10
    while processes_of_run(run) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of_run(run) == []
