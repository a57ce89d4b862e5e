"""`gkd rollouts`: turn JSONL prompts into Rollouts on the rollouts stream, on-policy with probability lmbda.

For each prompt, with probability ``--lmbda`` the student generates the completion (in process with
transformers, or through ``--student-server``) from its latest published policy, else the dataset
completion is used. A prompt without a dataset completion (``{"prompt"}`` or a chat ending with the
user) is always completed by the student, whatever lmbda: it cannot be used otherwise.

The producer polls the run's policy every ``--policy-poll-s``; when the version changes it loads that
checkpoint (logging it) and stamps every later rollout with the new version. It waits for room below
the rollouts stream's high-water mark before each batch, and backs off and carries on through Redis
outages: a batch whose add failed is retried, unless it turns out to have been written and only the
reply was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import (
    RedisUnavailable,
    RetryableError,
    SettingsError,
    StreamGroupMissing,
    WireFormatError,
)
from pipeline.models import check_source
from pipeline.produce.prompts import PromptFileError, PromptItem, check_teacher_names, load_prompts
from pipeline.produce.student_gen import Generator, LocalGenerator, Sampling, ServerGenerator
from pipeline.queue.backpressure import Backpressure
from pipeline.queue.connection import RedisRetry, connect, wait_for_redis
from pipeline.queue.runstate import Heartbeat, check_run_config, now_ms, read_config, read_policy
from pipeline.queue.schema import HB, Config, Role, RunKeys
from pipeline.queue.streams import add_rollouts, batch_landed, ensure_groups
from pipeline.sections import CommonSettings, FlowSettings
from pipeline.settings import section, setting
from pipeline.wire.codec import Rollout, encode_rollout

log = logging.getLogger("gkd.rollouts")


@dataclass
class RolloutSettings(CommonSettings):
    """Settings of `gkd rollouts`."""

    flow: FlowSettings = section(
        FlowSettings, "high_water", "low_water", "high_water_bytes", "low_water_bytes"
    )
    prompts: str = setting("", "JSONL prompts: {prompt}, {prompt, completion} or {messages} per line.")
    student: str = setting("", "Student model folder or Hugging Face id (tokenizer; in-process generation).")
    student_server: str | None = setting(
        None, "OpenAI-compatible server that generates for the student (/v1/completions, token-id prompts)."
    )
    student_server_reload: str | None = setting(
        None,
        "Path on the student server that loads a new checkpoint, POST {model_path} "
        "(SGLang: /update_weights_from_disk); without it the server must be kept in sync by other means.",
    )
    request_timeout_s: float = setting(120.0, "Timeout of one student server request.")
    lmbda: float = setting(0.5, "Probability that the student generates a completion (on-policy).")
    max_new_tokens: int = setting(128, "Longest student completion, in tokens.")
    temperature: float = setting(1.0, "Student sampling temperature (0: greedy).")
    top_p: float = setting(1.0, "Student nucleus sampling.")
    seed: int = setting(0, "Seed of the prompt order, the lmbda draws and sampling.")
    num_rollouts: int = setting(0, "Stop after writing this many rollouts (0: no limit).")
    epochs: int = setting(1, "Passes over the prompts (0: loop forever).")
    shuffle: bool = setting(True, "Shuffle the prompts in every pass.")
    batch_size: int = setting(8, "Prompts per generation batch and per stream write.")
    policy_poll_s: float = setting(5.0, "How often to look for a newly published policy.")
    device: str = setting("auto", "Device of in-process generation.", choices=("cpu", "cuda", "auto"))
    name: str = setting("rollouts", "Process name (heartbeat).")
    teacher: str | None = setting(None, 'Teacher name of prompt lines without a "teacher" key.')
    skip_scored: list[str] = setting(
        [],
        "Scored dataset folder(s) (gkd export): leave out sequences whose exact token ids are already "
        "scored there by the run's teacher and k (repeat or comma-separate).",
    )


@dataclass
class ProducerSummary:
    produced: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    versions: list[int] = field(default_factory=list)
    """Every policy version loaded, in order (the first is the one at start)."""
    skipped: int = 0
    skipped_scored: int = 0
    """Rollouts left out because a --skip-scored dataset already holds their ids."""
    cut: int = 0
    """Rollouts whose completion was cut to fit the teacher's context."""


