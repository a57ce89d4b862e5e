"""`gkd teacher`: the reference teacher server (a Hugging Face causal LM behind vLLM's API)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from pipeline.errors import SettingsError
from pipeline.models import check_source
from pipeline.serve.server import TeacherServerSettings, check_port, load, serve
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
        raise SettingsError("model: expected --model PATH_OR_HF_ID (or GKD_MODEL), got none")
    if settings.engine == "vllm":
        require_vllm()
    # Everything that can be checked is checked before the model loads (that may take minutes).
    check_source(settings.model, "--model")
    check_port(settings)
    log.info("settings: %s", redacted(settings))
    model = tokenizer = None
    if settings.engine != "vllm":  # vLLM's engine must be built in the event loop that serves it
        log.info("loading %s", settings.model)
        model, tokenizer = load(settings)  # in the main thread: Ctrl-C interrupts it at once
    asyncio.run(serve(settings, model, tokenizer))
    return 0
