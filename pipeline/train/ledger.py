"""The trainer's bookkeeping around the training loop: held ready entries, logs and metrics.

`ReadyLedger` owns this rank's entries of the `ready` stream from the read to the acknowledgement:
renews their lease while they are held, remembers which ones are trained but not yet covered by a
checkpoint, acknowledges them after it, and batches the trainer's stats counters. `Ledger` is the
optional per-step sample log (``--sample-log``); `MetricsSink` writes metrics.jsonl, the console log and
TensorBoard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis

from pipeline.errors import SettingsError
from pipeline.queue.runstate import heartbeat, incr_stats, publish_policy
from pipeline.queue.schema import RunKeys, Stat
from pipeline.queue.streams import Entry, StreamConsumer, ensure_groups
from pipeline.train.prefetch import REDIS_ERRORS, IOLoop
from pipeline.train.step import StepStats

log = logging.getLogger("gkd.train")
_CHUNK = 1000  # entries per Lua call (ack, renew)


class PayloadSize:
    """Stands in for a trained entry's payload: acknowledging needs only its length (bytes-out counter).

    Holding the payloads of every sample trained since the last checkpoint would cost as much memory as
    the samples themselves.
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def hollow(e: Entry) -> Entry:
    """`e` without its payload (same sid, id, deliveries, payload length)."""
    return Entry(sid=e.sid, id=e.id, data=cast(bytes, PayloadSize(len(e.data))), deliveries=e.deliveries)


class ReadyLedger:
    """This rank's entries of the `ready` stream, read and not yet acknowledged."""

    def __init__(self, io: IOLoop, r: aioredis.Redis, keys: RunKeys, consumer: str, lease_ms: int) -> None:
        self.io, self.r, self.keys = io, r, keys
        self.consumer = StreamConsumer(r, keys, "ready", consumer, lease_ms=lease_ms)
        io.run(ensure_groups(r, keys))
        self.held: dict[bytes, Entry] = {}
        self.lock = threading.Lock()
        self.unacked: list[Entry] = []
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._tasks: list[Any] = []

    # -------------------------------------------------------------- called from the training thread

    def trained(self, entries: Sequence[Entry]) -> None:
        """These entries' samples are in the current update: drop payloads, wait for a checkpoint."""
        hollowed = [hollow(e) for e in entries]
        with self.lock:
            for h in hollowed:
                self.held[h.sid] = h
        self.unacked += hollowed

    def listing(self) -> list[tuple[str, int]]:
        """(entry id, payload bytes) of the trained, unacknowledged entries (for the checkpoint)."""
        return [(e.sid.decode(), len(e.data)) for e in self.unacked]

    def ack_trained(self, attempts: int = 6) -> None:
        """Acknowledge the trained entries. If Redis stays down they are kept (and listed again by the
        next checkpoint, which includes them too)."""
        todo = list(self.unacked)
        if not todo:
            return
        delay = 0.5
        for attempt in range(attempts):
            try:
                flags = self.io.run(self._ack(self.consumer, todo))
                break
            except REDIS_ERRORS as exc:
                if attempt == attempts - 1:
                    log.error(
                        "acknowledging %d samples failed (%r); keeping them for the next checkpoint",
                        len(todo),
                        exc,
                    )
                    return
                time.sleep(delay)
                delay *= 2
        lost = [e.id for e, ok in zip(todo, flags, strict=True) if not ok]
        if lost:
            log.error(
                "%d trained samples were no longer owned by %s at the ack (lease lost): %s",
                len(lost),
                self.consumer.consumer,
                lost[:5],
            )
        with self.lock:
            for e in todo:
                self.held.pop(e.sid, None)
        self.unacked = self.unacked[len(todo) :]

    def settle_listed(self, listed: Mapping[str, Sequence[tuple[str, int]]], rank: int, world: int) -> int:
        """On resume: acknowledge the entries a checkpoint includes. Each rank settles its own; rank 0
        also those of consumers whose rank no longer exists (a smaller world). Returns how many."""
        done = 0
        for name, entries in listed.items():
            idx = name.rsplit("-", 1)[-1]
            theirs = idx.isdigit() and int(idx) >= world and rank == 0
            if name != self.consumer.consumer and not theirs:
                continue
            consumer = StreamConsumer(self.r, self.keys, "ready", name)
            es = [Entry(sid=sid.encode(), id="", data=cast(bytes, PayloadSize(n))) for sid, n in entries]
            flags = self.io.run(self._ack(consumer, es))
            done += sum(flags)
        return done

    def count_step(self, *, samples: int, tokens: int, wait_ms: int, step_ms: int, steps: int) -> None:
        """Add to the run's counters (sent in the background; kept and resent if Redis is down)."""
        with self._counts_lock:
            self._counts.update(
                {
                    Stat.TRAINED_SAMPLES: samples,
                    Stat.TRAINED_TOKENS: tokens,
                    Stat.DATA_WAIT_MS: wait_ms,
                    Stat.STEP_MS: step_ms,
                    Stat.TRAINER_STEPS: steps,
                }
            )
        self.io.submit(self._flush_counts())

    def publish(self, version: int, path: str) -> None:
        try:
            self.io.run(publish_policy(self.r, self.keys, version, path), timeout_s=30)
        except REDIS_ERRORS as exc:
            log.error(
                "publishing policy version %d failed (%r); the next checkpoint publishes again", version, exc
            )

    def start_background(self, role_extra: Callable[[], dict[str, object]]) -> None:
        self._tasks = [self.io.submit(self._renew_loop()), self.io.submit(self._heartbeat_loop(role_extra))]

    def close(self) -> None:
        for t in self._tasks:
            self.io.loop.call_soon_threadsafe(t.cancel)
        try:
            self.io.run(self._flush_counts(), timeout_s=10)
        except Exception as exc:  # best effort at exit
            log.warning("final stats flush failed: %r", exc)

    # -------------------------------------------------------------- io-loop side

    async def skip_stale(self, entries: list[Entry]) -> None:
        await self.consumer.ack(entries)
        await incr_stats(self.r, self.keys, {Stat.STALE_SKIPPED: len(entries)})
        log.info("skipped %d stale samples", len(entries))

    @staticmethod
    async def _ack(consumer: StreamConsumer, entries: list[Entry]) -> list[bool]:
        flags: list[bool] = []
        for i in range(0, len(entries), _CHUNK):
            flags += await consumer.ack(entries[i : i + _CHUNK])
        return flags

    async def _flush_counts(self) -> None:
        with self._counts_lock:
            counts, self._counts = self._counts, Counter()
        try:
            await incr_stats(self.r, self.keys, counts)
        except REDIS_ERRORS:
            with self._counts_lock:
                self._counts.update(counts)

    async def _renew_loop(self) -> None:
        period_s = max(self.consumer.lease_ms / 3000, 0.05)
        while True:
            await asyncio.sleep(period_s)
            with self.lock:
                entries = list(self.held.values())
            try:
                for i in range(0, len(entries), _CHUNK):
                    chunk = entries[i : i + _CHUNK]
                    flags = await self.consumer.renew(chunk)
                    lost = [e.id for e, ok in zip(chunk, flags, strict=True) if not ok]
                    if lost:
                        log.warning(
                            "lease lost on %d held samples (acknowledged or taken): %s", len(lost), lost[:5]
                        )
            except REDIS_ERRORS as exc:
                log.warning("lease renewal failed (%r); retrying", exc)

    async def _heartbeat_loop(self, extra: Callable[[], dict[str, object]]) -> None:
        while True:
            try:
                await heartbeat(
                    self.r,
                    self.keys,
                    self.consumer.consumer,
                    role="trainer",
                    in_flight=len(self.held),
                    ttl_ms=15_000,
                    extra=extra(),
                )
            except REDIS_ERRORS as exc:
                log.debug("heartbeat failed: %r", exc)
            await asyncio.sleep(5.0)


