"""Background prefetch of ready samples: read from Redis, decode, pack, pin, copy to the device.

The trainer's main thread does only torch work. A daemon thread (`IOLoop`) runs an asyncio loop that
owns the Redis client; on it, a `Prefetcher` task reads entries from the `ready` stream (this
consumer's own pending entries first, in stream order, then new ones), decodes and packs them into
micro-batches in a worker thread, allocates them in pinned memory and starts a non-blocking copy to the
device on a side CUDA stream. Up to `depth` micro-batches wait in a queue, so while the stream holds data
a training step finds its next micro-batch ready and never waits on Redis, decoding or the copy.

Entries come from, and go back to, the rank's `ReadyLeases` (which holds and renews them). A micro-batch
carries its entries with their compact rollouts (what the journal keeps once they are trained); samples
that cannot be trained (undecodable, or rejected by the trainer's `check`) are handed back to it to be
dead-lettered or skipped as stale.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pipeline.errors import WireFormatError
from pipeline.queue.lease import Entry
from pipeline.train.batching import Batch, BatchPacker
from pipeline.train.ioloop import IOLoop
from pipeline.train.ready import ReadyLeases
from pipeline.wire.codec import ScoredSample, decode_scored, encode_rollout

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    """What to do with a decoded sample: "train", "skip" (acknowledge, count as stale) or "dead"."""

    action: str
    reason: str = ""


TRAIN = Verdict("train")


class Prefetcher:
    """Micro-batches from one rank's entries of the `ready` stream, built ahead of the training loop.

    Call `start()` once; then `get()` from the training thread. With `enabled=False` nothing runs in
    the background: `get()` reads, decodes and packs on demand (the baseline the benchmark compares).
    """

    def __init__(
        self,
        io: IOLoop,
        source: ReadyLeases,
        packer: BatchPacker,
        *,
        check: Callable[[ScoredSample], Verdict] = lambda s: TRAIN,
        device: torch.device | str = "cpu",
        depth: int = 4,
        read_count: int = 32,
        block_ms: int = 500,
        enabled: bool = True,
        stop: threading.Event | None = None,
    ) -> None:
        self.io = io
        self.source = source
        self.packer = packer
        self.check = check
        self.device = torch.device(device)
        self.depth = max(1, depth)
        self.read_count = read_count
        self.block_ms = block_ms
        self.enabled = enabled
        self.stop_event = stop
        self._q: queue.Queue[Batch] = queue.Queue()
        self._idle = threading.Event()  # the stream had nothing new and no partial batch is left
        self._room: asyncio.Semaphore | None = None
        self._task: concurrent.futures.Future[None] | None = None
        self._copy_stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ training-thread side

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = self.io.submit(self._run())

    def get(self, timeout_s: float = 1.0) -> Batch | None:
        """The next micro-batch, on the device; None after `timeout_s` without one (`idle` then says
        whether the stream ran dry: nothing new within the read block time, no partial micro-batch left).
        Blocks for the timeout even on an idle stream: a trainer without data must not spin.

        Raises the background task's error if it failed.
        """
        if not self.enabled:
            while self._q.empty() and not self.io.run(self._fill(), timeout_s=None):
                pass
            return self._take_nowait()
        deadline = timeout_s
        while True:
            batch = self._take_nowait()
            if batch is not None:
                return batch
            if self.error is not None:
                raise RuntimeError(f"prefetch failed: {self.error!r}") from self.error
            if deadline <= 0:
                return self._take_nowait()
            try:
                batch = self._q.get(timeout=0.02)
            except queue.Empty:
                deadline -= 0.02
                continue
            return self._ready(batch)

    def _take_nowait(self) -> Batch | None:
        try:
            batch = self._q.get_nowait()
        except queue.Empty:
            return None
        return self._ready(batch)

    def _ready(self, batch: Batch) -> Batch:
        if self._room is not None:
            self.io.loop.call_soon_threadsafe(self._room.release)
        ev = getattr(batch, "_copied", None)
        if ev is not None:  # wait (on the GPU, not the host) for the side-stream copy
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            for t in batch.tensors().values():
                t.record_stream(cur)  # the caching allocator must not reuse them before compute is done
        return batch

    @property
    def idle(self) -> bool:
        """The last read found the stream empty and no partial micro-batch was left."""
        return self._idle.is_set()

    def stop(self) -> None:
        if self._task is not None:
            self.io.loop.call_soon_threadsafe(self._task.cancel)
            try:
                self._task.result(timeout=10)
            except (concurrent.futures.CancelledError, concurrent.futures.TimeoutError, Exception):
                pass
            self._task = None

    # ------------------------------------------------------------------ io-loop side

    async def _run(self) -> None:
        self._room = asyncio.Semaphore(self.depth)
        try:
            while not self._stopping():
                async with self._room:
                    pass  # wait until the queue has room before reading more
                await self._fill()
                # Neither an available semaphore nor a fill that returns at once (stop set) suspends:
                # yield anyway, so the IO loop can never spin here and starve every other task.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            log.exception("prefetch failed")
            raise

    def _stopping(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()

    async def _fill(self) -> bool:
        """One read; decoded samples go to the packer; closed micro-batches go to the queue.

        Returns True when the stream is idle: nothing new came within the block time and no partial
        micro-batch was left to flush (or a stop came during a Redis outage).
        """
        entries = await self.source.read(self.read_count, self.block_ms)
        if not entries:
            batch = self.packer.flush()
            if batch is None:
                self._idle.set()
                return True
            await self._emit(batch)
            return False
        self._idle.clear()
        batches, skipped, dead = await asyncio.to_thread(self._decode_and_pack, entries)
        for b in batches:
            await self._emit(b)
        if skipped or dead:
            await self.source.reject(skipped, dead)
        return False

    def _decode_and_pack(
        self, entries: list[Entry]
    ) -> tuple[list[Batch], list[Entry], list[tuple[Entry, str]]]:
        batches: list[Batch] = []
        skipped: list[Entry] = []
        dead: list[tuple[Entry, str]] = []
        for e in entries:
            # Hand the GIL back between samples: otherwise the training thread, which takes and drops
            # it around every torch op, can wait a whole switch interval (5 ms) per op during a burst.
            time.sleep(0)
            try:
                sample = decode_scored(e.data)
            except WireFormatError as exc:
                dead.append((e, f"undecodable ScoredSample: {exc}"))
                continue
            verdict = self.check(sample)
            if verdict.action == "dead":
                dead.append((e, verdict.reason))
            elif verdict.action == "skip":
                skipped.append(e)
            else:
                # The batch carries the entry with its compact rollout, which the journal keeps once the
                # sample is trained; the scored payload is not kept past the batch's tensors.
                batches += self.packer.add(sample, replace(e, data=encode_rollout(sample.rollout)))
        return [self._to_device(b) for b in batches], skipped, dead

    def _to_device(self, batch: Batch) -> Batch:
        if self._copy_stream is None:
            return batch if self.device.type == "cpu" else batch.to(self.device)
        # A worker thread's current device is cuda:0 whatever the rank's device: set it explicitly.
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            moved = batch.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        moved._copied = ev  # type: ignore[attr-defined]
        moved._host = batch  # type: ignore[attr-defined]  # pinned source lives until the copy is done
        return moved

    async def _emit(self, batch: Batch) -> None:
        if self.enabled and self._room is not None:
            await self._room.acquire()
        self._q.put(batch)