class Producer:
    """The producer loop; `run()` returns when done (num rollouts, epochs) or when `stop` is set."""

    def __init__(self, s: RolloutSettings, stop: asyncio.Event) -> None:
        if not s.prompts or not s.student:
            raise SettingsError(
                "prompts and student: expected --prompts FILE and --student MODEL, got "
                f"prompts={s.prompts!r} student={s.student!r}"
            )
        if not 0.0 <= s.lmbda <= 1.0:
            raise SettingsError(f"lmbda: expected a probability in [0, 1], got {s.lmbda}")
        if s.batch_size < 1 or s.max_new_tokens < 1:
            raise SettingsError(
                f"batch_size, max_new_tokens: expected >= 1, got {s.batch_size}, {s.max_new_tokens}"
            )
        check_source(s.student, "--student", tokenizer_only=bool(s.student_server))
        self.s, self.stop = s, stop
        self.keys = s.run.keys
        self.summary = ProducerSummary()
        self.rng = random.Random(s.seed)
        self.version = 0
        self.checkpoint: str | None = None
        self.gen: Generator | None = None
        self._batches = 0
        self.retry = RedisRetry(f"rollouts {s.name}", first_s=0.2)
        self.scored: list[Any] = []  # ScoredIndex of each --skip-scored folder
        self.max_tokens: int | None = None
        """Longest rollout the run's teacher accepts (its context less the token it generates), once known."""

    async def run(self) -> ProducerSummary:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per policy load would flood the log
        s = self.s
        self.tokenizer = AutoTokenizer.from_pretrained(s.student)
        items = load_prompts(s.prompts, self.tokenizer)
        log.info(
            "%d prompts from %s (%d with dataset completions)",
            len(items),
            s.prompts,
            sum(i.completion_ids is not None for i in items),
        )
        self.r = connect(s.run.redis_url, cluster=s.run.redis_cluster)
        self.bp = Backpressure(self.r, self.keys.rollouts, s.flow.marks, parts=s.run.parts)
        self.replicas = s.run.replicas(self.r)
        # Producers own no stream entries: several may share a name (e.g. replicas of one deployment).
        heartbeat = Heartbeat(
            self.r, self.keys, s.name, Role.PRODUCER, fields=self._heartbeat_fields, exclusive=False
        )
        hb = asyncio.create_task(heartbeat.run())
        try:
            if not await wait_for_redis(self.r, f"rollouts {s.name}", self.stop):
                return self.summary
            await check_run_config(self.r, self.keys, s.run.fixed(Config.PARTITIONS))
            groups = lambda: ensure_groups(self.r, self.keys, s.run.partitions)  # noqa: E731
            await self.retry.call("create groups", groups, stop=self.stop)
            await self._load_scored()
            await self._fit_context(items, refuse=True)
            teachers = (await read_config(self.r, self.keys)).get(Config.TEACHERS)
            check_teacher_names(items, s.teacher, teachers, s.prompts)  # once the workers recorded them
            await self._follow_policy(force=True)
            await self._loop(items)
        finally:
            hb.cancel()
            await asyncio.gather(hb, return_exceptions=True)
            with contextlib.suppress(RedisUnavailable, StreamGroupMissing):
                await heartbeat.remove()  # a clean exit leaves `gkd status` (and `gkd runs`) at once
            if self.gen is not None:
                await self.gen.close()
            await self.r.aclose()
        return self.summary

    async def _loop(self, items: list[PromptItem]) -> None:
        s = self.s
        epoch = 0
        last_poll = time.monotonic()
        while (s.epochs == 0 or epoch < s.epochs) and not self._done():
            produced = self.summary.produced
            order = list(range(len(items)))
            if s.shuffle:
                self.rng.shuffle(order)
            for start in range(0, len(order), s.batch_size):
                if self._done():
                    return
                if time.monotonic() - last_poll >= s.policy_poll_s:
                    await self._follow_policy()
                    await self._fit_context(items, refuse=False)
                    last_poll = time.monotonic()
                left = s.num_rollouts - self.summary.produced if s.num_rollouts else s.batch_size
                batch = [items[i] for i in order[start : start + min(s.batch_size, left)]]
                rollouts = await self._make(batch, epoch)
                await self._write(rollouts)
            epoch += 1
            if self.scored and self.summary.produced == produced and not self.stop.is_set():
                log.info("every sequence of epoch %d is already scored (--skip-scored): done", epoch - 1)
                return

    async def _load_scored(self) -> None:
        """Index the --skip-scored datasets, refusing one whose teacher or k the run does not use."""
        if not self.s.skip_scored:
            return
        from pipeline.dataset.index import ScoredIndex

        config = await self.retry.call("read config", lambda: read_config(self.r, self.keys), stop=self.stop)
        for folder in self.s.skip_scored:
            index = await asyncio.to_thread(ScoredIndex, folder)
            index.manifest.check_compatible(
                teacher=config.get(Config.TEACHER_MODEL),
                k=int(config[Config.K]) if Config.K in config else None,
                logprob_dtype=None,  # the same ids are the same sequence whatever the dtype
                where=f"run {self.keys.run!r} has",
            )
            if Config.TEACHER_MODEL not in config:
                log.warning(
                    "--skip-scored %s: run %r has no teacher yet; skipping what %s scored with k=%d",
                    folder, self.keys.run, index.manifest.teacher, index.manifest.k,
                )  # fmt: skip
            log.info("--skip-scored %s: %d scored sequences", folder, len(index))
            self.scored.append(index)

    def _already_scored(self, ro: Rollout) -> bool:
        return any(ro.input_ids in index for index in self.scored)

    def _done(self) -> bool:
        s = self.s
        return self.stop.is_set() or bool(s.num_rollouts and self.summary.produced >= s.num_rollouts)

    async def _make(self, batch: list[PromptItem], epoch: int) -> list[Rollout]:
        """Rollouts of one batch: lmbda draws, student generation where drawn (or needed)."""
        draws = [self.rng.random() < self.s.lmbda for _ in batch]  # one draw per prompt, always
        on_policy = [d or item.completion_ids is None for item, d in zip(batch, draws, strict=True)]
        wanted = [item for item, student in zip(batch, on_policy, strict=True) if student]
        generated: dict[int, list[int]] = {}
        if wanted:
            self._batches += 1
            seed = self.s.seed * 1_000_003 + self._batches
            gen = await self._generator()
            outs = await self.retry.call(
                "generate",
                lambda: gen.generate([i.prompt_ids for i in wanted], seed),
                stop=self.stop,
                errors=(RetryableError,),
            )
            generated = {item.index: ids for item, ids in zip(wanted, outs, strict=True)}
        out: list[Rollout] = []
        for item, student in zip(batch, on_policy, strict=True):
            completion = generated[item.index] if student else item.completion_ids
            room = self.max_tokens - len(item.prompt_ids) if self.max_tokens is not None else None
            if room is not None and room < 1:
                self.summary.skipped += 1  # too long for the teacher (said once, when its context came)
                continue
            if completion and room is not None and len(completion) > room:
                completion = completion[:room]  # what the teacher can score; trained like any rollout
                self.summary.cut += 1
            if not completion:
                self.summary.skipped += 1
                log.warning("prompt %d (line %d): empty completion, skipped", item.index, item.line)
                continue
            out.append(
                Rollout(
                    id=f"{self.s.run.name}-{uuid.uuid4().hex}",
                    input_ids=np.asarray(item.prompt_ids + completion, dtype=np.int32),
                    prompt_len=len(item.prompt_ids),
                    policy_version=self.version,
                    source="student" if student else "dataset",
                    created_ms=now_ms(),
                    meta={"prompt_index": item.index, "line": item.line, "epoch": epoch},
                    teacher_name=item.teacher or self.s.teacher,
                )
            )
            if self.scored and self._already_scored(out[-1]):
                out.pop()
                self.summary.skipped_scored += 1
        return out

    async def _write(self, rollouts: list[Rollout]) -> None:
        payloads: list[tuple[str, bytes]] = []
        for ro in rollouts:
            try:
                payloads.append((ro.id, encode_rollout(ro)))
            except WireFormatError as exc:
                self.summary.skipped += 1
                log.warning("prompt %s: rollout not written: %s", ro.meta.get("prompt_index"), exc)
        if not payloads:
            return
        await self.retry.call("wait for room", lambda: self.bp.wait_for_room(self.stop), stop=self.stop)
        if self.stop.is_set():
            return  # stopped while paused: nothing written, nothing lost (prompts are re-read next run)
        part = await self.retry.call("read levels", self.bp.least_filled, stop=self.stop)
        await self._add_once(payloads, self.s.run.parts[part])
        self.summary.produced += len(payloads)
        self.summary.sources.update(ro.source for ro in rollouts)

    async def _add_once(self, payloads: list[tuple[str, bytes]], part: RunKeys) -> None:
        """add_rollouts to partition `part`, retried through outages without writing a batch twice.

        A failed call is ambiguous: Redis may have executed the transaction and lost only the reply.
        The transaction writes a marker with the batch (all or nothing), so before retrying, the
        marker tells whether the batch landed.
        """
        batch_id = uuid.uuid4().hex
        delay = 0.0
        while True:
            try:
                await add_rollouts(self.r, part, payloads, batch_id=batch_id, replicas=self.replicas)
                self.retry.recovered()
                return
            except RedisUnavailable as exc:
                delay = await self.retry.backoff("add rollouts", exc, delay)
            if await self.retry.call("check the last batch", lambda: batch_landed(self.r, part, batch_id)):
                log.warning("batch of %s: written before its reply was lost; not added again", payloads[0][0])
                return

    async def _fit_context(self, items: list[PromptItem], refuse: bool) -> None:
        """Learn the teacher's context from the run config (a worker records it). Prompts that cannot fit
        with one completion token are refused at start (`refuse`), or skipped (said once) later."""
        try:
            raw = (await read_config(self.r, self.keys)).get(Config.TEACHER_MAX_MODEL_LEN)
        except RedisUnavailable:
            return
        if raw is None or not raw.isdigit() or self.max_tokens == int(raw) - 1:
            return
        self.max_tokens = int(raw) - 1  # the teacher generates one token after the rollout
        longest = self.max_tokens - 1
        over = [i for i in items if len(i.prompt_ids) > longest]
        if not over:
            return
        lines = ", ".join(str(i.line) for i in over[:10]) + (", ..." if len(over) > 10 else "")
        what = (
            f"{self.s.prompts}: {len(over)} prompts longer than the run's teacher accepts: expected at most "
            f"{longest} tokens (its context of {self.max_tokens + 1} less a completion token and the one it "
            f"generates), got up to {max(len(i.prompt_ids) for i in over)} (lines {lines})"
        )
        if refuse:
            fix = "shorten or drop those lines, or serve a teacher with a longer context"
            raise PromptFileError(f"{what}; {fix}")
        log.error("%s; they are skipped from now on", what)

    async def _generator(self) -> Generator:
        """The student generator, built on first use from the policy in use (or --student)."""
        if self.gen is None:
            s = self.s
            sampling = Sampling(s.max_new_tokens, s.temperature, s.top_p)
            if s.student_server:
                server = ServerGenerator(
                    s.student_server,
                    s.student,
                    self.tokenizer,
                    sampling,
                    timeout_s=s.request_timeout_s,
                    reload_path=s.student_server_reload,
                )
                ckpt = self.checkpoint
                if ckpt is not None:  # a policy was published before this server was first used
                    await self.retry.call(
                        "load policy", lambda: server.load(ckpt), stop=self.stop, errors=(RetryableError,)
                    )
                self.gen = server
            else:
                path = self.checkpoint or s.student
                self.gen = await asyncio.to_thread(LocalGenerator, path, self.tokenizer, sampling, s.device)
        return self.gen

    async def _follow_policy(self, force: bool = False) -> None:
        """Switch to the latest published policy when its version differs from the one in use."""
        try:
            version, path = await read_policy(self.r, self.keys)
        except RedisUnavailable as exc:
            log.warning("reading the policy failed (%s); keeping version %d", exc, self.version)
            return
        if version == self.version and not force:
            return
        if path is not None and self.gen is not None:
            try:
                await self.gen.load(path)
            except (OSError, ValueError, RetryableError) as exc:
                log.error(
                    "loading policy version %d from %s failed (%s); keeping version %d",
                    version,
                    path,
                    exc,
                    self.version,
                )
                return
        self.checkpoint = path or self.checkpoint
        self.version = version
        self.summary.versions.append(version)
        log.info("policy version %d in use (%s)", version, path or self.s.student)

    def _heartbeat_fields(self) -> dict[str, object]:
        return {
            HB.IN_FLIGHT: 0,
            HB.POLICY_VERSION: self.version,
            HB.PRODUCED: self.summary.produced,
            HB.PAUSED: int(self.bp.paused),
        }


async def produce(s: RolloutSettings, stop: asyncio.Event | None = None) -> ProducerSummary:
    """Run the producer until done or `stop` is set."""
    return await Producer(s, stop or asyncio.Event()).run()
