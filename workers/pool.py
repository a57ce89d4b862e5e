"""`gkd workers`: the teacher worker pool (rollouts -> teacher top-k -> ready).

One process runs one `pipeline.score.loop.TeacherWorker` event loop with `--concurrency` rollouts in
flight; with `--procs N` (N > 1) it supervises N such processes (`pipeline.score.pool.supervise`).

Exit status: 0 after a clean stop (signal), 2 for bad settings or a refused start (run config mismatch,
teacher checks), 1 for anything else.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.errors import ConfigMismatch, GKDError
from pipeline.score.pool import WorkerSettings, default_name, supervise, teacher_config
from pipeline.settings import parse, redacted

if TYPE_CHECKING:  # the heavy imports (aiohttp, redis, numpy) wait until the signal handlers are set
    from pipeline.teacher.client import TeacherConfig

log = logging.getLogger("gkd.workers")

#: Set by a SIGTERM/SIGINT that arrives while the process is still starting (before the event loop).
_stop_requested = False


def _early_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def main(argv: Sequence[str]) -> int:
    # A stop may come while this process is still importing and starting (a supervisor or test that
    # restarts and stops quickly): remember it, so the worker exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _early_stop)
    s = parse(WorkerSettings, argv, prog="gkd workers", description=__doc__.split("\n")[0])
    logging.basicConfig(
        level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if not s.teacher:
            raise ValueError("--teacher: expected at least one teacher URL, got none")
        if s.procs < 1:
            raise ValueError(f"--procs: expected >= 1, got {s.procs}")
        config = teacher_config(s)
    except (ValueError, GKDError) as exc:
        print(f"gkd workers: {exc}", file=sys.stderr)
        return 2
    log.debug("settings: %s", redacted(s))
    if s.procs > 1:
        return supervise(s, list(argv), _stop_requested)
    return asyncio.run(run_one(s, config, s.name or default_name()))


async def run_one(s: WorkerSettings, config: TeacherConfig, name: str) -> int:
    """Run one worker until SIGTERM/SIGINT; returns the process exit status."""
    from pipeline.score.loop import TeacherWorker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if _stop_requested:
        stop.set()
    worker = TeacherWorker(s.run, config, name, s.flow, s.loop)
    try:
        report = await worker.run(stop)
    except ConfigMismatch as exc:
        log.error("refusing to start: %s", exc)
        return 2
    except GKDError as exc:
        if stop.is_set():  # stopped while waiting for the teacher to come up
            return 0
        log.error("refusing to start: %s: %s", type(exc).__name__, exc)
        return 2
    except OSError as exc:  # e.g. the metrics port is taken
        log.error("refusing to start: %s", exc)
        return 2
    log.info(
        "worker %s stopped: %d scored (%d positions), %d dead, %d released, %d lost to other workers",
        name,
        report.scored,
        report.positions,
        report.dead,
        report.released,
        report.lease_lost,
    )
    return 0
