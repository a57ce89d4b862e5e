"""`gkd teacher`: the reference teacher server (a Hugging Face causal LM behind vLLM's API)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from pipeline.errors import SettingsError
from pipeline.serve.server import TeacherServerSettings, serve
from pipeline.serve.vllm_engine import require_vllm
from pipeline.settings import parse, redacted

log = logging.getLogger("gkd.teacher.server")


def main(argv: Sequence[str]) -> int:
    settings = parse(
        TeacherServerSettings,
        argv,
        prog="gkd teacher",
        description="Serve a causal LM with vLLM's prompt_logprobs API (on transformers or vLLM's engine).",
    )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.model:
        log.error("gkd teacher: expected --model PATH_OR_HF_ID (or GKD_MODEL), got none")
        return 2
    if settings.engine == "vllm":
        try:
            require_vllm()
        except SettingsError as exc:
            log.error("gkd teacher: %s", exc)
            return 2
    log.info("settings: %s", redacted(settings))
    asyncio.run(serve(settings))
    return 0
