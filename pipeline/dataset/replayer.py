"""`gkd replay`: feed a scored dataset into a run's `ready` stream, exactly once per epoch.

Before anything is written the dataset is checked against the run: its teacher, k and logprob dtype
(and tokenizer fingerprint, when both sides know one) are recorded in, or compared with, the run's
config, so a dataset from another teacher or k is refused with the setting that differs.

Exactly once per epoch: the replay's cursor (epoch, position, shards of the epoch, order) lives in the
run's Redis (`RunKeys.replay(dataset_id)`), and every batch is one Lua call that adds the samples to
`ready` and moves the cursor, only if the cursor is where this process believes it is (compare and set).
A crash leaves a batch either written with its cursor or not at all; a restart (or a retry whose reply
was lost) reads the cursor and goes on from there; two replays of one dataset into one run share the
work instead of doubling it. An epoch's order is a function of (seed, epoch, shards), so a resume finds
it again; resuming mid-epoch with another order is refused. Epoch 0 keeps the sample ids (it is the same
sample set as the run that was exported); epoch e >= 1 adds ``#e<e>`` to them. It waits for room below
ready's high-water mark before each batch, like the workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from pipeline.dataset.manifest import tokenizer_fingerprint
from pipeline.dataset.reader import DatasetReader
from pipeline.errors import DatasetError, RedisUnavailable, SettingsError
from pipeline.queue import schema as K
from pipeline.queue.backpressure import Backpressure
from pipeline.queue.connection import RedisRetry, connect
from pipeline.queue.runstate import Counts, Heartbeat, check_run_config, read_config
from pipeline.queue.schema import HB, Config, Role, Stat
from pipeline.queue.streams import ensure_groups
from pipeline.sections import CommonSettings, FlowSettings
from pipeline.settings import section, setting
from pipeline.wire.codec import encode_scored

log = logging.getLogger("gkd.replay")

# KEYS: ready, cursor, stats. ARGV: expected epoch, expected pos, new epoch, new pos, shards, order,
# now_ms, bytes-in field, replayed field, then pairs (id, payload). Returns {1} when written, else
# {0, epoch, pos, shards, order} of the cursor as it is.
_COMMIT = f"""
local e = tonumber(redis.call('HGET', KEYS[2], '{K.REPLAY_EPOCH}') or '0')
local p = tonumber(redis.call('HGET', KEYS[2], '{K.REPLAY_POS}') or '0')
if e ~= tonumber(ARGV[1]) or p ~= tonumber(ARGV[2]) then
  return {{0, e, p, redis.call('HGET', KEYS[2], '{K.REPLAY_SHARDS}') or '',
           redis.call('HGET', KEYS[2], '{K.REPLAY_ORDER}') or ''}}
end
local bytes, n = 0, 0
for i = 10, #ARGV, 2 do
  redis.call('XADD', KEYS[1], '*', '{K.FIELD_ID}', ARGV[i], '{K.FIELD_DATA}', ARGV[i + 1])
  bytes = bytes + #ARGV[i + 1]
  n = n + 1
end
redis.call('HSET', KEYS[2], '{K.REPLAY_EPOCH}', ARGV[3], '{K.REPLAY_POS}', ARGV[4],
  '{K.REPLAY_SHARDS}', ARGV[5], '{K.REPLAY_ORDER}', ARGV[6], '{K.REPLAY_UPDATED_MS}', ARGV[7])
if n > 0 then
  redis.call('HINCRBY', KEYS[3], ARGV[8], bytes)
  redis.call('HINCRBY', KEYS[3], ARGV[9], n)
