"""`gkd replay`: feed a scored dataset into a run's ready stream, exactly once per epoch, without a teacher.

Exit status: 0 when the epochs are replayed (or on SIGTERM/SIGINT: the next start resumes), 2 for bad
settings or a refused start (a dataset from another teacher, k, dtype or tokenizer than the run; a
resume with another order; a damaged shard; pyarrow missing).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from pipeline.settings import parse, redacted

log = logging.getLogger("gkd.replay")


def main(argv: list[str]) -> int:
    from pipeline.dataset.replayer import ReplaySettings

    s = parse(ReplaySettings, argv, prog="gkd replay", description=__doc__.splitlines()[0])
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.debug("settings: %s", redacted(s))
    from pipeline.dataset.format import require_pyarrow
    from pipeline.dataset.replayer import Replayer

    require_pyarrow()  # a refusal is one line and exit status 2 (workers/cli.py)
    replayer = Replayer(s)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        summary = await replayer.run(stop)
        log.info(
            "replay done: %d samples written by this process, %d epoch(s) complete in the run, "
            "%d rollouts scored from the dataset, %d handed back",
            summary.written, summary.epochs_done, summary.served, summary.handed_back,
        )  # fmt: skip
        return 0

    return asyncio.run(run())
