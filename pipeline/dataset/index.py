"""Content-hash index of a scored dataset: which exact token sequences it has scored, and where.

Built from the `content_hash` column alone (16 bytes per sample, no payload read). Kept as sorted numpy
arrays (about 28 bytes per sample), so an index of millions of samples stays small. Used by
`gkd rollouts --skip-scored` (leave out sequences already scored) and by the cache that scores
rollouts from a dataset (`ScoredCache`): rows of the stored sample answer a rollout with the same ids,
teacher and k, whatever its id, from its prompt_len on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.dataset.format import HASH_BYTES, content_hash, require_pyarrow
from pipeline.dataset.reader import DatasetReader
from pipeline.errors import DatasetError
from pipeline.wire.codec import Rollout, ScoredSample


class ScoredIndex:
    """content hash -> (shard, row) of one dataset folder."""

    def __init__(self, folder: str | Path) -> None:
        _, pq = require_pyarrow()
        self.reader = DatasetReader(folder)
        self.manifest = self.reader.manifest
        hashes, shards, rows = [], [], []
        for i, info in enumerate(self.manifest.shards):
            path = Path(folder) / info.file
            col = pq.read_table(path, columns=["content_hash"]).column("content_hash").combine_chunks()
            if len(col) != info.samples:
                raise DatasetError(f"{path}: expected {info.samples} rows (manifest), got {len(col)}")
            # fixed_size_binary(16) values are contiguous: buffer 1 holds them all.
            raw = np.frombuffer(col.buffers()[1], dtype=np.uint8)[
                col.offset * HASH_BYTES : (col.offset + len(col)) * HASH_BYTES
            ]
            hashes.append(raw.reshape(-1, HASH_BYTES))
            shards.append(np.full(len(col), i, dtype=np.int32))
            rows.append(np.arange(len(col), dtype=np.int32))
        all_h = np.concatenate(hashes) if hashes else np.empty((0, HASH_BYTES), np.uint8)
        key = all_h[:, :8].copy().view("<u8").reshape(-1)
        order = np.argsort(key, kind="stable")
        self._key = key[order]
        self._hash = all_h[order]
        self._shard = (np.concatenate(shards) if shards else np.empty(0, np.int32))[order]
        self._row = (np.concatenate(rows) if rows else np.empty(0, np.int32))[order]

    def __len__(self) -> int:
        return int(self._key.shape[0])

    def locate(self, digest: bytes) -> tuple[int, int] | None:
        """(shard, row) of a sample with this content hash, or None."""
        key = int(np.frombuffer(digest[:8], dtype="<u8")[0])
        i = int(np.searchsorted(self._key, key))
        want = np.frombuffer(digest, dtype=np.uint8)
        while i < len(self._key) and int(self._key[i]) == key:
            if np.array_equal(self._hash[i], want):
                return int(self._shard[i]), int(self._row[i])
            i += 1
        return None

    def hash_of(self, input_ids: np.ndarray) -> bytes:
        """The content hash of these ids under this dataset's teacher and k."""
        return content_hash(input_ids, self.manifest.teacher, self.manifest.k)

    def __contains__(self, input_ids: object) -> bool:
        return self.locate(self.hash_of(np.asarray(input_ids))) is not None


class ScoredCache:
    """Scores rollouts from a dataset: a rollout whose exact ids were scored there gets those rows."""

    def __init__(self, index: ScoredIndex) -> None:
        self.index = index
        self.hits = 0
        self.misses = 0

    def score(self, rollout: Rollout) -> ScoredSample | None:
        """The rollout (its own id, version, source, meta) with the stored teacher rows from its
        prompt_len on; None when the dataset does not have its ids or scored fewer of its tokens."""
        where = self.index.locate(self.index.hash_of(rollout.input_ids))
        if where is None:
            self.misses += 1
            return None
        stored = self.index.reader.sample_at(*where)
        skip = rollout.prompt_len - stored.rollout.prompt_len
        if skip < 0:  # the dataset did not score the rollout's first loss tokens
            self.misses += 1
            return None
        self.hits += 1
        m = self.index.manifest
        return ScoredSample(
            rollout=rollout,
            topk_ids=stored.topk_ids[skip:],
            topk_logprobs=stored.topk_logprobs[skip:],
            teacher=m.teacher,
            k=m.k,
            scored_ms=stored.scored_ms,
        )
