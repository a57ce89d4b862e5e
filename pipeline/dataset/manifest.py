"""The manifest of a scored dataset (`manifest.json`): what the shards hold and how to check them.

The manifest is the commit record of the folder: a shard exists for readers only once the manifest
lists it, and the manifest is replaced atomically (written aside, fsynced, renamed, folder fsynced), so
a crash at any moment leaves either the old or the new manifest, never a torn one. Files in the folder
that it does not list are leftovers of a crash and are removed by the next writer.

Fields: `format`, `version`, `dataset_id` (random, fixed at creation), `teacher`, `k`, `logprob_dtype`,
`tokenizer_fingerprint` (or null), `source_run`, `created_ms`, `updated_ms`, `parquet` (the encoding
options), totals `samples`, `tokens` (input ids), `scored_tokens` (rows), `bytes` (shard files), `shards`
(each `file`, `samples`, `tokens`, `scored_tokens`, `bytes`, `sha256`), and `export` (the exporter's
consumer name and the stream entry ids of the last committed shard, acknowledged after the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.dataset.format import FORMAT, FORMAT_VERSION, LOGPROB_DTYPES
from pipeline.errors import DatasetError
from pipeline.queue.schema import Config
from pipeline.sections import TOPK

MANIFEST = "manifest.json"


@dataclass
class ShardInfo:
    """One committed shard."""

    file: str
    samples: int
    tokens: int
    scored_tokens: int
    bytes: int
    sha256: str


@dataclass
class ExportState:
    """What an interrupted export must finish: acknowledge the entries of the last committed shard."""

    consumer: str = ""
    """Consumer name of the exporter in the `trainers` group of the source run."""
    unacked: list[str] = field(default_factory=list)
    """Stream entry ids of the last committed shard (already in the files; acknowledged after)."""


@dataclass
class Manifest:
    teacher: str
    k: int
    logprob_dtype: str
    tokenizer_fingerprint: str | None = None
    source_run: str = ""
    dataset_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    format: str = FORMAT
    version: int = FORMAT_VERSION
    created_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    updated_ms: int = 0
    parquet: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0
    scored_tokens: int = 0
    bytes: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    export: ExportState = field(default_factory=ExportState)

    def add(self, shard: ShardInfo) -> None:
        self.shards.append(shard)
        self.samples += shard.samples
        self.tokens += shard.tokens
        self.scored_tokens += shard.scored_tokens
        self.bytes += shard.bytes

    def identity(self) -> dict[str, object]:
        """The settings a run must share with this dataset (run-config spelling): a dataset holds top-k rows
        (a sampled run's draws cannot be exported), so its run's teacher mode is `topk`."""
        return {
            Config.K: self.k,
            Config.TEACHER_MODE: TOPK,
            Config.TEACHER_MODEL: self.teacher,
            Config.LOGPROB_DTYPE: self.logprob_dtype,
        }

    def check_compatible(
        self, *, teacher: str | None, k: int | None, logprob_dtype: str | None, where: str = "expected"
    ) -> None:
        """Raise DatasetError naming each setting that differs (None: not known, not checked); `where`
        names the other side (e.g. "run 'demo' has")."""
        diffs = [
            f"{name}: dataset has {ours!r}, {where} {theirs!r}"
            for name, ours, theirs in (
                ("teacher", self.teacher, teacher),
                ("k", self.k, k),
                ("logprob dtype", self.logprob_dtype, logprob_dtype),
            )
            if theirs is not None and ours != theirs
        ]
        if diffs:
            raise DatasetError(
                f"scored dataset {self.dataset_id[:8]} ({self.teacher}, k={self.k}, {self.logprob_dtype}) "
                f"does not fit: {'; '.join(diffs)}"
            )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save(folder: Path, m: Manifest) -> None:
    m.updated_ms = int(time.time() * 1000)
    write_atomic(folder / MANIFEST, (json.dumps(asdict(m), indent=1) + "\n").encode())


def load(folder: str | Path) -> Manifest:
    """The manifest of a dataset folder. Raises DatasetError if there is none or it is not ours."""
    path = Path(folder) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(
            f"{folder}: expected a scored dataset (a {MANIFEST} written by gkd export), found none"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: expected a readable JSON manifest, got {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DatasetError(f"{path}: expected format {FORMAT!r}, got {raw.get('format')!r}")
    if raw.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: expected format version {FORMAT_VERSION}, got {raw.get('version')!r}; "
            "use the gkd-pipeline version that wrote it"
        )
    try:
        shards = [ShardInfo(**s) for s in raw.pop("shards")]
        export = ExportState(**raw.pop("export"))
        m = Manifest(**raw, shards=shards, export=export)
    except (KeyError, TypeError) as exc:
        raise DatasetError(
            f"{path}: expected the fields of a v{FORMAT_VERSION} manifest, got {exc}"
        ) from None
    if m.logprob_dtype not in LOGPROB_DTYPES or m.k < 1:
        raise DatasetError(f"{path}: bad k {m.k!r} or logprob_dtype {m.logprob_dtype!r}")
    return m


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id) and special tokens: equal fingerprints mean the
    same ids stand for the same strings."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
