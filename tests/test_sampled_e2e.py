"""A sampled teacher (RS-KD) end to end, real processes throughout: `gkd teacher` on loopback (the tiny
teacher), `gkd workers --teacher-mode sampled --samples n`, `gkd train --loss-mode sampled`, a real Redis.

The scored samples in `ready` are version-2 records whose rows hold the distinct ids of n draws with
counts summing to n and the teacher's exact log-probabilities (compared with the same teacher run
directly in torch); the trainer trains every rollout exactly once, its loss finite and falling; a
trainer with a top-k loss mode and `gkd export` refuse the run, naming the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis.asyncio as aioredis
import requests
import torch

from pipeline.local.redis_server import free_port
from pipeline.local.tiny_models import corpus, tiny_models
from pipeline.queue.runstate import read_config
from pipeline.queue.schema import Config, RunKeys
from pipeline.wire.codec import SAMPLED_VERSION, Rollout, decode_scored, encode_rollout
from tests.faults_harness import (
    Procs,
    dead_letters,
    gkd,
    procs,
    produce,
    stream_entries,
    trained_steps,
    trainer_cmd,
    wait_until,
    worker_cmd,
)

__all__ = ["procs"]
N = 40
SAMPLES = 8
RUN = "samp"
pytestmark = pytest.mark.timeout(420)


def corpus_rollouts(tok: Any) -> list[Rollout]:
    """N corpus sentences (BOS + text + EOS) in the tiny models' vocabulary, the first 3 tokens a prompt."""
    out = []
    for i, text in enumerate(corpus(N, seed=5)):
        ids = [tok.bos_token_id, *tok(text)["input_ids"], tok.eos_token_id]
        out.append(Rollout(id=f"sm-{i:03d}", input_ids=np.asarray(ids, dtype=np.int32), prompt_len=3))
    return out


async def start_teacher(procs: Procs) -> str:
    port = free_port()
    teacher = str(tiny_models().teacher.resolve())
    procs.spawn("teacher", gkd("teacher", "--model", teacher, "--port", str(port), "--max-samples", "64",
                               "--threads", "1"))  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(url + "/health", timeout=2, proxies={"http": "", "https": ""}).ok
        except requests.ConnectionError:
            return False

    await wait_until(healthy, 120, "gkd teacher up", procs=procs, alive=["teacher"], poll_s=0.3)
    return url


def check_draws(samples: list[Any], by_id: dict[str, Rollout]) -> None:
    """Rows: counts sum to n, drawn ids distinct and in the vocabulary, logprobs the teacher's own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models().teacher)).eval()
    vocab = int(model.config.vocab_size)
    for s in samples:
        ro = by_id[s.rollout.id]
        np.testing.assert_array_equal(s.rollout.input_ids, ro.input_ids)
        assert s.sampled and s.k == SAMPLES and s.teacher_counts is not None
        assert (s.teacher_counts.sum(1) == SAMPLES).all()
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ro.input_ids.tolist()])).logits[0].float()
        full_TV = torch.log_softmax(logits, -1).numpy()
        for r in range(s.topk_ids.shape[0]):
            drawn = s.teacher_counts[r] > 0
            ids = s.topk_ids[r, drawn]
            assert len(set(ids.tolist())) == ids.size and ids.max() < vocab
            # row r is over token prompt_len + r: the teacher's logits at position prompt_len - 1 + r
            expected = full_TV[ro.prompt_len - 1 + r, ids]
            np.testing.assert_allclose(s.topk_logprobs[r, drawn], expected, atol=1e-4)


async def test_sampled_teacher_workers_and_trainer_end_to_end(
    redis_url: str, r: aioredis.Redis, tmp_path: Path, procs: Procs
) -> None:
    from transformers import AutoTokenizer

    keys = RunKeys.for_run(RUN)
    tok = AutoTokenizer.from_pretrained(str(tiny_models().teacher))
    rollouts = corpus_rollouts(tok)
    by_id = {ro.id: ro for ro in rollouts}
    url = await start_teacher(procs)
    await produce(r, keys, [(ro.id, encode_rollout(ro)) for ro in rollouts])
    sampled_flags = ["--teacher-mode", "sampled", "--samples", str(SAMPLES), "--request-timeout-s", "30"]
    procs.spawn("worker", worker_cmd(redis_url, RUN, [url], "w", concurrency=4, extra=sampled_flags))

    async def all_scored() -> bool:
        return int(await r.xlen(keys.ready.key)) >= N

    await wait_until(all_scored, 180, "every rollout scored", procs=procs, alive=["worker", "teacher"])
    procs.kill9("worker")  # everything is published; its graceful stop is tested elsewhere
    config = await read_config(r, keys)
    assert (config[Config.TEACHER_MODE], config[Config.K]) == ("sampled", str(SAMPLES))
    entries = await stream_entries(r, keys.ready.key)
    assert sorted(e["id"].decode() for e in entries) == sorted(by_id)
    assert {msgpack.unpackb(e["data"])["v"] for e in entries} == {SAMPLED_VERSION}
    samples = [decode_scored(e["data"]) for e in entries]
    check_draws(samples, by_id)

    # A trainer with a top-k loss mode is refused before it trains, naming the flags.
    out = tmp_path / "train"
    log = out / "samples.jsonl"
    procs.spawn("wrong", trainer_cmd(redis_url, RUN, str(tiny_models().student.resolve()), out, log))
    assert await procs.wait("wrong", 120) == 2
    assert "--loss-mode sampled --samples 8 --beta 0" in procs.tail("wrong")
    # gkd export refuses a sampled run: a scored dataset holds top-k rows.
    procs.spawn("export", gkd("export", "--run", RUN, "--redis", redis_url, "--out", str(tmp_path / "ds")))
    assert await procs.wait("export", 60) == 2
    assert "holds top-k rows only" in procs.tail("export")

    flags = ["--loss-mode", "sampled", "--samples", str(SAMPLES), "--beta", "0", "--log-every", "1",
             "--lr", "3e-3", "--batch-tokens", "80"]  # fmt: skip
    cmd = trainer_cmd(redis_url, RUN, str(tiny_models().student.resolve()), out, log, k=SAMPLES,
                      checkpoint_every=1000, idle_exit_s=3.0, extra=flags)  # fmt: skip
    procs.spawn("train", cmd)
    assert await procs.wait("train", 240) == 0, procs.tail("train")

    steps = trained_steps(log)
    trained = [i for _, ids in sorted(steps.items()) for i in ids]
    assert sorted(trained) == sorted(by_id)  # every rollout in exactly one optimizer step
    assert await dead_letters(r, keys) == {}
    assert int(await r.xlen(keys.ready.key)) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in sorted(metrics, key=lambda m: m["step"])]
    assert len(losses) == len(steps) >= 4 and all(np.isfinite(losses))
    third = len(losses) // 3
    assert np.mean(losses[-third:]) < np.mean(losses[:third])  # the student moves toward the teacher
