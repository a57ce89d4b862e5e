"""`gkd bench trainer`: data-wait fraction of step time with prefetch on and off, while the buffer holds data.

A private redis-server's ready stream is pre-filled with synthetic ScoredSamples (through the real
rollouts -> ready handoff), enough for every step plus what the prefetcher reads ahead, so the stream
never runs dry. The tiny student then trains `--steps` optimizer steps twice, with and without
background prefetch. Data wait is the time a step spends waiting for its micro-batches (reading from
Redis, decoding, padding and copying when not prefetched); the fraction is summed wait over summed step
time, leaving out the first step (it waits for the very first read in both modes), after a short
warm-up run. Target: <= 2% with
prefetch. torch gets all cores but one (``--threads``), leaving one to the process's IO thread.

`held_over_scored`: Redis bytes held for trained samples that no checkpoint includes yet (the trained
journal's MEMORY USAGE; their scored payloads left `ready` at their step) over those samples' scored
bytes, at the journal's largest just before the first checkpoint of a run with `--checkpoint-every 50`
at k = 64 (target <= 0.02).

``--student`` trains another model folder (the GPU check passes a ~0.5B-parameter student from
`pipeline.local.bench_models`), ``--precision bf16`` uses bf16 autocast; on CUDA the peak memory of the
prefetch run is reported too.

Without ``--student``, first: memory per rank and tokens/s of FSDP against DDP on 2 gloo ranks with a
~100M-parameter student (`workers.bench.sharding`; `--sharding-steps 0` skips it). Target: FSDP <= 0.6x
DDP's memory per rank.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.local.redis_server import RedisServer
from pipeline.local.tiny_models import tiny_models
from pipeline.queue.connection import connect, connect_sync
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.schema import RunKeys
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.sections import RunSettings
from pipeline.train.settings import TrainSettings
from pipeline.train.trainer import train
from pipeline.wire.codec import Rollout, ScoredSample, encode_rollout, encode_scored
from workers.bench.cli import result

TARGET = 0.02
SHARDING_TARGET = 0.6  # FSDP memory per rank over DDP's, 2 ranks
HELD_TARGET = 0.02


def synthetic(n: int, t: int, k: int, vocab: int, seed: int = 0) -> list[ScoredSample]:
    """n samples of t tokens (a quarter prompt), k distinct teacher ids per row, fp16 logprobs."""
    rng = np.random.default_rng(seed)
    p = max(1, t // 4)
    out = []
    for i in range(n):
        ids_T = rng.integers(0, vocab, size=t, dtype=np.int32)
        ids_RK, lp_RK = _teacher_rows(rng, t - p, k, vocab)
        ro = Rollout(id=f"bench-{i}", input_ids=ids_T, prompt_len=p, policy_version=0, source="dataset")
        out.append(ScoredSample(ro, ids_RK, lp_RK.astype(np.float16), "bench", k))
    return out


def _teacher_rows(rng: np.random.Generator, rows: int, k: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (distinct per row) and their descending logprobs, [rows, k] each."""
    if vocab <= 4096:  # the top-k of a random distribution over the whole vocabulary
        ids_RK = np.argsort(rng.random((rows, vocab)), axis=1)[:, :k].astype(np.int32)
        return ids_RK, np.log(np.sort(rng.dirichlet(np.ones(vocab), size=rows), axis=1)[:, ::-1][:, :k])
    # A distribution over all of a real vocabulary per row would dominate setup (seconds per sample):
    # k distinct ids (a random base plus distinct offsets below 4k), the top k of a (k+1)-way Dirichlet.
    offsets_RK = np.argsort(rng.random((rows, 4 * k)), axis=1)[:, :k]
    ids_RK = ((rng.integers(0, vocab, size=(rows, 1)) + offsets_RK) % vocab).astype(np.int32)
    return ids_RK, np.log(np.sort(rng.dirichlet(np.ones(k + 1), size=rows), axis=1)[:, ::-1][:, :k])


async def fill(url: str, keys: RunKeys, samples: list[ScoredSample]) -> None:
    """Into `ready` the way the worker pool puts them: rollouts added, then handed off scored."""
    r = connect(url)
    try:
        await ensure_groups(r, keys)
        await add_rollouts(r, keys, [(s.rollout.id, encode_rollout(s.rollout)) for s in samples])
        c = StreamConsumer(r, keys.rollouts, "bench-filler")
        by_id = {s.rollout.id: (s, encode_scored(s)) for s in samples}
        left = len(samples)
        while left:
            got = await c.read(min(left, 256), block_ms=200)
            items = [(e, by_id[e.id][1], by_id[e.id][0].topk_ids.shape[0]) for e in got]
            await c.handoff(keys.ready, items)
            left -= len(got)
    finally:
        await r.aclose()


