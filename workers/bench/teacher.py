"""`gkd bench teacher`: `gkd workers` against three teacher servers of the same tiny model.

- vllm_json:    `vllm serve` (vLLM's OpenAI API server): prompt_logprobs as JSON, one Python object and
                one detokenized string per top-k entry;
- engine_bin:   `gkd teacher --engine vllm`: the same vLLM engine, the top-k tensors sent as the binary
                msgpack response (pipeline/serve/vllm_engine.py);
- torch_bin:    `gkd teacher` (transformers, batched forward passes), binary response.

Each server runs alone (started, warmed up, measured at k = 20 and 64, stopped), so they never share
the CPU with each other; the worker pool runs in this process. The model is the vLLM-servable tiny
teacher (pipeline.local.tiny_models(servable=True): head size 32, vocabulary 320, 256 positions).
Rollouts are distinct random sequences of `--t` tokens (prefix caching cannot help), prompt_len 1.

Reported per server and k: positions/s of the worker, server CPU seconds per 1,000 positions (the
server process and its children, e.g. vLLM's engine core), the worker's CPU us per position; and the
ratio engine_bin / vllm_json of positions/s (target >= 3 at k = 64). Where vLLM is not installed the
suite says so on stderr and reports nothing (`make test-vllm` builds .venv-vllm with vLLM: run
`.venv-vllm/bin/gkd bench teacher`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from workers.bench.cli import result
from workers.bench.worker import run_worker

MAX_LOGPROBS = 64
SERVERS = ("vllm_json", "engine_bin", "torch_bin")


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and all its descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (ppid, _) in stats.items() if ppid == parent and p not in tree]
        tree.update(kids)
        frontier += kids
    return sum(stats[p][1] for p in tree if p in stats)


def _command(server: str, model: Path, port: int) -> list[str]:
    where = ["--host", "127.0.0.1", "--port", str(port)]
    if server == "vllm_json":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--max-logprobs", str(MAX_LOGPROBS), "--dtype", "float32", "--enforce-eager",
                *where]  # fmt: skip
    gkd = [sys.executable, "-m", "workers.cli", "teacher", "--model", str(model),
           "--max-logprobs", str(MAX_LOGPROBS), *where]  # fmt: skip
    if server == "engine_bin":
        return [*gkd, "--engine", "vllm", "--vllm-args", '{"enforce_eager": true}']
    return gkd


def _start(server: str, model: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    import requests

    from pipeline.local.redis_server import env_without_proxy, free_port

    port = free_port()
    env = env_without_proxy() | {"HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(_command(server, model, port), env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bench teacher {server} exited at start:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/health", timeout=2, proxies={"http": "", "https": ""}).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"bench teacher {server} did not answer /health within 300 s")


def _measure(
    server: str, args: argparse.Namespace, redis_url: str, model: Path, log: Path
) -> list[dict[str, Any]]:
    def tokens(seed: int, n: int) -> list[np.ndarray]:  # new sequences per run: nothing to find in a cache
        rng = np.random.default_rng(seed)
        return [rng.integers(3, 320, size=args.t).astype(np.int32) for _ in range(n)]

    proc, url = _start(server, model, log)
    rows = []
    try:
        asyncio.run(run_worker(redis_url, url, tokens(0, 8), 8, 20, args.concurrency))  # warm-up
        for k in args.k:
            c0 = _tree_cpu_s(proc.pid)
            batch = tokens(k, args.rollouts)
            wall, worker_cpu = asyncio.run(
                run_worker(redis_url, url, batch, args.rollouts, k, args.concurrency)
            )
            server_cpu = _tree_cpu_s(proc.pid) - c0
            positions = args.rollouts * (args.t - 1)
            rows += [
                result("teacher", f"{server}_positions_per_s_k{k}", positions / wall, "pos/s"),
                result(
                    "teacher",
                    f"{server}_server_cpu_s_per_1k_positions_k{k}",
                    server_cpu / positions * 1e3,
                    "s",
                ),
                result(
                    "teacher", f"{server}_worker_cpu_us_per_position_k{k}", worker_cpu / positions * 1e6, "us"
                ),
            ]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def run(argv: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="gkd bench teacher")
    p.add_argument("--t", type=int, default=240, help="tokens per rollout (the tiny model has 256 positions)")
    p.add_argument("--k", type=int, nargs="+", default=[20, 64], help="top-k values to measure")
    p.add_argument("--rollouts", type=int, default=200, help="rollouts per server and k")
    p.add_argument("--concurrency", type=int, default=32, help="worker rollouts in flight")
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS, help="servers to measure")
    args = p.parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print(
            "gkd bench teacher: skipped, vLLM is not installed in this environment "
            "(`make test-vllm` builds .venv-vllm with it; then run `.venv-vllm/bin/gkd bench teacher`)",
            file=sys.stderr,
        )
        return []
    from pipeline.local.redis_server import RedisServer
    from pipeline.local.tiny_models import tiny_models

    model = tiny_models(servable=True).teacher
    rows: list[dict[str, Any]] = []
    log = Path(os.environ.get("GKD_BENCH_LOG", "/tmp/gkd-bench-teacher.log"))
    with RedisServer() as redis_server:
        for server in args.servers:
            rows += _measure(server, args, redis_server.url, model, log)
    rate = {row["metric"]: row["value"] for row in rows}
    for k in args.k:
        a, b = rate.get(f"vllm_json_positions_per_s_k{k}"), rate.get(f"engine_bin_positions_per_s_k{k}")
        if a and b:
            target = 3.0 if k == 64 else None
            rows.append(result("teacher", f"engine_bin_over_vllm_json_k{k}", b / a, "x", baseline=target,
                               ratio=b / a / target if target else None))  # fmt: skip
    rows.append(result("teacher", "loadavg_1m", os.getloadavg()[0], f"procs on {os.cpu_count()} cpus"))
    return rows
