"""`gkd rollouts`: JSONL prompts -> Rollouts on the rollouts stream, on-policy with probability lmbda."""

from __future__ import annotations

import asyncio
import logging
import signal

from pipeline.produce.producer import ProducerSummary, RolloutSettings, produce
from pipeline.settings import parse, redacted

log = logging.getLogger("gkd.rollouts")


def main(argv: list[str]) -> int:
    s = parse(RolloutSettings, argv, prog="gkd rollouts", description=__doc__.splitlines()[0])
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("settings: %s", redacted(s))

    async def run() -> ProducerSummary:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await produce(s, stop)

    summary = asyncio.run(run())  # a refusal (e.g. a --skip-scored dataset of another k): workers/cli.py
    log.info(
        "done: %d rollouts (%s), %d skipped, %d already scored (--skip-scored), %d cut to the teacher's "
        "context, policy versions %s",
        summary.produced,
        dict(summary.sources),
        summary.skipped,
        summary.skipped_scored,
        summary.cut,
        summary.versions,
    )
    return 0
