"""`gkd bench serve`: positions/s of the reference teacher server (`gkd teacher`) scoring for the worker pool.

`gkd teacher` runs in its own process (its CPU is not this one's) with `--model`, `--device` and
`--dtype`; a `TeacherWorker` in this process (the worker pool's loop, `--concurrency` rollouts in
flight) moves `--rollouts` rollouts of `--t` random token ids from a private Redis through the server
to the ready stream, with the binary top-k response the server advertises, once per `--k` after a
warm-up pass. A rollout has prompt_len 1, so it asks for T - 1 scored positions.

Reported per k: positions/s (scored positions over wall time, Redis handoffs included) and the
worker's CPU microseconds per position. The GPU check runs it on CUDA with a ~0.5B-parameter student
from `pipeline.local.bench_models` (vocabulary 151,936); the default is the tiny teacher on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from workers.bench.cli import result


def _parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gkd bench serve", description=__doc__)
    p.add_argument("--model", default=None, help="model folder to serve (default: the tiny teacher)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    p.add_argument("--k", type=int, nargs="+", default=[20, 64], help="top-k values to measure")
    p.add_argument("--t", type=int, default=None, help="tokens per rollout (default 1024 CUDA, 64 CPU)")
    p.add_argument("--rollouts", type=int, default=None, help="rollouts per k (default 256 CUDA, 32 CPU)")
    p.add_argument("--concurrency", type=int, default=64, help="worker rollouts in flight")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="the server's padded batch limit")
    p.add_argument("--start-timeout-s", type=float, default=180.0, help="wait this long for /health")
    return p.parse_args(args)


def start_server(a: argparse.Namespace, model: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`gkd teacher` on a free loopback port; returns it once /health answers (RuntimeError otherwise)."""
    import requests

    from pipeline.local.redis_server import env_without_proxy, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "workers.cli", "teacher", "--model", model, "--device", a.device,
           "--dtype", a.dtype, "--port", str(port), "--max-logprobs", str(max(a.k)),
           "--max-batch-tokens", str(a.max_batch_tokens), "--log-level", "warning"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env_without_proxy(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + a.start_timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(url + "/health", timeout=1, proxies={"http": "", "https": ""}).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    proc.wait()
    tail = log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"gkd teacher did not answer /health within {a.start_timeout_s} s; its log:\n{tail}")


def run(args: list[str]) -> list[dict[str, Any]]:
    """Serve the model and measure the worker pool against it, one row pair per k."""
    from pipeline.local.redis_server import RedisServer
    from pipeline.local.tiny_models import tiny_models
    from workers.bench.worker import run_worker

    a = _parse(args)
    cuda = a.device.startswith("cuda")
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.t = a.t or (1024 if cuda else 64)
    n = a.rollouts or (256 if cuda else 32)
    model = str(Path(a.model).resolve()) if a.model else str(tiny_models().teacher.resolve())
    vocab = int(json.loads(Path(model, "config.json").read_text())["vocab_size"])
    ids_T = np.random.default_rng(0).integers(0, vocab, size=a.t, dtype=np.int32)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gkd-bench-serve-") as tmp, RedisServer() as redis_server:
        t0 = time.perf_counter()
        proc, url = start_server(a, model, Path(tmp, "teacher.log"))
        rows.append(result("serve", "server_start_s", time.perf_counter() - t0, "s"))
        try:
            # Warm-up: kernel selection, allocator growth and the first batches of every shape.
            asyncio.run(
                run_worker(redis_server.url, url, ids_T, min(n, a.concurrency), max(a.k), a.concurrency)
            )
            for k in a.k:
                wall, cpu = asyncio.run(run_worker(redis_server.url, url, ids_T, n, k, a.concurrency))
                positions = n * (a.t - 1)
                rows.append(result("serve", f"positions_per_s_k{k}", positions / wall, "pos/s"))
                rows.append(result("serve", f"worker_cpu_us_per_position_k{k}", cpu / positions * 1e6, "us"))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return rows
