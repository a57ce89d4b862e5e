"""Redis Cluster clients (`--redis-cluster`): redis-py's cluster clients with the project's errors.

The URL names any node of the cluster (a seed): the client learns the slot map from it, follows MOVED
and ASK redirections, and refreshes the map after a failover. Every key of a run partition carries one
hash tag (`pipeline.queue.schema`), so each script and MULTI lands in one slot. Errors are mapped by
`pipeline.queue.connection.translate` like the single-node client's; a few quick retries inside the
client ride over a redirection to a promoted replica, the loops' `RedisRetry` does the rest.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio.cluster as aiocluster
import redis.cluster
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from pipeline.queue.connection import guarded, guarded_sync, translated


def _retry() -> Retry:
    """Quick retries inside the cluster client: enough to follow a failover's new slot map."""
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 3)


class _Pipeline(aiocluster.ClusterPipeline):
    gkd_where = ""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        return translated(await guarded(self.gkd_where, super().execute(raise_on_error, allow_redirections)))


class AsyncClusterClient(aiocluster.RedisCluster):
    gkd_where = ""

    async def initialize(self, *args: Any, **kwargs: Any) -> AsyncClusterClient:
        # Learning the slot map talks to the nodes outside execute_command (also from multi-key
        # commands such as DELETE): a node that is down must surface as RedisUnavailable there too.
        await guarded(self.gkd_where, super().initialize(*args, **kwargs))
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await guarded(self.gkd_where, super().execute_command(*args, **kwargs), scripts=True)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> _Pipeline:
        pipe = _Pipeline(self, transaction)  # type: ignore[abstract]
        pipe.gkd_where = self.gkd_where
        return pipe


class _SyncPipeline(redis.cluster.ClusterPipeline):
    gkd_where = ""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        call = super().execute
        return translated(guarded_sync(self.gkd_where, lambda: call(raise_on_error)))


class SyncClusterClient(redis.cluster.RedisCluster):
    gkd_where = ""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        call = super().execute_command
        return guarded_sync(self.gkd_where, lambda: call(*args, **kwargs), scripts=True)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = _SyncPipeline  # redis-py builds it with the client's internals
        pipe.gkd_where = self.gkd_where
        return pipe


def cluster_client(url: str, cls: type[Any], *, socket_timeout_s: float, connect_timeout_s: float) -> Any:
    """A cluster client of class `cls` (`AsyncClusterClient` or `SyncClusterClient`) seeded by `url`
    (password and TLS from the URL as for one node; database 0 only)."""
    return cls.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=_retry(),
    )
