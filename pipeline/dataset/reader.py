"""`DatasetReader`: the samples of a scored dataset, shard by shard, in a reproducible epoch order.

A shard is read whole (its compressed bytes), checked against the manifest's sha256, then decoded row
group by row group; with shuffle the whole shard is decoded. An epoch's order is a function of
(seed, epoch, number of shards) only, so a replay that resumes after a crash finds the same order:
shuffle permutes the shards and the samples within each shard (memory: one decoded shard).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dataset import manifest as mf
from pipeline.dataset.format import RowBatch, require_pyarrow
from pipeline.dataset.manifest import Manifest
from pipeline.errors import DatasetError
from pipeline.wire.codec import ScoredSample

log = logging.getLogger("gkd.dataset")


@dataclass(frozen=True)
class Position:
    """Where a sample sits in an epoch's order."""

    index: int
    """0-based position in the epoch."""
    shard: int
    row: int


def epoch_order(shard_sizes: list[int], shuffle: bool, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """[(shard index, row order within it)] of one epoch over these shards."""
    if not shuffle:
        return [(i, np.arange(n)) for i, n in enumerate(shard_sizes)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shard_sizes))
    return [(int(i), rng.permutation(shard_sizes[int(i)])) for i in order]


class DatasetReader:
    """Reads the shards the manifest lists (a snapshot taken at construction)."""

    def __init__(self, folder: str | Path, *, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest: Manifest = mf.load(self.folder)
        self.verify = verify
        self._cache: OrderedDict[tuple[int, int], RowBatch] = OrderedDict()
        self._files: dict[int, Any] = {}

    @property
    def shard_sizes(self) -> list[int]:
        return [s.samples for s in self.manifest.shards]

    def _open(self, shard: int) -> Any:
        """The shard as a pyarrow ParquetFile over its verified bytes."""
        pa, pq = require_pyarrow()
        info = self.manifest.shards[shard]
        path = self.folder / info.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DatasetError(
                f"{path}: expected shard {shard} of the manifest, cannot read it: {exc}"
            ) from None
        if self.verify:
            import hashlib

            digest = hashlib.sha256(data).hexdigest()
            if digest != info.sha256:
                raise DatasetError(
                    f"{path}: sha256 {digest[:16]}... differs from the manifest's {info.sha256[:16]}...; "
                    "the file was changed or damaged after it was written"
                )
        return pq.ParquetFile(pa.BufferReader(data))

    def row_groups(self, shard: int) -> Iterator[RowBatch]:
        """The row groups of a shard, decoded one at a time."""
        f = self._open(shard)
        for g in range(f.metadata.num_row_groups):
            yield RowBatch(f.read_row_group(g))

    def whole(self, shard: int) -> RowBatch:
        return RowBatch(self._open(shard).read())

    def epoch(
        self, *, shuffle: bool, seed: int, epoch: int, n_shards: int | None = None, start: int = 0
    ) -> Iterator[tuple[Position, ScoredSample]]:
        """The samples of one epoch over the first `n_shards` shards, from position `start` on."""
        sizes = self.shard_sizes[: len(self.manifest.shards) if n_shards is None else n_shards]
        if len(sizes) < (n_shards or 0):
            raise DatasetError(
                f"{self.folder}: expected at least {n_shards} shards (the replay in progress started with "
                f"them), the manifest lists {len(sizes)}"
            )
        pos = 0
        for shard, rows in epoch_order(sizes, shuffle, seed, epoch):
            if pos + len(rows) <= start:
                pos += len(rows)
                continue
            if shuffle:
                batch = self.whole(shard)
                for row in rows:
                    if pos >= start:
                        yield Position(pos, shard, int(row)), batch.sample(int(row))
                    pos += 1
                continue
            row = 0
            for batch in self.row_groups(shard):
                for i in range(batch.n):
                    if pos >= start:
                        yield Position(pos, shard, row), batch.sample(i)
                    pos += 1
                    row += 1

    def sample_at(self, shard: int, row: int) -> ScoredSample:
        """One sample by (shard, row); keeps the last few decoded row groups (cache lookups)."""
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = self._open(shard)
        md = f.metadata
        g, first = 0, 0
        while g < md.num_row_groups and first + md.row_group(g).num_rows <= row:
            first += md.row_group(g).num_rows
            g += 1
        if g == md.num_row_groups:
            raise DatasetError(f"shard {shard}: row {row} beyond its {first} rows")
        batch = self._cache.get((shard, g))
        if batch is None:
            batch = self._cache[(shard, g)] = RowBatch(f.read_row_group(g))
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end((shard, g))
        return batch.sample(row - first)
