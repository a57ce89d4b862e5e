"""`DatasetWriter`: appends ScoredSamples to a scored dataset folder, one committed shard at a time.

A shard is written as ``part-NNNNN.parquet.tmp`` (row group by row group, so memory holds one row group),
closed, fsynced and renamed to ``part-NNNNN.parquet``; then the manifest that lists it replaces the old
one atomically. That rename of the manifest is the commit: a crash before it leaves files the manifest
does not list, which the next writer removes (their samples are still unacknowledged in Redis and get
written again); a crash after it leaves a complete shard whose stream entries the manifest names, so
the next exporter acknowledges them instead of writing them twice. One writer per folder (a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.dataset import manifest as mf
from pipeline.dataset.format import (
    LOGPROB_DTYPES,
    ParquetOptions,
    arrow_schema,
    parquet_write_kwargs,
    require_pyarrow,
    samples_to_table,
)
from pipeline.dataset.manifest import ExportState, Manifest, ShardInfo
from pipeline.errors import DatasetError
from pipeline.wire.codec import ScoredSample

log = logging.getLogger("gkd.dataset")
LOCK = ".lock"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class DatasetWriter:
    """Writes shards into `folder`; `open()` first, `close()` at the end (or use as a context manager)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        teacher: str,
        k: int,
        logprob_dtype: str,
        tokenizer_fingerprint: str | None = None,
        source_run: str = "",
        options: ParquetOptions | None = None,
    ) -> None:
        if logprob_dtype not in LOGPROB_DTYPES:
            raise DatasetError(f"logprob_dtype: expected float16 or float32, got {logprob_dtype!r}")
        self.folder = Path(folder)
        self.opts = options or ParquetOptions()
        self._want = Manifest(
            teacher=teacher,
            k=k,
            logprob_dtype=logprob_dtype,
            tokenizer_fingerprint=tokenizer_fingerprint,
            source_run=source_run,
            parquet=self.opts.as_dict(),
        )
        self.manifest: Manifest = self._want
        self._lock_fd: int | None = None
        self._rows: list[ScoredSample] = []
        self._writer: Any = None
        self._tmp: Path | None = None
        self._shard = ShardInfo(file="", samples=0, tokens=0, scored_tokens=0, bytes=0, sha256="")
        self.pending_payload_bytes = 0
        """Approximate bytes of the samples added since the last commit (their wire size)."""

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> Manifest:
        """Lock the folder, load (and check) or create its manifest, remove crash leftovers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatasetError(
                f"{self.folder}: another process is writing this dataset (lock held)"
            ) from None
        self._lock_fd = fd
        try:
            self._load_or_create()
        except BaseException:
            self.close()
            raise
        self._remove_leftovers()
        return self.manifest

    def _load_or_create(self) -> None:
        if (self.folder / mf.MANIFEST).exists():
            m = mf.load(self.folder)
            w = self._want
            m.check_compatible(teacher=w.teacher, k=w.k, logprob_dtype=w.logprob_dtype)
            fp = w.tokenizer_fingerprint
            if fp and m.tokenizer_fingerprint and fp != m.tokenizer_fingerprint:
                raise DatasetError(
                    f"{self.folder}: tokenizer fingerprint differs: dataset has {m.tokenizer_fingerprint}, "
                    f"this export has {fp}"
                )
            m.tokenizer_fingerprint = m.tokenizer_fingerprint or fp
            self.manifest = m
        else:
            mf.save(self.folder, self.manifest)

    def _remove_leftovers(self) -> None:
        listed = {s.file for s in self.manifest.shards}
        for path in self.folder.iterdir():
            name = path.name
            is_shard = name.startswith("part-") and (name.endswith(".parquet") or name.endswith(".tmp"))
            if (is_shard and name not in listed) or name == mf.MANIFEST + ".tmp":
                log.warning(
                    "%s: removing %s, left by an interrupted export (not committed)", self.folder, name
                )
                path.unlink()

    def close(self) -> None:
        """Drop an uncommitted shard (its samples stay unacknowledged) and release the lock."""
        self._abort()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> DatasetWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    @property
    def pending_samples(self) -> int:
        """Samples added since the last commit."""
        return self._shard.samples + len(self._rows)

    def add(self, sample: ScoredSample, payload_bytes: int = 0) -> None:
        """Buffer one sample of this dataset's k and dtype (the caller checked the teacher)."""
        self._rows.append(sample)
        self.pending_payload_bytes += payload_bytes
        if len(self._rows) >= self.opts.row_group_samples:
            self._flush_rows()

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        _, pq = require_pyarrow()
        m = self.manifest
        table = samples_to_table(self._rows, m.k, m.logprob_dtype)
        if self._writer is None:
            self._tmp = self.folder / (shard_name(len(m.shards)) + ".tmp")
            self._writer = pq.ParquetWriter(
                str(self._tmp), arrow_schema(m.k, m.logprob_dtype), **parquet_write_kwargs(self.opts)
            )
        self._writer.write_table(table, row_group_size=len(self._rows))
        sh = self._shard
        sh.samples += len(self._rows)
        sh.tokens += sum(s.rollout.num_tokens for s in self._rows)
        sh.scored_tokens += sum(int(s.topk_ids.shape[0]) for s in self._rows)
        self._rows = []

    def commit(self, unacked: list[str], consumer: str = "") -> ShardInfo | None:
        """Make the samples added since the last commit a shard, durably; None if there are none.

        `unacked` (stream entry ids of those samples) goes into the manifest, so that an exporter that
        crashes before acknowledging them acknowledges them on restart instead of writing them again.
        """
        self._flush_rows()
        if self._writer is None or self._tmp is None:
            return None
        self._writer.close()
        self._writer = None
        tmp, self._tmp = self._tmp, None
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        shard, self._shard = self._shard, ShardInfo("", 0, 0, 0, 0, "")
        shard.file = final.name
        shard.bytes = tmp.stat().st_size
        shard.sha256 = mf.sha256_file(tmp)
        os.replace(tmp, final)
        mf.fsync_dir(self.folder)
        self.manifest.add(shard)
        self.manifest.export = ExportState(consumer=consumer, unacked=list(unacked))
        mf.save(self.folder, self.manifest)
        self.pending_payload_bytes = 0
        return shard

    def mark_acknowledged(self) -> None:
        """Forget the last shard's entry ids (they were acknowledged); written with the next save."""
        self.manifest.export.unacked = []

    def save(self) -> None:
        mf.save(self.folder, self.manifest)

    def _abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
            self._tmp = None
        self._rows = []
        self._shard = ShardInfo("", 0, 0, 0, 0, "")
        self.pending_payload_bytes = 0
