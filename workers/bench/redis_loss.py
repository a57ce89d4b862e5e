"""`gkd bench redis_loss`: what Redis AOF persistence loses, `appendfsync always` against `everysec`.

Writers XADD small entries (200-byte payloads, pipelined, 4 connections) as fast as they can to a private
redis-server with AOF on. Two measurements per setting:

1. Process crash: after `--seconds`, redis-server is SIGKILLed mid-stream and restarted from its AOF.
   `lost` = writes acknowledged to a client but not recovered; `persisted_unacked` = writes recovered
   whose reply never reached the client (the crash came between the write and the reply).
2. Machine crash (power loss, kernel panic), which a test cannot cause: while writing, every 2 ms, the
   AOF file's dirty and under-writeback page-cache bytes (Linux cachestat(2), kernel >= 6.5) are
   sampled: bytes Redis has written but the disk does not hold yet, lost if the machine died at that
   instant. Reported as bytes, as entries (AOF bytes per entry) and as seconds of writes.

Usage: `gkd bench redis_loss [--seconds S] [--runs N] [--json]` (or `python -m workers.bench.redis_loss`).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import glob
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import RedisUnavailable
from pipeline.local.redis_server import RedisServer
from pipeline.queue import schema as K
from pipeline.queue.connection import connect
from workers.bench.cli import result

STREAM = "bench:aof"
PAYLOAD = b"x" * 200
WRITERS = 4
PIPELINE = 16
_SYS_CACHESTAT = 451  # x86_64 and arm64 (the generic syscall table)


@dataclass
class Kill9Result:
    """One kill -9 of redis-server mid-stream."""

    fsync: str
    acked: int = 0
    """Writes acknowledged to the clients before the crash."""
    recovered: int = 0
    """Entries in the stream after the restart from the AOF."""
    seconds: float = 0.0
    """How long the writers wrote before the crash."""
    dirty_bytes: list[int] = field(default_factory=list)
    """Samples of the AOF's not-yet-on-disk bytes (empty without cachestat)."""
    aof_bytes: int = 0
    """AOF growth while writing."""

    @property
    def lost(self) -> int:
        """Acknowledged writes the restarted server does not have."""
        return max(self.acked - self.recovered, 0)

    @property
    def persisted_unacked(self) -> int:
        return max(self.recovered - self.acked, 0)

    @property
    def writes_per_s(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0

    @property
    def aof_bytes_per_entry(self) -> float:
        return self.aof_bytes / self.acked if self.acked else 0.0

    def __str__(self) -> str:
        risk = f", at risk max {max(self.dirty_bytes)} B" if self.dirty_bytes else ""
        return (
            f"{self.acked} acked ({self.writes_per_s:.0f}/s), {self.recovered} recovered: "
            f"{self.lost} lost, {self.persisted_unacked} persisted unacknowledged{risk}"
        )


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


def unsynced_bytes(path: str) -> int | None:
    """Bytes of `path` in the page cache not yet on disk (dirty + writeback); None without cachestat(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        stat, rng = _Cachestat(), _Range(0, 0)
        if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
            if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
                return None
            return 0
        return int(stat.dirty + stat.writeback) * os.sysconf("SC_PAGE_SIZE")
    finally:
        os.close(fd)


def _aof_file(data_dir: str) -> str | None:
    """The AOF file Redis appends to (Redis 7 multi-part: appendonlydir/*.incr.aof; else appendonly.aof)."""
    parts = sorted(glob.glob(os.path.join(data_dir, "appendonlydir", "*.incr.aof")))
    if parts:
        return parts[-1]
    single = os.path.join(data_dir, "appendonly.aof")
    return single if os.path.exists(single) else None


class _Sampler(threading.Thread):
    """Samples the AOF's unsynced bytes every `period_s` until stopped."""

    def __init__(self, data_dir: str, period_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.data_dir, self.period_s = data_dir, period_s
        self.samples: list[int] = []
        self.supported = True
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            path = _aof_file(self.data_dir)
            if path is not None:
                value = unsynced_bytes(path)
                if value is None:
                    self.supported = False
                    return
                self.samples.append(value)
            time.sleep(self.period_s)


async def _writer(url: str, counter: list[int], stop: asyncio.Event) -> None:
    r = connect(url, socket_timeout_s=5, connect_timeout_s=2)
    try:
        while not stop.is_set():
            pipe = r.pipeline(transaction=False)
            for _ in range(PIPELINE):
                pipe.xadd(STREAM, {K.FIELD_DATA: PAYLOAD})
            try:
                res = await pipe.execute()
            except RedisUnavailable:
                return  # the server died: what was not acknowledged does not count
            counter[0] += len(res)
    finally:
        try:
            await r.aclose()
        except Exception:  # the connection died with the server
            pass


async def _kill9_run(fsync: str, seconds: float, data_dir: str | None) -> Kill9Result:
    server = RedisServer(appendonly=True, appendfsync=fsync, data_dir=data_dir).start()
    out = Kill9Result(fsync)
    try:
        sampler = _Sampler(server.dir)
        sampler.start()
        aof0 = _size(_aof_file(server.dir))
        counter = [0]
        stop = asyncio.Event()
        writers = [asyncio.create_task(_writer(server.url, counter, stop)) for _ in range(WRITERS)]
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        out.aof_bytes = _size(_aof_file(server.dir)) - aof0
        acked_before = counter[0]
        await asyncio.to_thread(server.stop, kill=True)  # mid-stream: writers are still sending
        out.seconds = time.monotonic() - t0
        sampler.halt.set()
        stop.set()
        await asyncio.gather(*writers)
        out.acked = counter[0]
        out.aof_bytes = int(out.aof_bytes * out.acked / max(acked_before, 1))
        sampler.join()
        skip = int(0.2 / sampler.period_s)  # the first 0.2 s: AOF file creation, warm-up
        out.dirty_bytes = sampler.samples[skip:] if sampler.supported else []
        server.start()
        r = connect(server.url)
        try:
            out.recovered = int(await r.xlen(STREAM))
        finally:
            await r.aclose()
    finally:
        server.cleanup()
    return out


def _size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0


def measure_kill9(fsync: str, seconds: float = 2.0, data_dir: str | None = None) -> Kill9Result:
    """Write for `seconds`, SIGKILL redis-server mid-stream, restart, count what was lost."""
    if data_dir is not None:
        data_dir = tempfile.mkdtemp(prefix=f"aof-{fsync}-", dir=data_dir)
    return asyncio.run(_kill9_run(fsync, seconds, data_dir))


def _rows(fsync: str, runs: list[Kill9Result]) -> list[dict[str, Any]]:
    b = "redis_loss"
    rows = [
        result(b, f"{fsync}.writes_per_s", statistics.mean(x.writes_per_s for x in runs), "writes/s"),
        result(b, f"{fsync}.kill9_acked", sum(x.acked for x in runs), "writes"),
        result(b, f"{fsync}.kill9_lost", sum(x.lost for x in runs), "writes"),
        result(b, f"{fsync}.kill9_persisted_unacked", sum(x.persisted_unacked for x in runs), "writes"),
    ]
    samples = [(s, x) for x in runs for s in x.dirty_bytes]
    if samples:
        worst, run = max(samples, key=lambda p: p[0])
        rate = run.aof_bytes / run.seconds if run.seconds else 0.0
        rows += [
            result(b, f"{fsync}.machine_crash_at_risk_max", worst, "bytes"),
            result(
                b, f"{fsync}.machine_crash_at_risk_p50", statistics.median(s for s, _ in samples), "bytes"
            ),
            result(
                b,
                f"{fsync}.machine_crash_at_risk_max_writes",
                worst / run.aof_bytes_per_entry if run.aof_bytes_per_entry else 0.0,
                "writes",
            ),
            result(b, f"{fsync}.machine_crash_at_risk_max_s", worst / rate if rate else 0.0, "s"),
        ]
    return rows


def run(args: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="gkd bench redis_loss", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="Writing time before each kill (s).")
    p.add_argument("--runs", type=int, default=3, help="Kills per setting.")
    a = p.parse_args(args)
    rows: list[dict[str, Any]] = []
    for fsync in ("always", "everysec"):
        rows += _rows(fsync, [measure_kill9(fsync, a.seconds) for _ in range(a.runs)])
    return rows


if __name__ == "__main__":
    import json

    for row in run([a for a in sys.argv[1:] if a != "--json"]):
        print(json.dumps(row), flush=True)
