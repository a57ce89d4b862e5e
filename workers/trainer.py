"""`gkd train`: train the student on ready samples with the top-k GKD loss (torchrun for several devices)."""

from __future__ import annotations

import logging
import signal
import threading

from pipeline.settings import parse, redacted
from pipeline.train.trainer import TrainSettings, train

log = logging.getLogger("gkd.train")


def main(argv: list[str]) -> int:
    s = parse(TrainSettings, argv, prog="gkd train", description=__doc__.splitlines()[0])
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("settings: %s", redacted(s))
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM/SIGINT: finish the current step, checkpoint, acknowledge, exit 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    summary = train(s, stop)
    log.info(
        "done: %d steps, %d samples this run, last checkpoint %s",
        summary.steps,
        summary.samples,
        summary.checkpoint,
    )
    return 0