class Ledger:
    """``--sample-log``: one JSON line per optimizer step and rank, {"step", "rank", "ids"}.

    Lines are appended with one write each (O_APPEND), so ranks may share the file and a kill -9 never
    leaves a torn line behind a complete one.
    """

    def __init__(self, path: str, rank: int) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, step: int, ids: list[str]) -> None:
        os.write(self.fd, (json.dumps({"step": step, "rank": self.rank, "ids": ids}) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


class MetricsSink:
    """Rank 0's per-step metrics: metrics.jsonl in the output folder, the log, TensorBoard."""

    def __init__(self, output_dir: Path, tb_writer: Any = None) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.fh = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 -- open for the whole run
        self.tb = tb_writer

    @staticmethod
    def tensorboard_writer(log_dir: str | None, create: bool = True) -> Any:
        """A SummaryWriter for `log_dir` (None without one). Raises SettingsError without `tensorboard`."""
        if not log_dir:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SettingsError(
                f"tensorboard_dir: writing TensorBoard logs to {log_dir!r} needs the `tensorboard` package; "
                "install it (pip install tensorboard) or drop --tensorboard-dir"
            ) from None
        return SummaryWriter(log_dir) if create else None

    @staticmethod
    def step_metrics(
        step: int,
        g: StepStats,
        g_tokens: float,
        step_s: float,
        g_wait_s: float,
        g_step_s: float,
        world: int,
        lr: float,
    ) -> dict[str, float]:
        """Global means of one step from the sums over ranks."""
        rows = max(g.rows, 1.0)
        return {
            "step": step,
            "loss": g.loss_sum / rows,
            "kl": g.kl_sum / g.kl_rows if g.kl_rows else float("nan"),
            "teacher_mass": g.teacher_mass_sum / rows,
            "student_mass": g.student_mass_sum / rows,
            "top1_in_topk": g.top1_sum / rows,
            "grad_norm": g.grad_norm / world,
            "lr": lr,
            "tokens": g_tokens,
            "loss_tokens": g.rows,
            "tokens_per_s": g_tokens / step_s if step_s > 0 else 0.0,
            "step_s": step_s,
            "data_wait_s": g_wait_s / world,
            "data_wait_frac": g_wait_s / g_step_s if g_step_s > 0 else 0.0,
        }

    def write(self, m: dict[str, float]) -> None:
        self.fh.write(json.dumps(m) + "\n")
        self.fh.flush()
        log.info(
            "step %d loss %.4f kl %.4f teacher_mass %.3f tok/s %.0f data_wait %.1f%% lr %.2e",
            m["step"],
            m["loss"],
            m["kl"],
            m["teacher_mass"],
            m["tokens_per_s"],
            100 * m["data_wait_frac"],
            m["lr"],
        )
        if self.tb is not None:
            for name, value in m.items():
                if name != "step":
                    self.tb.add_scalar(f"train/{name}", value, int(m["step"]))

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()
