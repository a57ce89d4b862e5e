"""Waiting for replicas (`--redis-min-replicas`): a write survives a failover only where a replica has it.

Redis replicates asynchronously: a master acknowledges a write before any replica has it, and a master
that dies then takes the write along when its replica is promoted. `Replicas` sends the write (a Lua
script, or commands such as XREADGROUP, which records a delivery) and then ``WAIT n timeout`` on the
same connection, in one pipeline: WAIT returns once n replicas have every earlier write of that
connection, or at the timeout with fewer. A short answer is logged (once per run of short answers) and
counted in `short`; the write itself stands (it cannot be taken back), and is then exposed to a
failover like any unwaited write. In a cluster the WAIT goes to the master of the write's slot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.errors import RedisCommandError
from pipeline.notice import WaitNotice
from pipeline.queue.connection import FAILURES, translate

log = logging.getLogger("gkd.redis")

#: Default longest wait for the replicas after a write.
WAIT_TIMEOUT_MS = 1000


class Replicas:
    """Writes of one client followed by WAIT for `n` replicas (a plain write when n is 0)."""

    def __init__(self, r: Any, n: int = 0, timeout_ms: int = WAIT_TIMEOUT_MS) -> None:
        if n < 0 or timeout_ms < 1:
            raise ValueError(f"replicas: expected n >= 0 and timeout_ms >= 1, got {n} and {timeout_ms}")
        self.r, self.n, self.timeout_ms = r, n, timeout_ms
        self.short = 0
        """Writes whose WAIT came back with fewer than `n` replicas."""
        self._cluster = hasattr(r, "get_node_from_key")
        self._notice = WaitNotice(log, level=logging.WARNING)

    async def call(self, key: str, queue: Callable[[Any], None]) -> list[Any]:
        """Run the commands `queue(pipe)` adds (all on `key`'s slot), then WAIT; their replies."""
        pipe = self.r.pipeline(transaction=False)
        queue(pipe)
        if self.n <= 0:
            return list(await pipe.execute())
        if self._cluster:
            try:
                node = self.r.get_node_from_key(key)
            except FAILURES as exc:  # no slot map yet, or the slot's master is gone: wait like an outage
                raise translate(exc) from exc
            pipe.execute_command("WAIT", self.n, self.timeout_ms, target_nodes=node)
        else:
            pipe.execute_command("WAIT", self.n, self.timeout_ms)
        *out, acked = await pipe.execute()
        self._note(int(acked), key)
        return out

    async def script(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """`script(keys, args)` (a redis-py Script), then WAIT. Loads the script where the server lacks it
        (a promoted replica may)."""
        if self.n <= 0:
            return await script(keys=keys, args=args)
        for attempt in (0, 1):
            try:
                (res,) = await self.call(
                    keys[0], lambda pipe: pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                )
                return res
            except RedisCommandError as exc:
                if exc.code != "NOSCRIPT" or attempt:
                    raise
                await self.r.script_load(script.script)
        raise AssertionError("unreachable")

    def _note(self, acked: int, key: str) -> None:
        if acked >= self.n:
            self._notice.over()
            return
        self.short += 1
        first = self._notice.waited_s == 0.0
        text = (
            f"only {acked} of {self.n} replicas confirmed a write to {key} within {self.timeout_ms} ms "
            f"({self.short} such writes so far): a failover of its master now could lose it; is a "
            f"replica down? (redis-cli -c CLUSTER SHARDS, INFO replication)"
        )
        if first:
            log.warning("%s", text)
        self._notice.waiting(text)
