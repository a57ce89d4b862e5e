"""`gkd train`: train the student on ready samples with the top-k GKD loss (torchrun for several devices)."""

from __future__ import annotations

import logging
import signal
import threading

from pipeline.settings import parse, redacted
from pipeline.train.settings import TrainSettings
from pipeline.train.trainer import TrainSummary, train

log = logging.getLogger("gkd.train")


def done_line(s: TrainSettings, summary: TrainSummary) -> str:
    """What the trainer did, in one line (a resume counts the steps it started from apart)."""
    if not summary.started:
        return "stopped before starting (while waiting for Redis): nothing trained"
    ran = summary.steps - summary.start_step
    where = f"latest checkpoint {summary.checkpoint}" if summary.checkpoint else "no checkpoint written"
    if ran == 0 and s.max_steps and summary.start_step >= s.max_steps:
        return (
            f"done: nothing to train, the checkpoint is at step {summary.start_step} and --max-steps is "
            f"{s.max_steps} (raise --max-steps to train on); {where}"
        )
    resumed = f" (resumed at step {summary.start_step})" if summary.start_step else ""
    this_run = f"{ran} steps and {summary.samples} samples in this run"
    return f"done: step {summary.steps}{resumed}, {this_run}; {where}"


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
    log.info("%s", done_line(s, summary))
    return 0
