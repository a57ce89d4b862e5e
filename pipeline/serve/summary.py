"""What `gkd teacher` served: a tally of requests, logged every ~30 s (`log_summaries`)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.notice import NOTICE_EVERY_S

if TYPE_CHECKING:
    from pipeline.serve.server import TeacherServer

log = logging.getLogger("gkd.teacher.server")


@dataclass
class Tally:
    """What the server did since the last summary (`log_summaries`)."""

    requests: int = 0
    prompts: int = 0
    positions: int = 0
    refused: int = 0
    """Requests answered with an error (4xx, 5xx)."""
    since: float = field(default_factory=time.monotonic)


#: How often `gkd teacher` logs what it served.
SUMMARY_EVERY_S = NOTICE_EVERY_S


async def log_summaries(server: TeacherServer, url: str, every_s: float = SUMMARY_EVERY_S) -> None:
    """Every `every_s`: what was served since the last summary, or that nothing was (until cancelled)."""
    while True:
        await asyncio.sleep(every_s)
        t, server.tally = server.tally, Tally()
        span = time.monotonic() - t.since
        if t.requests or t.refused:
            log.info(
                "last %.0f s: %d requests (%d prompts, %d positions, %.0f positions/s), %d refused, "
                "%d prompts pending now",
                span, t.requests, t.prompts, t.positions, t.positions / span, t.refused, server.pending,
            )  # fmt: skip
        else:
            log.info("no requests in the last %.0f s; serving %s on %s", span, server.model_name, url)
