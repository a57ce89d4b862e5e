"""Redis-side checks of the dataset commands."""

from __future__ import annotations

import redis.asyncio as aioredis

from pipeline.errors import ConfigMismatch
from pipeline.queue.runstate import live_workers
from pipeline.queue.schema import HB, Config, Role, RunKeys
from pipeline.sections import SAMPLED


async def refuse_if_trainers_live(r: aioredis.Redis, keys: RunKeys, command: str) -> None:
    """Raise ConfigMismatch if trainers of the run are alive: they read `ready` in the same group, so
    they and the exporter would each get part of the samples."""
    live = await live_workers(r, keys)
    trainers = sorted(name for name, hb in live.items() if hb.get(HB.ROLE) == Role.TRAINER)
    if trainers:
        raise ConfigMismatch(
            f"{command}: run {keys.run!r} has live trainers ({', '.join(trainers[:5])}); an export reads "
            "ready like a trainer and both would get only part of the samples. Export a run without "
            "trainers, then train from the dataset with gkd replay"
        )


def refuse_sampled(config: dict[str, str], keys: RunKeys, command: str) -> None:
    """Raise ConfigMismatch if the run's teacher draws samples: a scored dataset holds top-k rows
    (format version 1, no draw counts), and a sampled row read as a top-k would be a wrong teacher."""
    if config.get(Config.TEACHER_MODE) == SAMPLED:
        raise ConfigMismatch(
            f"{command}: run {keys.run!r} has a sampled teacher (teacher_mode sampled, "
            f"k = {config.get(Config.K)} draws per position); a scored dataset holds top-k rows only. "
            f"Expected a top-k run (gkd workers --teacher-mode topk); train a sampled run from its workers"
        )
