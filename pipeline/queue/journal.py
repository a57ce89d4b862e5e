"""The trained journal: what Redis keeps of samples trained since the last checkpoint.

Right after an optimizer step each trainer rank moves its trained entries out of `ready` and into the
run's journal stream (`StreamConsumer.journal`: one script acknowledges, deletes and journals), keeping
only the compact rollout (token ids and metadata, about 4 B per token) and the step. A checkpoint that
includes step S makes the journal up to S useless: `trim`. A resume from step S puts every journal
entry past S back into `rollouts`, to be scored and trained again, and drops the rest (`requeue`), so
training stays exactly-once within the checkpoint lineage the run continues from, whatever the number
of ranks or their names. `settle` acknowledges ready entries a checkpoint lists as included but whose
journal write was not confirmed before it was written (Redis was down).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from pipeline.queue import schema as K
from pipeline.queue import scripts
from pipeline.queue.schema import RunKeys, Stat

#: Journal entries per script call (bounds how long one call blocks Redis).
CHUNK = 500

#: (rollout payload, step that trained it) -> the payload to put back into rollouts.
Retrain = Callable[[bytes, int], bytes]


def _field(fields: Mapping[bytes, bytes], name: str) -> bytes:
    return fields.get(name.encode(), b"")


def _next_id(sid: bytes) -> str:
    """The smallest stream id above `sid`."""
    ms, _, seq = sid.decode().partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


class Journal:
    """The journal of one run (`keys.journal`)."""

    def __init__(self, r: aioredis.Redis, keys: RunKeys) -> None:
        self.r, self.keys = r, keys
        self.stream = keys.journal
        self._trim = r.register_script(scripts.TRIM_JOURNAL)
        self._requeue = r.register_script(scripts.REQUEUE)
        self._settle = r.register_script(scripts.SETTLE)

    async def mark(self) -> bytes | None:
        """The id of the newest journal entry (None when empty). Taken while every rank has journaled
        the steps a checkpoint includes and none has begun the next, it separates the two."""
        last: Any = await self.r.xrevrange(self.stream.key, count=1)
        return bytes(last[0][0]) if last else None

    async def trim(self, upto: bytes | None) -> int:
        """Delete the journal entries up to id `upto` (inclusive); returns how many."""
        done = 0
        while upto is not None:
            n = int(
                await self._trim(
                    keys=[self.stream.key, self.keys.stats], args=[upto, CHUNK, self.stream.bytes_out]
                )
            )
            done += n
            if n < CHUNK:
                break
        return done

    async def requeue(self, after_step: int, retrain: Retrain) -> tuple[int, int]:
        """Put journal entries of steps after `after_step` back into rollouts (payload through `retrain`),
        delete the others. Idempotent: an entry moves at most once. Returns (requeued, dropped)."""
        moved = dropped = 0
        cursor = "-"
        while True:
            page: Any = await self.r.xrange(self.stream.key, min=cursor, max="+", count=CHUNK)
            if not page:
                return moved, dropped
            args: list[Any] = [
                self.stream.bytes_out,
                self.keys.rollouts.bytes_in,
                Stat.REQUEUED,
                Stat.JOURNAL_DROPPED,
            ]
            for sid, fields in page:
                data, step = _field(fields, K.FIELD_DATA), int(_field(fields, K.FIELD_STEP) or 0)
                args += [
                    sid,
                    _field(fields, K.FIELD_ID),
                    retrain(data, step) if step > after_step else b"",
                    len(data),
                ]
            keys = [self.stream.key, self.keys.rollouts.key, self.keys.stats]
            n_moved, n_dropped = await self._requeue(keys=keys, args=args)
            moved, dropped = moved + int(n_moved), dropped + int(n_dropped)
            cursor = _next_id(page[-1][0])

    async def settle(self, listed: Mapping[str, Sequence[tuple[str, int]]]) -> int:
        """Acknowledge and delete the ready entries a checkpoint lists (consumer -> [(entry id, bytes)]),
        whoever holds them. Only before any trainer of the resumed job reads. Returns how many."""
        pairs = [(sid, size) for entries in listed.values() for sid, size in entries]
        done = 0
        for i in range(0, len(pairs), CHUNK):
            args: list[Any] = [self.keys.ready.group, self.keys.ready.bytes_out]
            for sid, size in pairs[i : i + CHUNK]:
                args += [sid, size]
            done += int(await self._settle(keys=[self.keys.ready.key, self.keys.stats], args=args))
        return done


class Journals:
    """The journals of every partition of a run (one `Journal` for a one-partition run): each partition's
    trained samples are journaled, trimmed, requeued and settled in its own slot."""

    def __init__(self, r: aioredis.Redis, parts: Sequence[RunKeys]) -> None:
        self.of = [Journal(r, p) for p in parts]

    async def mark(self) -> list[bytes | None]:
        """The newest entry of each partition's journal (see `Journal.mark`)."""
        return [await j.mark() for j in self.of]

    async def trim(self, marks: Sequence[bytes | None]) -> int:
        """Trim each partition's journal up to its mark; returns how many entries went."""
        return sum([await j.trim(m) for j, m in zip(self.of, marks, strict=True)])

    async def requeue(self, after_step: int, retrain: Retrain) -> tuple[int, int]:
        """`Journal.requeue` in every partition (into that partition's rollouts); summed."""
        moved = dropped = 0
        for j in self.of:
            m, d = await j.requeue(after_step, retrain)
            moved, dropped = moved + m, dropped + d
        return moved, dropped

    async def settle(self, listed: Mapping[str, Sequence[tuple[str, int]]]) -> int:
        """`Journal.settle` per partition: a listed entry id ``<p>/<id>`` (`lease.Entry.ref`) is of
        partition p, a plain one of partition 0."""
        by_part: dict[int, dict[str, list[tuple[str, int]]]] = {}
        for consumer, entries in listed.items():
            for ref, size in entries:
                part, _, sid = ref.rpartition("/")
                by_part.setdefault(int(part or 0), {}).setdefault(consumer, []).append((sid, size))
        return sum([await self.of[p].settle(lst) for p, lst in sorted(by_part.items())])
