"""`gkd bench codec`: encode and decode of one ScoredSample (T = 4096, k = 64, int32 ids, fp16 logprobs).

Reports MB/s of encode and decode, bytes per scored token, and encode time over the time of a plain
memory copy of the same bytes (the floor for any encoder that produces a contiguous message).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.wire.codec import Rollout, ScoredSample, decode_scored, encode_scored
from workers.bench.cli import result


def sample(t: int, k: int, prompt_len: int = 1) -> ScoredSample:
    rng = np.random.default_rng(0)
    ids_T = rng.integers(0, 150_000, size=t, dtype=np.int32)
    rows = t - prompt_len
    ids_RK = rng.integers(0, 150_000, size=(rows, k), dtype=np.int32)
    logprobs_RK = -np.sort(rng.random((rows, k)) * 20, axis=1).astype(np.float16)
    r = Rollout(id="bench-0", input_ids=ids_T, prompt_len=prompt_len, policy_version=1, source="student")
    return ScoredSample(rollout=r, topk_ids=ids_RK, topk_logprobs=logprobs_RK, teacher="bench", k=k)


def best_of(fn: Callable[[], Any], reps: int) -> float:
    """Fastest wall time of `reps` calls, in seconds (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(args: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="gkd bench codec", description=__doc__.splitlines()[0])
    p.add_argument("--t", type=int, default=4096, help="tokens of the sample (default 4096)")
    p.add_argument("--k", type=int, default=64, help="teacher top-k per position (default 64)")
    p.add_argument("--reps", type=int, default=50, help="repetitions; the fastest counts (default 50)")
    a = p.parse_args(args)
    s = sample(a.t, a.k)
    buf = encode_scored(s)
    n = len(buf)
    src = np.frombuffer(buf, dtype=np.uint8)
    dst = np.empty_like(src)
    t_copy = best_of(lambda: np.copyto(dst, src), a.reps)
    t_enc = best_of(lambda: encode_scored(s), a.reps)
    t_dec = best_of(lambda: decode_scored(buf), a.reps)
    mb = n / 1e6
    return [
        result("codec", "encode_MBps", mb / t_enc, "MB/s", baseline=mb / t_copy, ratio=None),
        result("codec", "decode_MBps", mb / t_dec, "MB/s", baseline=mb / t_copy, ratio=None),
        result("codec", "bytes_per_token", n / (a.t - 1), "B", baseline=6 * a.k, ratio=None),
        result("codec", "encode_time_over_memcpy", t_enc / t_copy, "x", baseline=2.0, ratio=None),
        result("codec", "message_bytes", float(n), "B"),
    ]