end
return {{1}}
"""


@dataclass
class ReplaySettings(CommonSettings):
    """Settings of `gkd replay`."""

    flow: FlowSettings = section(
        FlowSettings, "high_water", "low_water", "high_water_bytes", "low_water_bytes", "lease_ms"
    )
    dataset: str = setting("", "Scored dataset folder (written by gkd export).", flags=("--from",))
    epochs: int = setting(1, "Epochs to replay into the run in total (a resumed replay counts earlier ones).")
    shuffle: bool = setting(False, "Shuffle every epoch (shard order and samples within each shard).")
    seed: int = setting(0, "Seed of the shuffled order (epoch e uses seed and e).")
    batch_size: int = setting(32, "Samples per stream write (one atomic call with the cursor).")
    tokenizer: str | None = setting(
        None, "Refuse unless the dataset's tokenizer fingerprint matches this one."
    )
    verify: bool = setting(True, "Check each shard's sha256 against the manifest before using it.")
    serve_rollouts: bool = setting(
        False,
        "Also score rollouts of the run from the dataset by content hash (e.g. those a resumed trainer "
        "queues again) and keep doing so after the epochs, until SIGTERM or --idle-exit-s.",
    )
    idle_exit_s: float = setting(
        0.0, "With --serve-rollouts: exit after this long without rollouts (0: never)."
    )
    name: str = setting("replay", "Process name (heartbeat; consumer name when serving rollouts).")


@dataclass
class ReplaySummary:
    written: int = 0
    """Samples this process added to ready."""
    epochs_done: int = 0
    """Epochs of this dataset complete in the run (this process's and earlier ones)."""
    served: int = 0
    """Rollouts scored from the dataset (--serve-rollouts)."""
    handed_back: int = 0
    """Rollouts not in the dataset, released for teacher workers."""


@dataclass
class Cursor:
    epoch: int = 0
    pos: int = 0
    shards: int = 0
    order: str = ""


def order_name(shuffle: bool, seed: int) -> str:
    return f"shuffle:{seed}" if shuffle else "sequential"


def replay_id(sample_id: str, epoch: int) -> str:
    """The stream id of a sample in an epoch: the same id in epoch 0, ``<id>#e<epoch>`` after."""
    return sample_id if epoch == 0 else f"{sample_id}#e{epoch}"


class Replayer:
    """One `gkd replay` process: `await run(stop)`."""

    def __init__(self, s: ReplaySettings) -> None:
        if not s.dataset:
            raise SettingsError("dataset: expected a scored dataset folder (--from DIR), got none")
        if s.epochs < 0 or s.batch_size < 1:
            raise SettingsError(f"epochs >= 0 and batch_size >= 1 expected, got {s.epochs}, {s.batch_size}")
        self.s = s
        self.keys = s.run.keys
        self.reader = DatasetReader(s.dataset, verify=s.verify)
        self.manifest = self.reader.manifest
        if self.manifest.samples == 0:
            raise DatasetError(f"{s.dataset}: the dataset has no samples yet")
        self.summary = ReplaySummary()
        self.retry = RedisRetry(f"replay {s.name}")
        self.counts = Counts()
        self.order = order_name(s.shuffle, s.seed)
        self._check_tokenizer()

    def _check_tokenizer(self) -> None:
        want, have = self.s.tokenizer, self.manifest.tokenizer_fingerprint
        if not want:
            return
        from transformers import AutoTokenizer

        ours = tokenizer_fingerprint(AutoTokenizer.from_pretrained(want))
        if have is None:
            log.warning("dataset has no tokenizer fingerprint: cannot check it against %s", want)
        elif have != ours:
            raise DatasetError(
                f"{self.s.dataset}: tokenizer differs: the dataset was exported with {have}, "
                f"--tokenizer {want} is {ours}; its token ids would mean other strings"
            )

    def fixed_settings(self) -> dict[str, object]:
        """What the run's config must agree with (written there when missing)."""
        fixed = self.manifest.identity()
        fixed[Config.PARTITIONS] = 1  # its cursor and ready stream share one slot: one partition only
        if self.manifest.tokenizer_fingerprint:
            fixed[Config.TOKENIZER_FINGERPRINT] = self.manifest.tokenizer_fingerprint
        return fixed

    async def run(self, stop: asyncio.Event) -> ReplaySummary:
        s = self.s
        self.r: aioredis.Redis = connect(s.run.redis_url, cluster=s.run.redis_cluster)
        self._commit = self.r.register_script(_COMMIT)
        self.bp = Backpressure(self.r, self.keys.ready, s.flow.marks)
        beat = Heartbeat(
            self.r, self.keys, s.name, Role.REPLAY, fields=self._heartbeat_fields, counts=self.counts
        )
        aux = [asyncio.create_task(beat.run())]
        try:
            await self._check_run(stop)
            await self.retry.call("create groups", lambda: ensure_groups(self.r, self.keys), stop=stop)
            if s.serve_rollouts:
                from pipeline.dataset.serve import RolloutServer

                server = RolloutServer(self.r, self.keys, s, self.bp, self.summary, self.counts)
                aux.append(asyncio.create_task(server.run(stop)))
            await self._epochs(stop)
            if s.serve_rollouts:
                await aux[-1]
            await self.retry.call("count", lambda: self.counts.flush(self.r, self.keys), attempts=5)
            await beat.remove()
        finally:
            for t in aux:
                t.cancel()
            await asyncio.gather(*aux, return_exceptions=True)
            await self.r.aclose()
        return self.summary

    async def _check_run(self, stop: asyncio.Event) -> None:
        """Refuse a run with another teacher, k or dtype (naming them), else record ours in its config."""
        config = await self.retry.call("read config", lambda: read_config(self.r, self.keys), stop=stop)
        self.manifest.check_compatible(
            teacher=config.get(Config.TEACHER_MODEL),
            k=int(config[Config.K]) if Config.K in config else None,
            logprob_dtype=config.get(Config.LOGPROB_DTYPE),
            where=f"run {self.keys.run!r} has",
        )
        fixed = self.fixed_settings()
        await self.retry.call("check config", lambda: check_run_config(self.r, self.keys, fixed), stop=stop)

    async def _cursor(self) -> Cursor:
        key = self.keys.replay(self.manifest.dataset_id)
        raw: Any = await self.retry.call("read the cursor", lambda: self.r.hgetall(key))
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return Cursor(
            epoch=int(d.get(K.REPLAY_EPOCH, 0)),
            pos=int(d.get(K.REPLAY_POS, 0)),
            shards=int(d.get(K.REPLAY_SHARDS, 0) or 0),
            order=d.get(K.REPLAY_ORDER, ""),
        )

    def _check_resume(self, c: Cursor) -> None:
        if c.pos > 0 and c.order and c.order != self.order:
            raise SettingsError(
                f"replay of dataset {self.manifest.dataset_id[:8]} into run {self.keys.run!r} stopped in "
                f"epoch {c.epoch} at sample {c.pos} with order {c.order!r}; resume it with the same "
                f"order (this process has {self.order!r}: --shuffle/--seed)"
            )

    async def _epochs(self, stop: asyncio.Event) -> None:
        s = self.s
        c = await self._cursor()
        self._check_resume(c)
        if c.epoch >= s.epochs:
            log.info(
                "dataset already replayed %d epoch(s) into run %r: nothing to do", c.epoch, self.keys.run
            )
        while c.epoch < s.epochs and not stop.is_set():
            c = await self._one_epoch(c, stop)
            self._check_resume(c)
        self.summary.epochs_done = c.epoch

    async def _one_epoch(self, c: Cursor, stop: asyncio.Event) -> Cursor:
        """Replay from cursor `c` towards the end of its epoch; returns the cursor reached. Returns
        early, with the cursor as Redis has it, when a write did not land as planned (the caller goes
        on from there: a lost reply, another replay of the same dataset)."""
        n_shards = c.shards if c.pos > 0 else len(self.manifest.shards)
        total = sum(self.reader.shard_sizes[:n_shards])
        t0, start, last_log = time.monotonic(), c.pos, time.monotonic()
        log.info("epoch %d: %d samples from %d shards (%s), from sample %d",
                 c.epoch, total, n_shards, self.order, c.pos)  # fmt: skip
        batch: list[tuple[str, bytes]] = []
        samples = self.reader.epoch(
            shuffle=self.s.shuffle, seed=self.s.seed, epoch=c.epoch, n_shards=n_shards, start=c.pos
        )
        for pos, sample in samples:
            sample.rollout.id = replay_id(sample.rollout.id, c.epoch)
            batch.append((sample.rollout.id, encode_scored(sample)))
            if len(batch) < self.s.batch_size and pos.index < total - 1:
                continue
            c, landed = await self._write(c, batch, n_shards, total, stop)
            batch = []
            if not landed or stop.is_set() or c.pos == 0:
                return c
            if time.monotonic() - last_log >= 10:
                last_log = time.monotonic()
                rate = (c.pos - start) / max(last_log - t0, 1e-9)
                log.info("epoch %d: %d / %d samples (%.0f/s)", c.epoch, c.pos, total, rate)
        return c

    async def _write(
        self, c: Cursor, batch: list[tuple[str, bytes]], n_shards: int, total: int, stop: asyncio.Event
    ) -> tuple[Cursor, bool]:
        """Write one batch at cursor `c` (after waiting for room): (the cursor after it, True), or
        (the cursor Redis has, False) when it was not written by this call."""
        await self.retry.call("wait for room", lambda: self.bp.wait_for_room(stop), stop=stop)
        if stop.is_set():
            return c, False
        end = c.pos + len(batch)
        done = end >= total
        new = Cursor(c.epoch + 1 if done else c.epoch, 0 if done else end, n_shards, self.order)
        args: list[Any] = [c.epoch, c.pos, new.epoch, new.pos, n_shards, self.order,
                           int(time.time() * 1000), self.keys.ready.bytes_in, Stat.REPLAYED]  # fmt: skip
        for rid, payload in batch:
            args += [rid, payload]
        keys = [self.keys.ready.key, self.keys.replay(self.manifest.dataset_id), self.keys.stats]
        try:
            res = await self._commit(keys=keys, args=args)
        except RedisUnavailable as exc:
            # The batch may or may not have landed (the reply was lost): the cursor tells.
            log.warning("writing a batch failed (%r); reading the cursor", exc)
            await asyncio.sleep(0.2)
            return await self._cursor(), False
        if int(res[0]) == 1:
            self.summary.written += len(batch)
            return new, True
        found = Cursor(int(res[1]), int(res[2]), int(res[3] or 0), (res[4] or b"").decode())
        log.info("the cursor was moved by another replay: epoch %d, sample %d", found.epoch, found.pos)
        return found, False

    def _heartbeat_fields(self) -> dict[str, object]:
        return {HB.REPLAYED: self.summary.written, HB.SERVED: self.summary.served, HB.DATASET: self.s.dataset}
