"""Background prefetch of ready samples: read from Redis, decode, pack, pin, copy to the device.

The trainer's main thread does only torch work. A daemon thread (`IOLoop`) runs an asyncio loop that
owns the Redis client; on it, a `Prefetcher` task reads entries from the `ready` stream (this
consumer's own pending entries first, in stream order, then new ones), decodes and packs them into
micro-batches in a worker thread, allocates them in pinned memory and starts a non-blocking copy to the
device on a side CUDA stream. Up to `depth` micro-batches wait in a queue, so while the stream holds data
a training step finds its next micro-batch ready and never waits on Redis, decoding or the copy.

Every entry read stays in `held` (renewed by the trainer) until the trainer acknowledges it. Entries
that cannot be trained are settled here: undecodable or invalid ones are dead-lettered (stage
"trainer"), stale ones acknowledged and reported through `on_skip`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.exceptions
import torch

from pipeline.errors import WireFormatError
from pipeline.queue import schema as K
from pipeline.queue.streams import Entry, StreamConsumer
from pipeline.train.batching import Batch, BatchPacker
from pipeline.wire.codec import ScoredSample, decode_scored

log = logging.getLogger(__name__)
T = TypeVar("T")
_FID, _FDATA = K.FIELD_ID.encode(), K.FIELD_DATA.encode()
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class IOLoop:
    """An asyncio event loop in a daemon thread, for Redis work next to a synchronous training loop."""

    def __init__(self, name: str = "gkd-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = 120.0) -> T:
        """Run `coro` on the loop and wait for its result (raises what it raises, TimeoutError after)."""
        return self.submit(coro).result(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancel what still runs on the loop, stop it and join the thread."""
        if not self._thread.is_alive():
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(_cancel_all(), timeout_s)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class Verdict:
    """What to do with a decoded sample: "train", "skip" (acknowledge, count as stale) or "dead"."""

    action: str
    reason: str = ""


TRAIN = Verdict("train")


class Prefetcher:
    """Micro-batches from one consumer of the `ready` stream, built ahead of the training loop.

    Call `start()` once; then `get()` from the training thread. With `enabled=False` nothing runs in
    the background: `get()` reads, decodes and packs on demand (the baseline the benchmark compares).
    """

    def __init__(
        self,
        io: IOLoop,
        consumer: StreamConsumer,
        packer: BatchPacker,
        *,
        check: Callable[[ScoredSample], Verdict] = lambda s: TRAIN,
        on_skip: Callable[[list[Entry]], Awaitable[None]] | None = None,
        device: torch.device | str = "cpu",
        depth: int = 4,
        read_count: int = 32,
        block_ms: int = 500,
        enabled: bool = True,
        held: dict[bytes, Entry] | None = None,
        held_lock: threading.Lock | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.io = io
        self.consumer = consumer
        self.packer = packer
        self.check = check
        self.on_skip = on_skip
        self.device = torch.device(device)
        self.depth = max(1, depth)
        self.read_count = read_count
        self.block_ms = block_ms
        self.enabled = enabled
        self.held: dict[bytes, Entry] = held if held is not None else {}
        self.held_lock = held_lock or threading.Lock()
        self.stop_event = stop
        self._q: queue.Queue[Batch] = queue.Queue()
        self._idle = threading.Event()  # the stream had nothing new and no partial batch is left
        self._room: asyncio.Semaphore | None = None
        self._task: concurrent.futures.Future[None] | None = None
        self._pending_cursor: bytes | None = b"0"  # own-pending phase until a page comes back empty
        self._copy_stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ training-thread side

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = self.io.submit(self._run())

    def get(self, timeout_s: float = 1.0) -> Batch | None:
        """The next micro-batch, on the device; None when the stream is idle (nothing new arrived within
        the read block time and no partial micro-batch is left) or after `timeout_s` without one.

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
            if self._idle.is_set() or deadline <= 0:
                return self._take_nowait()  # a batch may have landed just before the idle flag
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

    @property
    def queued(self) -> int:
        return self._q.qsize()

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
        """`_fill_once`, backing off through Redis outages (True, idle, once `stop` is set)."""
        idle = await self._retrying(self._fill_once, "reading ready samples")
        return True if idle is None else idle

    async def _retrying(self, fn: Callable[[], Awaitable[T]], what: str) -> T | None:
        """`fn()` until it succeeds or `stop` is set (then None), backing off 0.2 s doubling to 5 s."""
        delay = 0.2
        while not self._stopping():
            try:
                return await fn()
            except REDIS_ERRORS as exc:
                log.warning("%s: redis unavailable (%r); retrying in %.1f s", what, exc, delay)
                # A read whose reply was lost may have delivered entries to this consumer: look for
                # them among its own pending entries before reading new ones.
                self._pending_cursor = b"0"
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None

    async def _read(self) -> list[Entry]:
        """This consumer's own pending entries first (after a crash), page by page, then new entries."""
        c = self.consumer
        if self._pending_cursor is not None:
            res: Any = await c.r.xreadgroup(
                c.group, c.consumer, {c.stream: self._pending_cursor}, count=self.read_count
            )
            entries = [
                Entry(sid=sid, id=_s(f.get(_FID, b"")), data=bytes(f.get(_FDATA, b"")))
                for _, msgs in res or []
                for sid, f in msgs
                if f
            ]
            with self.held_lock:
                entries = [e for e in entries if e.sid not in self.held]
            if res and any(msgs for _, msgs in res):
                self._pending_cursor = [m for _, msgs in res for m in msgs][-1][0]
                if entries:
                    return entries
                return await self._read()
            self._pending_cursor = None
        return await c.read(self.read_count, block_ms=self.block_ms)

    async def _fill_once(self) -> bool:
        """One read; decoded samples go to the packer; closed micro-batches go to the queue.

        Returns True when the stream is idle: nothing new came within the block time and no partial
        micro-batch was left to flush.
        """
        entries = await self._read()
        if not entries:
            batch = self.packer.flush()
            if batch is None:
                self._idle.set()
                return True
            await self._emit(batch)
            return False
        self._idle.clear()
        with self.held_lock:
            for e in entries:
                self.held[e.sid] = e
        batches, skipped, dead = await asyncio.to_thread(self._decode_and_pack, entries)
        for b in batches:
            await self._emit(b)
        if skipped or dead:
            await self._retrying(lambda: self._settle(skipped, dead), "settling rejected samples")
        return False

    async def _settle(self, skipped: list[Entry], dead: list[tuple[Entry, str]]) -> None:
        """Dead-letter what can never train and hand stale samples to `on_skip`; both leave `held`."""
        for entry, reason in dead:
            if entry.sid in self.held:
                log.error("ready entry %s (%s) dead-lettered: %s", entry.sid, entry.id, reason)
                await self.consumer.dead_letter(entry, "trainer", reason)
                with self.held_lock:
                    self.held.pop(entry.sid, None)
        if skipped and self.on_skip is not None:
            await self.on_skip(skipped)
        with self.held_lock:
            for e in skipped:
                self.held.pop(e.sid, None)

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
                batches += self.packer.add(sample, e)
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


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