def measure(
    url: str,
    student: str,
    samples: list[ScoredSample],
    a: argparse.Namespace,
    prefetch: bool,
    run: str | None = None,
) -> dict[str, float]:
    run = run or f"bench-trainer-{'on' if prefetch else 'off'}"
    asyncio.run(fill(url, RunKeys.for_run(run), samples))
    with tempfile.TemporaryDirectory(prefix="gkd-bench-trainer-") as out:
        s = TrainSettings(
            run=RunSettings(name=run, redis_url=url, k=a.k),
            student=student,
            output_dir=out,
            batch_tokens=a.batch_tokens,
            grad_accum=a.grad_accum,
            max_steps=a.steps,
            prefetch=prefetch,
            log_every=1,
            checkpoint_every=10**9,
            lr=1e-4,
            warmup_steps=0,
            device=a.device,
            precision=a.precision,
            num_threads=a.threads,
            log_level="warning",
        )
        cuda = _on_cuda(a.device)
        if cuda:  # the peak of this run alone: model, optimizer state, activations, batches
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        history = train(s).history[1:]  # the first step waits for the first read in both modes
        peak_mb = torch.cuda.max_memory_allocated() / 1e6 if cuda else float("nan")
    wait = sum(h["data_wait_s"] for h in history)
    step = sum(h["step_s"] for h in history)
    tokens = sum(h["tokens"] for h in history)
    return {
        "frac": wait / step,
        "ms_per_step": 1000 * step / len(history),
        "tokens_per_s": tokens / step,
        "peak_mem_mb": peak_mb,
    }


