"""`gkd export`: write the scored samples of a run's ready stream into Parquet shards with a manifest.

Exit status: 0 when done (SIGTERM/SIGINT, --idle-exit-s, --max-samples; everything read is committed and
acknowledged), 2 for bad settings or a refused start (live trainers, another teacher or k than the
folder's dataset, pyarrow missing).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from pipeline.settings import parse, redacted

log = logging.getLogger("gkd.export")


def main(argv: list[str]) -> int:
    from pipeline.dataset.exporter import ExportSettings

    s = parse(ExportSettings, argv, prog="gkd export", description=__doc__.splitlines()[0])
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.debug("settings: %s", redacted(s))
    from pipeline.dataset.exporter import Exporter
    from pipeline.dataset.format import require_pyarrow

    require_pyarrow()  # a refusal is one line and exit status 2 (workers/cli.py)
    exporter = Exporter(s)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        summary = await exporter.run(stop)
        log.info(
            "export done: %d samples in %d shards this run, %d dead-lettered, %d settled from before",
            summary.samples, summary.shards, summary.dead, summary.settled,
        )  # fmt: skip
        return 0

    return asyncio.run(run())
