"""`gkd export`: write the scored samples of a run's `ready` stream into a scored dataset folder.

The exporter is the consumer of `ready` in a score-only run: it reads in the `trainers` group (as the
consumer `--name`), so it refuses to start while trainers of the run are alive (they would split the
samples between them). Why a consumer and not a tap on the workers' handoff: the handoff stays one
Lua call with no second copy of every payload in Redis (a tap doubles ready's memory and needs its own
backpressure), and exactly-once into the files is the trainer's protocol, ack after a durable commit.
Training shares the one scoring pass by replaying the dataset (`gkd replay`), as often as wanted.

Exactly once into the files: samples are acknowledged only after the shard that holds them is
committed (`DatasetWriter.commit`); the manifest names the last shard's entries, so an exporter that
died between the commit and the acknowledgement acknowledges them on restart instead of writing them
again; entries read but not committed stay pending and are written by the restarted exporter (same
`--name`) or, after the lease, by any exporter. Held samples count toward ready's high-water mark, so a
shard is also committed after `--commit-idle-s` without new samples (the workers may be waiting for room).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from pipeline.dataset import manifest as mf
from pipeline.dataset.format import ParquetOptions
from pipeline.dataset.manifest import tokenizer_fingerprint
from pipeline.dataset.redisops import refuse_if_trainers_live, refuse_sampled
from pipeline.dataset.writer import DatasetWriter
from pipeline.errors import RedisUnavailable, SettingsError, StreamGroupMissing
from pipeline.queue import schema as K
from pipeline.queue.connection import RedisRetry, connect
from pipeline.queue.lease import Entry, Held, StreamConsumer
from pipeline.queue.runstate import Counts, Heartbeat, read_config
from pipeline.queue.schema import HB, Config, Role, Stage, Stat
from pipeline.queue.streams import ensure_groups
from pipeline.sections import CommonSettings, FlowSettings
from pipeline.settings import section, setting
from pipeline.wire.codec import ScoredSample, decode_scored

log = logging.getLogger("gkd.export")
_CHUNK = 1000


@dataclass
class ExportSettings(CommonSettings):
    """Settings of `gkd export`."""

    flow: FlowSettings = section(FlowSettings, "lease_ms", "max_deliveries")
    out: str = setting("", "Dataset folder to write (created; an existing one is continued).")
    name: str = setting("export", "Consumer name in the trainers group (keep it to resume a crashed export).")
    tokenizer: str | None = setting(None, "Tokenizer (folder or id) whose fingerprint the manifest records.")
    shard_samples: int = setting(1024, "Commit a shard at this many samples.")
    shard_bytes: int = setting(256 * 2**20, "Commit a shard at this many payload bytes.")
    commit_idle_s: float = setting(2.0, "Commit held samples after this long without new ones.")
    idle_exit_s: float = setting(0.0, "Exit after this long without samples, all committed (0: never).")
    max_samples: int = setting(0, "Exit after exporting this many samples (0: no limit).")
    read_count: int = setting(64, "Entries per read.")
    row_group_samples: int = setting(256, "Samples per Parquet row group.")
    compression_level: int = setting(3, "zstd level of the shards.")
    topk_ids_encoding: str = setting(
        "BYTE_STREAM_SPLIT",
        "Parquet encoding of topk_ids.",
        choices=("BYTE_STREAM_SPLIT", "DELTA_BINARY_PACKED", "PLAIN"),
    )


@dataclass
class ExportSummary:
    samples: int = 0
    shards: int = 0
    dead: int = 0
    settled: int = 0
    """Entries of a shard committed by an earlier process, acknowledged at start."""


class Exporter:
    """One `gkd export` process: `await run(stop)`."""

    def __init__(self, s: ExportSettings) -> None:
        if not s.out:
            raise SettingsError("out: expected a dataset folder (--out DIR), got none")
        if s.shard_samples < 1 or s.read_count < 1 or s.row_group_samples < 1:
            raise SettingsError("shard_samples, read_count, row_group_samples: expected >= 1")
        self.s = s
        self.keys = s.run.keys
        self.summary = ExportSummary()
        self.writer: DatasetWriter | None = None
        self.shard_entries: list[Entry] = []
        """Entries of the shard in progress (hollow), in the order written."""
        self.retry = RedisRetry(f"export {s.name}")
        self.counts = Counts()
        self._stop = asyncio.Event()
        self._last_sample = time.monotonic()
        self._fp = self._fingerprint()

    def _fingerprint(self) -> str | None:
        if not self.s.tokenizer:
            return None
        from transformers import AutoTokenizer

        return tokenizer_fingerprint(AutoTokenizer.from_pretrained(self.s.tokenizer))

    async def run(self, stop: asyncio.Event) -> ExportSummary:
        self._stop, s = stop, self.s
        self.r: aioredis.Redis = connect(s.run.redis_url, cluster=s.run.redis_cluster)
        self.consumer = StreamConsumer(
            self.r, self.keys.ready, s.name, lease_ms=s.flow.lease_ms, max_deliveries=s.flow.max_deliveries
        )
        self.held = Held(self.consumer)
        beat = Heartbeat(
            self.r, self.keys, s.name, Role.EXPORT, fields=self._heartbeat_fields, counts=self.counts
        )
        aux: list[asyncio.Task[Any]] = []
        try:
            await self.retry.call("create groups", lambda: ensure_groups(self.r, self.keys), stop=stop)
            await refuse_if_trainers_live(self.r, self.keys, "gkd export")
            await self._open_known()
            aux = [asyncio.create_task(self.held.renew_forever()), asyncio.create_task(beat.run())]
            await self._own_pending()
            await self._loop()
            await self._commit()
            if self.writer is not None:  # a clean end: the manifest owes no acknowledgement
                await asyncio.to_thread(self.writer.save)
            await self.retry.call("count", lambda: self.counts.flush(self.r, self.keys), attempts=5)
            with contextlib.suppress(RedisUnavailable):
                await beat.remove()
        finally:
            for t in aux:
                t.cancel()
            await asyncio.gather(*aux, return_exceptions=True)
            if self.writer is not None:
                self.writer.close()
            await self.r.aclose()
        return self.summary

    def _heartbeat_fields(self) -> dict[str, object]:
        return {
            HB.IN_FLIGHT: len(self.shard_entries),
            HB.EXPORTED: self.summary.samples,
            HB.DATASET: self.s.out,
        }

    async def _open_known(self) -> None:
        """Open the dataset when its teacher is known (an existing folder, or the run's config), and
        acknowledge what an earlier process committed, before any pending entry is read again."""
        config = await self.retry.call("read config", lambda: read_config(self.r, self.keys), stop=self._stop)
        if config.get(Config.PARTITIONS, "1") != "1":  # its lease and settle work on one ready stream
            raise SettingsError(
                f"gkd export: expected a run of one partition, run {self.keys.run!r} has "
                f"{config[Config.PARTITIONS]} (export a partitioned run through the trainer's sample log)"
            )
        if len(config.get(Config.TEACHERS, "").split(",")) > 1:  # a dataset holds one teacher's scores
            raise SettingsError(
                f"gkd export: expected a run of one teacher, run {self.keys.run!r} has teachers "
                f"{config[Config.TEACHERS]} (a scored dataset records one teacher model)"
            )
        refuse_sampled(config, self.keys, "gkd export")
        if (Path(self.s.out) / mf.MANIFEST).exists():
            m = mf.load(self.s.out)
            w = self._open_writer(m.teacher, m.k, m.logprob_dtype)
            # A run whose config names another teacher would be refused sample by sample: say it now.
            w.manifest.check_compatible(
                teacher=config.get(Config.TEACHER_MODEL),
                k=int(config[Config.K]) if Config.K in config else None,
                logprob_dtype=config.get(Config.LOGPROB_DTYPE),
                where=f"run {self.keys.run!r} has",
            )
            await self._settle(w)
        elif Config.TEACHER_MODEL in config:
            self._open_writer(
                config[Config.TEACHER_MODEL], int(config[Config.K]), config[Config.LOGPROB_DTYPE]
            )

    def _open_writer(self, teacher: str, k: int, dtype: str) -> DatasetWriter:
        s = self.s
        opts = ParquetOptions(
            compression_level=s.compression_level,
            topk_ids_encoding=s.topk_ids_encoding,
            row_group_samples=s.row_group_samples,
        )
        w = DatasetWriter(
            Path(s.out), teacher=teacher, k=k, logprob_dtype=dtype, tokenizer_fingerprint=self._fp,
            source_run=s.run.name, options=opts,
        )  # fmt: skip
        m = w.open()
        self.writer = w
        log.info("export of run %r into %s: teacher %s, k=%d, %s; %d samples in %d shards so far",
                 s.run, s.out, teacher, k, dtype, m.samples, len(m.shards))  # fmt: skip
        return w

    async def _settle(self, w: DatasetWriter) -> None:
        """Acknowledge the entries of the last shard an earlier process committed (idempotent)."""
        ex = w.manifest.export
        if not ex.unacked:
            return
        owner = StreamConsumer(self.r, self.keys.ready, ex.consumer or self.s.name)
        # Their payload sizes are gone with that process: read them back for ready's byte level.
        sids = [sid.encode() for sid in ex.unacked]
        sizes = await self.retry.call("payload sizes", lambda: self._payload_sizes(sids))
        entries = [Entry(sid=sid, id="", data=b"", size=sizes.get(sid, 0)) for sid in sids]
        flags = await self._acknowledge(owner, entries)
        self.summary.settled += sum(flags)
        if sum(flags):
            log.info("acknowledged %d samples of shard %s committed before a restart",
                     sum(flags), w.manifest.shards[-1].file)  # fmt: skip
        w.mark_acknowledged()
        await asyncio.to_thread(w.save)

    async def _payload_sizes(self, sids: list[bytes]) -> dict[bytes, int]:
        async with self.r.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.xrange(self.keys.ready.key, min=sid, max=sid, count=1)
            pages = await pipe.execute()
        return {
            sid: len(page[0][1].get(K.FIELD_DATA.encode(), b""))
            for sid, page in zip(sids, pages, strict=True)
            if page
        }

    async def _own_pending(self) -> None:
        """Entries this consumer name read before a crash and did not commit: written first."""
        after: bytes | None = b"0"
        while after is not None:
            cursor = after
            read = functools.partial(self.consumer.read_own_pending, self._room(), cursor)
            page, after = await self.retry.call("read pending", read, stop=self._stop)
            for e in page:
                await self._take(e)
            # Their idle time counts from the crashed process's last renewal: renew now, so that they
            # are not reclaimed (a delivery counted against them) while they wait in the shard.
            await self.retry.call("renew", self.held.renew, stop=self._stop)
            if self._shard_full():
                await self._commit()

    async def _loop(self) -> None:
        s = self.s
        next_reclaim = 0.0
        while not self._stop.is_set():
            if s.max_samples and self.summary.samples + len(self.shard_entries) >= s.max_samples:
                break
            want = self._room()
            try:
                if time.monotonic() >= next_reclaim:
                    ok, over = await self.consumer.reclaim(want)
                    # XAUTOCLAIM also returns our own entries whose renewal has not come round yet
                    # (read again from our pending list after a restart): they are in the shard already.
                    ok = [e for e in ok if e.ref not in self.held]
                    over = [e for e in over if e.ref not in self.held]
                    for e in over:
                        await self._dead(e, f"delivered {e.deliveries} times; consumers kept dying on it")
                    for e in ok:
                        await self._take(e)
                    next_reclaim = time.monotonic() + max(s.flow.lease_ms / 2000, 0.05)
                    want -= len(ok) + len(over)
                if want > 0:
                    for e in await self.consumer.read(want, block_ms=250):
                        await self._take(e)
                self.retry.recovered()
            except RedisUnavailable as exc:
                await self.retry.backoff("read ready", exc, 0.5, self._stop)
                continue
            except StreamGroupMissing:
                log.warning("the trainers group is gone (Redis lost its data?); recreating it")
                await self.retry.call(
                    "create groups", lambda: ensure_groups(self.r, self.keys), stop=self._stop
                )
                continue
            idle_s = time.monotonic() - self._last_sample
            if self._shard_full() or (self.shard_entries and idle_s >= s.commit_idle_s):
                await self._commit()
            if s.idle_exit_s > 0 and not self.shard_entries and idle_s >= s.idle_exit_s:
                log.info("no samples for %.1fs: exiting", idle_s)
                break

    def _room(self) -> int:
        """Entries to read now: a read batch, cut so that a shard ends at --shard-samples and the export
        at --max-samples exactly."""
        s, want = self.s, self.s.read_count
        if s.max_samples:
            want = min(want, s.max_samples - self.summary.samples - len(self.shard_entries))
        if self.writer is not None:
            want = min(want, s.shard_samples - self.writer.pending_samples)
        return max(want, 1)

    def _shard_full(self) -> bool:
        w = self.writer
        return w is not None and (
            w.pending_samples >= self.s.shard_samples or w.pending_payload_bytes >= self.s.shard_bytes
        )

    async def _take(self, e: Entry) -> None:
        """Decode and check one entry; add it to the shard in progress or dead-letter it."""
        try:
            sample = decode_scored(e.data)
        except Exception as exc:
            await self._dead(e, f"{type(exc).__name__}: {exc}")
            return
        if sample.sampled:  # never written as a top-k (the run's config refuses this at start already)
            await self._dead(
                e, "a sampled teacher's draws (ScoredSample v2): a scored dataset holds top-k rows"
            )
            return
        w = self.writer
        if w is None:
            dtype = "float16" if sample.topk_logprobs.dtype.itemsize == 2 else "float32"
            w = self._open_writer(sample.teacher, sample.k, dtype)
        reason = _mismatch(sample, w)
        if reason:
            await self._dead(e, reason)
            return
        w.add(sample, e.size)
        hollow = e.hollow()
        self.shard_entries.append(hollow)
        self.held.add([hollow])
        self._last_sample = time.monotonic()

    async def _acknowledge(self, consumer: StreamConsumer, entries: list[Entry]) -> list[bool]:
        return await self.retry.call("acknowledge", lambda: consumer.ack(entries))

    async def _dead(self, e: Entry, reason: str) -> None:
        if await self.retry.call("dead-letter", lambda: self.consumer.dead_letter(e, Stage.EXPORT, reason)):
            self.summary.dead += 1
            log.warning("sample %s -> dead: %s", e.id, reason)

    async def _commit(self) -> None:
        """Commit the shard in progress, then acknowledge its entries (waiting out Redis outages: a
        committed shard must not be written again)."""
        w, entries = self.writer, self.shard_entries
        if w is None or not entries:
            return
        shard = await asyncio.to_thread(w.commit, [e.sid.decode() for e in entries], self.consumer.consumer)
        flags = await self._acknowledge(self.consumer, entries)
        self.shard_entries = []
        self.held.drop(entries)
        lost = [e.id for e, ok in zip(entries, flags, strict=True) if not ok]
        if lost:  # another consumer took them over (this exporter stalled past its lease)
            log.error("%d exported samples were no longer ours at the ack: %s", len(lost), lost[:5])
        w.mark_acknowledged()
        self.summary.samples += len(entries)
        self.summary.shards += 1
        self.counts.add(Stat.EXPORTED, len(entries))
        m = w.manifest
        if shard is not None:
            log.info("shard %s: %d samples, %.1f MB (%.1f B/scored token); dataset: %d samples, %d shards",
                     shard.file, shard.samples, shard.bytes / 1e6, shard.bytes / max(shard.scored_tokens, 1),
                     m.samples, len(m.shards))  # fmt: skip


def _mismatch(sample: ScoredSample, w: DatasetWriter) -> str:
    m = w.manifest
    dtype = "float16" if sample.topk_logprobs.dtype.itemsize == 2 else "float32"
    if (sample.teacher, sample.k, dtype) != (m.teacher, m.k, m.logprob_dtype):
        return (
            f"sample scored by {sample.teacher!r} with k={sample.k} ({dtype}); the dataset holds "
            f"{m.teacher!r}, k={m.k} ({m.logprob_dtype})"
        )
    return ""