def held_over_scored(url: str, student: str, a: argparse.Namespace, vocab: int) -> dict[str, float]:
    """The journal's bytes over the scored bytes of the samples in it, at its largest before the first
    checkpoint (`checkpoint_every` steps), sampled atomically every 20 ms while the trainer runs."""
    steps, run = 50, "bench-trainer-held"
    samples = synthetic((a.batch_tokens // a.t) * (steps + 4) + 64, a.t, 64, vocab=vocab, seed=1)
    asyncio.run(fill(url, RunKeys.for_run(run), samples))
    keys, client = RunKeys.for_run(run), connect_sync(url)
    peak = {"held": 0.0, "scored": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with client.pipeline(transaction=True) as pipe:
                pipe.memory_usage(keys.journal.key, samples=0)
                pipe.hget(keys.stats, keys.ready.bytes_out)
                held, scored = pipe.execute()
            if (held or 0) > peak["held"]:
                peak.update(held=float(held), scored=float(scored or 0))
            time.sleep(0.02)

    poller = threading.Thread(target=sample, daemon=True)
    poller.start()
    try:
        with tempfile.TemporaryDirectory(prefix="gkd-bench-trainer-") as out:
            s = TrainSettings(
                run=RunSettings(name=run, redis_url=url, k=64), student=student, output_dir=out,
                batch_tokens=a.batch_tokens, max_steps=steps, checkpoint_every=steps, lr=1e-4,
                warmup_steps=0, device=a.device, num_threads=a.threads, log_level="warning",
            )  # fmt: skip
            train(s)
    finally:
        done.set()
        poller.join()
        client.close()
    return {"ratio": peak["held"] / peak["scored"] if peak["scored"] else float("nan"), **peak}


def _on_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def run(args: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="gkd bench trainer")
    p.add_argument("--steps", type=int, default=30, help="measured steps per run (default 30)")
    p.add_argument("--t", type=int, default=256, help="tokens per sample")
    p.add_argument("--k", type=int, default=64, help="teacher top-k (default 64)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="token budget of a micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"), help="training device")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="torch CPU threads")
    p.add_argument("--student", default=None, help="student model folder (default: the tiny student)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: bf16 precision")
    p.add_argument(
        "--sharding-steps", type=int, default=5, help="steps of the FSDP/DDP memory runs (0: skip)"
    )
    p.add_argument("--sharding-batch-tokens", type=int, default=512, help="tokens per rank and step")
    p.add_argument("--sharding-default-malloc", action="store_true", help="glibc's dynamic mmap threshold")
    p.add_argument("--sharding-repeats", type=int, default=2, help="alternating DDP/FSDP runs per mode")
    a = p.parse_args(args)
    logging.getLogger("gkd").setLevel(logging.WARNING)
    student = str(Path(a.student).resolve()) if a.student else str(tiny_models().student.resolve())
    vocab = int(json.loads(Path(student, "config.json").read_text())["vocab_size"])
    per_step = (a.batch_tokens // a.t) * a.grad_accum
    # Enough for every step, the prefetch queue and one read ahead: the stream never runs dry.
    samples = synthetic(per_step * (a.steps + 2 * a.grad_accum + 4) + 64, a.t, a.k, vocab=vocab)
    with RedisServer() as server:
        # Its own ~100M student on CPU ranks: not part of a run on another student (the GPU check's).
        rows = _sharding_rows(server.url, a) if a.sharding_steps > 0 and not a.student else []
        # Warm-up: the first training run in a process pays one-time costs (kernel selection,
        # allocator growth) over its first steps; the measured runs must not inherit them.
        warm = argparse.Namespace(**{**vars(a), "steps": 5})
        measure(server.url, student, samples, warm, prefetch=True, run="bench-trainer-warmup")
        off = measure(server.url, student, samples, a, prefetch=False)
        on = measure(server.url, student, samples, a, prefetch=True)
        held = held_over_scored(server.url, student, a, vocab)
    ratio = off["frac"] / on["frac"] if on["frac"] > 0 else None
    return [
        *rows,
        result(
            "trainer", "data_wait_frac_prefetch", on["frac"], "fraction", baseline=off["frac"], ratio=ratio
        ),
        result("trainer", "data_wait_frac_no_prefetch", off["frac"], "fraction"),
        result("trainer", "prefetch_target_met", float(on["frac"] <= TARGET), "bool", baseline=TARGET),
        result(
            "trainer",
            "step_ms_prefetch",
            on["ms_per_step"],
            "ms",
            baseline=off["ms_per_step"],
            ratio=off["ms_per_step"] / on["ms_per_step"],
        ),
        result(
            "trainer",
            "tokens_per_s_prefetch",
            on["tokens_per_s"],
            "tokens/s",
            baseline=off["tokens_per_s"],
            ratio=on["tokens_per_s"] / off["tokens_per_s"],
        ),
        *([result("trainer", "peak_mem_mb_prefetch", on["peak_mem_mb"], "MB")] if _on_cuda(a.device) else []),
        result("trainer", "held_over_scored", held["ratio"], "fraction", baseline=HELD_TARGET),
        result("trainer", "held_journal_bytes", held["held"], "bytes"),
        result("trainer", "held_scored_bytes", held["scored"], "bytes"),
    ]


def _sharding_rows(url: str, a: argparse.Namespace) -> list[dict[str, Any]]:
    """FSDP against DDP on 2 gloo ranks with a ~100M-parameter student (workers.bench.sharding)."""
    from workers.bench import sharding

    def fill_run(run: str, n: int, vocab: int) -> None:
        asyncio.run(fill(url, RunKeys.for_run(run), synthetic(n, 128, a.k, vocab, seed=1)))

    m = sharding.run_pair(
        url,
        a.sharding_steps,
        a.sharding_batch_tokens,
        a.k,
        fill_run,
        a.sharding_default_malloc,
        a.sharding_repeats,
    )
    ddp, fsdp = m["ddp"], m["fsdp"]
    frac = fsdp["mem_mb"] / ddp["mem_mb"]
    return [
        result("trainer", "student_params", float(m["params"]), "parameters"),
        result(
            "trainer",
            "mem_per_rank_fsdp",
            fsdp["mem_mb"],
            "MB",
            baseline=ddp["mem_mb"],
            ratio=ddp["mem_mb"] / fsdp["mem_mb"],
        ),
        result("trainer", "mem_per_rank_ddp", ddp["mem_mb"], "MB"),
        result("trainer", "fsdp_over_ddp_mem", frac, "fraction", baseline=SHARDING_TARGET),
        result(
            "trainer", "sharding_target_met", float(frac <= SHARDING_TARGET), "bool", baseline=SHARDING_TARGET
        ),
        result(
            "trainer",
            "peak_rss_per_rank_fsdp",
            fsdp["peak_rss_mb"],
            "MB",
            baseline=ddp["peak_rss_mb"],
            ratio=ddp["peak_rss_mb"] / fsdp["peak_rss_mb"],
        ),
        result(
            "trainer", "checkpoint_stall_ms_fsdp", fsdp["checkpoint_ms"], "ms", baseline=ddp["checkpoint_ms"]
        ),
        result(
            "trainer",
            "export_gather_ms_fsdp",
            fsdp["export_gather_ms"],
            "ms",
            baseline=ddp["export_gather_ms"],
        ),
        result("trainer", "export_background_ms_fsdp", fsdp["export_write_ms"], "ms"),
        result(
            "trainer",
            "tokens_per_s_fsdp",
            fsdp["tokens_per_s"],
            "tokens/s",
            baseline=ddp["tokens_per_s"],
            ratio=fsdp["tokens_per_s"] / ddp["tokens_per_s"],
        ),
    ]
