"""`gkd train`: train the student on ready samples with the top-k GKD loss (torchrun for several devices).

The main thread only does torch work; Redis lives on a background IO loop (`pipeline.train.ioloop.IOLoop`)
where the prefetcher reads and packs the next micro-batches while the current step computes.

Delivery (ARCHITECTURE.md, "Delivery guarantees"): right after each optimizer step a rank's trained
samples leave `ready` and their compact rollouts enter the run's trained journal with the step
(`pipeline.train.ready`); a checkpoint trims the journal up to its step. At start, before any rank
reads, rank 0 settles what the checkpoint lists as included but unjournaled and puts journal entries
past the checkpoint back into `rollouts` (with any number of ranks and any names): every sample counts
in exactly one optimizer step of the checkpoint lineage the run continues from. Entries of trainers that
are gone are taken over after the lease.

Rank r reads as consumer ``<name>-<r>``: the name is stable so that a restarted rank finds its pending
entries, and one live process holds it. The student is sharded over the ranks (FSDP2) or replicated
(DDP): `pipeline.train.student`. Every rank writes its shard of a checkpoint; rank 0 exports the weights
for the producers in the background and publishes the policy (version = optimizer step of the
checkpoint) once that export is written: a rollout's policy version is an optimizer step, and
staleness is counted in steps.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import GKDError, SettingsError, TeacherIncompatible
from pipeline.models import check_source
from pipeline.notice import WaitNotice
from pipeline.queue.connection import connect, wait_for_redis, where
from pipeline.queue.runstate import check_run_config, other_runs, read_config, read_policy
from pipeline.queue.schema import HB, Config
from pipeline.train.batching import Batch, BatchPacker
from pipeline.train.distributed import Dist, init_distributed, shutdown
from pipeline.train.ioloop import IOLoop
from pipeline.train.lineage import Lineage
from pipeline.train.metrics import MetricsSink, SampleLog, teacher_metrics
from pipeline.train.prefetch import TRAIN, Prefetcher, Verdict
from pipeline.train.ready import ReadyLeases
from pipeline.train.settings import TrainSettings
from pipeline.train.startup import (
    check_output_dir,
    check_policy_floor,
    check_teacher_mode,
    start_point,
)
from pipeline.train.step import LossConfig, StepStats, train_step
from pipeline.vocab import check_student, tokenizer_fingerprint
from pipeline.wire.codec import META_RETRAIN_OF_STEP, ScoredSample

log = logging.getLogger("gkd.train")

#: Samples in a row beyond the student's vocabulary, none trained yet, that make a trainer refuse.
OUTSIDE_VOCAB_REFUSAL = 16


@dataclass
class TrainSummary:
    """What a run did (returned by `train`, for tests and benchmarks)."""

    steps: int = 0
    """The optimizer step reached (counting the steps of the checkpoint a resume started from)."""
    samples: int = 0
    """Samples trained by this process."""
    checkpoint: str | None = None
    """The latest checkpoint: written by this process, or the one it resumed from."""
    history: list[dict[str, float]] = field(default_factory=list)
    start_step: int = 0
    """The step this process started at (a resume's checkpoint step; 0 for a new run)."""
    started: bool = True
    """False when stopped before it could start (still waiting for Redis)."""


class _Stopped(Exception):
    """Stopped (SIGTERM, Ctrl-C) before the trainer could start (still waiting for Redis)."""


class Trainer(Lineage):
    """One rank of a training job. `run()` loops until max steps, stop, SIGTERM or idle exit."""

    def __init__(self, s: TrainSettings, stop: threading.Event | None = None) -> None:
        check_source(s.student, "--student")
        check_output_dir(s.output_dir)
        for name in ("grad_accum", "batch_tokens", "checkpoint_every", "log_every"):
            if getattr(s, name) < 1:
                raise SettingsError(f"{name}: expected >= 1, got {getattr(s, name)}")
        self.s = s
        self.stop = stop or threading.Event()
        MetricsSink.tensorboard_writer(s.tensorboard_dir, create=False)  # fails fast if missing
        if s.num_threads > 0:
            torch.set_num_threads(s.num_threads)
        if s.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.dist: Dist = init_distributed(s.device, host_collectives=s.cpu_offload)
        torch.manual_seed(s.seed + self.dist.rank)
        self.keys = s.run.keys
        self.consumer_name = f"{s.name}-{self.dist.rank}"
        self.io = IOLoop()
        self.r = self.io.run(_connect(s.run.redis_url, s.run.redis_cluster))
        self.step = 0
        self.version = 0
        self.last_ckpt_step = -1
        self._vocab_checked = False
        self._outside_vocab = 0  # samples in a row whose ids the student's vocabulary does not cover
        self.idle_notice = WaitNotice(log)
        fixed = s.run.fixed(Config.K, Config.LOSS_MODE, Config.PARTITIONS, Config.TEACHER_MODE)
        try:
            waited = wait_for_redis(self.r, f"trainer {self.consumer_name}", self.stop)
            if not self.io.run(waited, timeout_s=None):
                raise _Stopped
            # Refuse early, but fix nothing for the run until this trainer has passed every check.
            check_teacher_mode(self.io.run(read_config(self.r, self.keys)), s.run)
            self.io.run(check_run_config(self.r, self.keys, fixed, record=False))
            self._check_policy_floor()
            self.ready = ReadyLeases(
                self.io, self.r, self.keys, self.consumer_name, flow=s.flow, stop=self.stop,
                partitions=s.run.partitions, replicas=s.run.replicas(self.r),
            )  # fmt: skip
            self._listed: dict[str, list[tuple[str, int]]] = {}
            self._load_model()
            self._check_vocabulary(required=False)
            self.io.run(check_run_config(self.r, self.keys, fixed))
            self._recover()
        except BaseException:
            self._close_io()
            raise
        self.summary = TrainSummary(steps=self.step, start_step=self.step, checkpoint=self.resumed_from)
        self.sink = (
            MetricsSink(Path(s.output_dir), MetricsSink.tensorboard_writer(s.tensorboard_dir))
            if self.dist.is_main
            else None
        )
        job = self.dist.broadcast(uuid.uuid4().hex[:12])  # one id for every rank of this launch
        self.sample_log = SampleLog(s.sample_log, self.dist.rank, job) if s.sample_log else None

    # ------------------------------------------------------------------ setup

    def _check_policy_floor(self) -> None:
        """Refuse to start below the run's published policy version (pipeline.train.startup)."""
        s = self.s
        latest, version = start_point(s.output_dir, s.resume)
        published = self.io.run(read_policy(self.r, self.keys))
        check_policy_floor(
            self.keys.run, published, resume=s.resume, output_dir=s.output_dir, latest=latest,
            start_version=version,
        )  # fmt: skip

    def _check_vocabulary(self, required: bool) -> None:
        """Refuse a student that does not cover the teacher's vocabulary, as far as the run config says.
        Until a worker has recorded the teacher's tokenizer the check waits for the first batch
        (`required`: check whatever is recorded by then)."""
        if self._vocab_checked:
            return
        config = self.io.run(read_config(self.r, self.keys))
        if not required and Config.TEACHER_TOKENIZER not in config:
            log.info("the run's teacher tokenizer is not recorded yet: checking the student against it later")
            return
        fp = tokenizer_fingerprint(self.tokenizer) if self.tokenizer is not None else None
        s = self.s
        check_student(config, student=s.student, vocab_size=self.vocab, fingerprint_=fp, run=self.keys.run)
        self._vocab_checked = True

    def _check(self, sample: ScoredSample) -> Verdict:
        """Dead-letter what can never train here; skip (count) stale student rollouts."""
        ro, s = sample.rollout, self.s
        if sample.k != s.run.width or sample.sampled != s.run.sampled:
            mode = "sampled" if s.run.sampled else "top-k"
            return Verdict(
                "dead", f"k mismatch: the run trains with {mode} k={s.run.width}, the sample has "
                f"{'sampled' if sample.sampled else 'top-k'} k={sample.k}",
            )  # fmt: skip
        top = max(int(ro.input_ids.max()), int(sample.topk_ids.max()))
        if top >= self.vocab:
            self._outside_vocab += 1
            return Verdict("dead", f"token id {top} outside the student's vocabulary of {self.vocab}")
        self._outside_vocab = 0
        if (
            s.max_staleness is not None
            and ro.source == "student"
            and META_RETRAIN_OF_STEP not in ro.meta  # put back by a resume: it passed once already
            and self.step - ro.policy_version > s.max_staleness
        ):
            return Verdict(
                "skip", f"policy version {ro.policy_version} < step {self.step} - {s.max_staleness}"
            )
        return TRAIN

    def _prefetcher(self) -> Prefetcher:
        s = self.s
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        packer = BatchPacker(s.batch_tokens, pad_id=pad, pin=self.dist.device.type == "cuda")
        return Prefetcher(
            self.io,
            self.ready,
            packer,
            check=self._check,
            device=self.dist.device,
            depth=s.prefetch_depth or max(2, 2 * s.grad_accum),
            enabled=s.prefetch,
            stop=self.stop,
        )

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainSummary:
        s, d = self.s, self.dist
        pf = self._prefetcher()
        self.ready.start(fields=lambda: {HB.STEP: self.step, HB.POLICY_VERSION: self.version})
        pf.start()
        cfg = LossConfig(s.beta, s.temperature, s.run.loss_mode)
        # Under FSDP, bf16 is the sharding's mixed-precision policy, not autocast.
        autocast = torch.bfloat16 if s.precision == "bf16" and not self.student.fsdp else None
        last_data = time.monotonic()
        try:
            while not (s.max_steps and self.step >= s.max_steps):
                self._publish_exports()
                t0 = time.perf_counter()
                micro = self._collect(pf)
                wait_s = time.perf_counter() - t0
                if micro:
                    last_data = time.monotonic()
                starved_s = 0.0 if micro else time.monotonic() - last_data
                idle = s.idle_exit_s > 0 and starved_s > s.idle_exit_s
                # One all-reduce decides for every rank: stop, skip (no data anywhere) or step, and
                # gives the global loss-token count that normalizes every micro-batch's loss.
                local = [
                    bool(micro),
                    self.stop.is_set(),
                    idle,
                    sum(b.num_loss_tokens for b in micro),
                    sum(b.num_tokens for b in micro),
                ]
                # Ranks with n micro-batches, per n: every rank runs as many passes as the fullest one.
                counts = [float(len(micro) == n) for n in range(1, s.grad_accum + 1)]
                sums = d.all_sum([float(x) for x in local] + counts)
                has, stop, idles, g_rows, g_tokens = sums[:5]
                passes = max((n for n, c in enumerate(sums[5:], 1) if c), default=1)
                if stop or idles == d.world_size:
                    break
                if not has:
                    self._refuse_another_vocabulary()
                    self.idle_notice.waiting(self._waiting_for)
                    continue
                self.idle_notice.over()
                self._check_vocabulary(required=True)  # when no worker had recorded the teacher at start
                log_step = (self.step + 1) % s.log_every == 0 or self.step == 0
                st = train_step(
                    self.student.module,
                    micro,
                    global_rows=g_rows,
                    world_size=d.world_size,
                    cfg=cfg,
                    optimizer=self.student.optimizer,
                    scheduler=self.student.scheduler,
                    device=d.device,
                    max_grad_norm=s.max_grad_norm,
                    autocast_dtype=autocast,
                    want_kl=log_step,
                    passes=passes,
                )
                self.step += 1
                self._after_step(micro, st, wait_s, time.perf_counter() - t0, g_tokens, log_step)
        finally:
            pf.stop()
        if self.step > self.last_ckpt_step and self.step > 0:
            self._checkpoint()
        self.exports.wait()
        self._publish_exports()
        return self.summary

    def _refuse_another_vocabulary(self) -> None:
        """Without a recorded teacher tokenizer (a server without /tokenize) a student of another family is
        caught by its samples: many in a row, none trained yet, all beyond its vocabulary."""
        if self.step == self.summary.start_step and self._outside_vocab >= OUTSIDE_VOCAB_REFUSAL:
            n, run = self._outside_vocab, self.keys.run
            raise TeacherIncompatible(
                f"the last {n} samples of run {run!r} hold teacher token ids beyond student "
                f"{self.s.student}'s vocabulary of {self.vocab} tokens, and none trained (they are in the "
                f"dead stream, stage trainer): the teacher uses another vocabulary; expected a student with "
                f"the teacher's tokenizer (the same model family)"
            )

    def _waiting_for(self) -> str:
        run = self.keys.run
        try:
            others = self.io.run(other_runs(self.r, self.keys), timeout_s=10)
        except (GKDError, TimeoutError):
            others = []
        elsewhere = f"; other runs in this Redis: {', '.join(others[:5])}" if others else ""
        return (
            f"trainer {self.consumer_name}: waiting for scored samples in {self.keys.ready.key} (Redis at "
            f"{where(self.r)}), at step {self.step}; is a worker pool scoring run {run!r} and a producer "
            f"feeding it? (gkd status --run {run}){elsewhere}"
        )

    def _collect(self, pf: Prefetcher) -> list[Batch]:
        """Up to --grad-accum micro-batches; fewer when the stream runs dry (or a stop is requested)."""
        micro: list[Batch] = []
        while len(micro) < self.s.grad_accum:
            batch = pf.get(timeout_s=0.5)
            if batch is not None:
                micro.append(batch)
            elif pf.idle or self.stop.is_set():
                break
        return micro

    def _after_step(
        self, micro: list[Batch], st: StepStats, wait_s: float, step_s: float, g_tokens: float, log_step: bool
    ) -> None:
        s, d = self.s, self.dist
        entries = [e for b in micro for e in b.refs]
        self.ready.trained(entries, self.step)
        self.summary.steps = self.step
        self.summary.samples += len(entries)
        if self.sample_log is not None:
            self.sample_log.write(self.step, [b_id for b in micro for b_id in b.sample_ids])
        self.ready.count_step(
            samples=len(entries),
            tokens=int(sum(b.num_loss_tokens for b in micro)),
            wait_ms=int(wait_s * 1000),
            step_ms=int(step_s * 1000),
            steps=int(d.is_main),
        )
        if log_step:
            sums = d.all_sum([*st.as_list(), wait_s, step_s])
            g = StepStats.from_list(sums[:-2])
            per_teacher = d.all_gather(st.per_teacher)  # each rank's samples may name other teachers
            if self.sink is not None:
                lr = float(self.student.scheduler.get_last_lr()[0])
                metrics = self.sink.step_metrics(
                    self.step, g, g_tokens, step_s, sums[-2], sums[-1], d.world_size, lr
                )
                metrics.update(teacher_metrics(per_teacher))
                self.summary.history.append(metrics)
                self.sink.write(metrics)
        if self.step % s.checkpoint_every == 0:
            self._checkpoint()

    # ------------------------------------------------------------------ checkpoints

    def close(self, clean: bool = True) -> None:
        """Release everything; `clean`: every rank got here (not after an error on this rank alone)."""
        exports = getattr(self, "exports", None)
        if exports is not None:
            exports.wait()
            self._publish_exports()
        self.ready.close()
        if self.sink is not None:
            self.sink.close()
        if self.sample_log is not None:
            self.sample_log.close()
        self._close_io()
        shutdown(wait_for_peers=clean)

    def _close_io(self) -> None:
        try:
            self.io.run(self.r.aclose(), timeout_s=10)
        except Exception as exc:  # closing at exit: nothing left to save
            log.debug("closing the redis client: %r", exc)
        self.io.close()


async def _connect(url: str, cluster: bool) -> Any:
    return connect(url, cluster=cluster)


def train(s: TrainSettings, stop: threading.Event | None = None) -> TrainSummary:
    """Run one rank of `gkd train` to its end (max steps, stop event, SIGTERM, idle exit)."""
    try:
        trainer = Trainer(s, stop)
    except _Stopped:
        return TrainSummary(started=False)
    try:
        summary = trainer.run()
    except BaseException:
        trainer.close(clean=False)  # the other ranks may never reach a last barrier
        raise
    trainer.close()
    return summary
