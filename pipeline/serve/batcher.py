"""The reference teacher's batching engine: concurrent score jobs -> one padded forward pass -> top-k.

Requests wait in a queue; a batcher task takes the first, then keeps collecting for up to `max_wait_ms`
or until the padded batch would exceed `max_batch_tokens` (B x longest T), runs the model in a
one-thread executor (the event loop stays responsive) under `torch.inference_mode()`, computes
log_softmax, top-k, the actual tokens' logprobs and ranks ON THE DEVICE, and copies only [T, k]-sized
results per job to the CPU.

Shape legend: B = jobs in a batch, L = longest T in the batch, V = vocab, K = a job's k,
T = one job's tokens. Row p of a job's arrays is the distribution predicted at position p, i.e. over
token p + 1 (row T - 1 predicts the next, generated token).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("gkd.teacher.server")


@dataclass(frozen=True)
class Draws:
    """What a job asks to be drawn from the teacher (the sampled extension, pipeline/teacher/sampled.py)."""

    samples: int
    """Draws per position, with replacement, at temperature 1."""
    seed: int
    """Seed of the job's own generator: the same ids and seed give the same draws."""
    rows_from: int
    """The first token whose distribution is drawn from (rows rows_from - 1 .. T - 2 of the job)."""


@dataclass
class ScoreJob:
    """One prompt to score: its ids, the widest top-k anybody wants of it, and draws if asked."""

    ids: list[int]
    k: int
    future: asyncio.Future[ScoreResult] = field(repr=False)
    draws: Draws | None = None


@dataclass
class ScoreResult:
    """Per-position results of one job (CPU numpy)."""

    topk_ids_TK: np.ndarray
    """int64 [T, K]: row p holds the K most likely ids at position p (over token p + 1), descending."""
    topk_logprobs_TK: np.ndarray
    """float32 [T, K]: their natural-log probabilities (full-vocab log_softmax)."""
    actual_logprobs_T: np.ndarray
    """float32 [T]: entry p is the logprob of the actual token p + 1 at position p (entry T-1: greedy)."""
    actual_ranks_T: np.ndarray
    """int64 [T]: 1-based rank of that token in the full distribution."""
    drawn: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    """With `Draws`: (ids int64 [R, S], counts int32 [R, S], logprobs float32 [R, S]) as
    `draw_teacher_samples` returns them, row r over token rows_from + r (R = T - rows_from)."""


@dataclass(frozen=True)
class BatcherConfig:
    """Bounds of one forward pass."""

    max_batch_tokens: int = 16384
    """Largest B x L of a padded batch (a single longer prompt still runs alone)."""
    max_wait_ms: float = 5.0
    """How long the first job of a batch waits for company."""
    pad_id: int = 0
    """Token id used for padding (masked out)."""


