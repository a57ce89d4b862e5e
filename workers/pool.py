"""`gkd workers`: the teacher worker pool (rollouts -> teacher top-k -> ready).

One process runs one `pipeline.score.loop.TeacherWorker` event loop with `--concurrency` rollouts in
flight; with `--procs N` (N > 1) it supervises N such processes (`pipeline.score.pool.supervise`).

A first SIGTERM/SIGINT stops reading and gives in-flight rollouts `--grace-s` (counting down in the log);
a second hands the rest back at once.

Exit status: 0 after a clean stop (signal), 2 for bad settings or a refused start (run config mismatch,
teacher checks: one line, from the `gkd` command line), 1 for anything else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.errors import GKDError, SettingsError
from pipeline.score.pool import SUPERVISOR_ENV, WorkerSettings, default_name, supervise, teacher_configs
from pipeline.settings import parse, redacted

if TYPE_CHECKING:  # the heavy imports (aiohttp, redis, numpy) wait until the signal handlers are set
    from pipeline.teacher.config import TeacherConfig

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
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not s.teacher:
        raise SettingsError("--teacher: expected at least one teacher URL (http://host:port), got none")
    if s.procs < 1:
        raise SettingsError(f"--procs: expected >= 1, got {s.procs}")
    config = teacher_configs(s)
    log.debug("settings: %s", redacted(s))
    if s.procs > 1:
        return supervise(s, list(argv), _stop_requested)
    return asyncio.run(run_one(s, config, s.name or default_name()))


async def run_one(s: WorkerSettings, config: dict[str, TeacherConfig], name: str) -> int:
    """Run one worker until SIGTERM/SIGINT; returns the process exit status."""
    from pipeline.score.loop import TeacherWorker

    stop = asyncio.Event()
    worker = TeacherWorker(s.run, config, name, s.flow, s.loop)

    def on_signal() -> None:
        if stop.is_set():
            worker.hurry()  # a second Ctrl-C: hand back what is in flight now
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if _stop_requested:
        stop.set()
    watch = asyncio.create_task(_watch_supervisor(stop))
    try:
        report = await worker.run(stop)
    except GKDError:
        if stop.is_set():  # stopped while waiting for the teacher to come up
            return 0
        raise
    finally:
        watch.cancel()
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


async def _watch_supervisor(stop: asyncio.Event) -> None:
    """A child of `--procs N` stops (gracefully) once its supervisor is gone: it runs in its own session,
    so nothing else would stop it."""
    parent = os.environ.get(SUPERVISOR_ENV)
    if not parent or not parent.isdigit():
        return
    while not stop.is_set():
        if os.getppid() != int(parent):
            log.warning("the pool's supervisor (pid %s) is gone: stopping", parent)
            stop.set()
            return
        await asyncio.sleep(1.0)