class Batcher:
    """Owns the model and the queue. `submit` from the event loop; `run` is the batcher task."""

    def __init__(self, model: Any, device: str, config: BatcherConfig = BatcherConfig()) -> None:
        self.model = model
        self.device = device
        self.config = config
        self.queue: asyncio.Queue[ScoreJob] = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gkd-teacher-model")
        self._task: asyncio.Task[None] | None = None
        self._carry: ScoreJob | None = None
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        """Start the batcher task in the running loop."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name="gkd-teacher-batcher")

    async def stop(self) -> None:
        """Cancel the batcher; jobs still queued fail with CancelledError."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, ids: list[int], k: int, draws: Draws | None = None) -> ScoreResult:
        """Score `ids` with top-`k` per position (k >= 1) and, with `draws`, draw from the distributions;
        waits for the batch that includes it."""
        fut: asyncio.Future[ScoreResult] = asyncio.get_running_loop().create_future()
        await self.queue.put(ScoreJob(ids, max(1, k), fut, draws))
        return await fut

    async def _collect(self) -> list[ScoreJob]:
        if self._carry is not None:
            first, self._carry = self._carry, None
        else:
            first = await self.queue.get()
        batch, longest = [first], len(first.ids)
        deadline = time.monotonic() + self.config.max_wait_ms / 1000.0
        while True:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            new_longest = max(longest, len(job.ids))
            if new_longest * (len(batch) + 1) > self.config.max_batch_tokens:
                self._carry = job  # opens the next batch, keeping arrival order
                break
            batch.append(job)
            longest = new_longest
        return batch

    async def run(self) -> None:
        """Batch forever: collect, forward in the executor, resolve each job's future."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [j for j in batch if not j.future.done()]  # a cancelled client request is skipped
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.forward, live)
            except Exception as exc:
                log.exception("forward pass of %d jobs failed", len(live))
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.batches += 1
            self.jobs += len(live)
            for job, res in zip(live, results, strict=True):
                if not job.future.done():
                    job.future.set_result(res)

    def forward(self, jobs: list[ScoreJob]) -> list[ScoreResult]:
        """One padded forward pass of `jobs` (runs in the executor thread)."""
        import torch

        B, L = len(jobs), max(len(j.ids) for j in jobs)
        ids_BL = torch.full((B, L), self.config.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((B, L), dtype=torch.long)
        for b, job in enumerate(jobs):
            ids_BL[b, : len(job.ids)] = torch.tensor(job.ids, dtype=torch.long)
            mask_BL[b, : len(job.ids)] = 1
        with torch.inference_mode():
            logits_BLV = self.model(
                input_ids=ids_BL.to(self.device), attention_mask=mask_BL.to(self.device)
            ).logits
            # per job, so the float32 log-softmax is [T, V], never [B, L, V], and padding is skipped
            return [self._topk(logits_BLV[b, : len(job.ids)], job) for b, job in enumerate(jobs)]

    @staticmethod
    def _topk(logits_TV: Any, job: ScoreJob) -> ScoreResult:
        """Top-k, the actual next tokens' logprobs and ranks of one job, on the logits' device."""
        import torch

        logprobs_TV = torch.log_softmax(logits_TV.float(), dim=-1)
        top_lp_TK, top_ids_TK = logprobs_TV.topk(min(job.k, logprobs_TV.shape[-1]), dim=-1)
        # position p predicts token p + 1; the last position predicts the greedy next token
        next_T = torch.empty(len(job.ids), dtype=torch.long, device=logprobs_TV.device)
        next_T[:-1] = torch.tensor(job.ids[1:], dtype=torch.long)
        next_T[-1] = top_ids_TK[-1, 0]
        actual_T = logprobs_TV.gather(-1, next_T.unsqueeze(-1)).squeeze(-1)
        rank_T = (logprobs_TV > actual_T.unsqueeze(-1)).sum(dim=-1) + 1
        return ScoreResult(
            topk_ids_TK=top_ids_TK.cpu().numpy(),
            topk_logprobs_TK=top_lp_TK.cpu().numpy(),
            actual_logprobs_T=actual_T.cpu().numpy(),
            actual_ranks_T=rank_T.cpu().numpy(),
            drawn=_draw(logprobs_TV, job.draws) if job.draws is not None else None,
        )


def _draw(logprobs_TV: Any, draws: Draws) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The job's draws from rows rows_from - 1 .. T - 2 (over tokens rows_from .. T - 1), on the device
    of the logits, with a generator of its own seeded by the job (batch-mates do not change them)."""
    import torch

    from pipeline.train.loss.sampled import draw_teacher_samples

    gen = torch.Generator(device=logprobs_TV.device).manual_seed(draws.seed)
    rows_RV = logprobs_TV[draws.rows_from - 1 : -1]
    ids_RS, counts_RS, lp_RS = draw_teacher_samples(rows_RV, draws.samples, gen)
    return ids_RS.cpu().numpy(), counts_RS.cpu().numpy(), lp_RS.cpu().numpy()
