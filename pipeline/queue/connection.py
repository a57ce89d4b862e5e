"""Redis connections: finite timeouts, redis-py's errors mapped to the project's, one retry policy.

Every process uses `connect()` (or `connect_sync()` for `gkd status`, the demo and tests). The clients
they return raise only `pipeline.errors` classes; this module is the one place that knows redis-py's
exceptions and Redis's error codes:

    connection refused or reset, timeout, LOADING, OOM, READONLY, ...  -> RedisUnavailable (retryable)
    (UNBLOCKED: a blocked read's stream moved to another cluster node)
    NOGROUP (a stream or group vanished: Redis lost its data)          -> StreamGroupMissing
    wrong password or user                                             -> RedisAuthError
    anything else Redis refuses (WRONGTYPE, a script error, ...)       -> RedisCommandError(code)

The clients do no retries of their own (a dead server is noticed at once): every long-running loop
retries through `RedisRetry`, which backs off with capped, jittered delays and logs an outage once when
it begins and once when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import redis
import redis.asyncio as aioredis
import redis.asyncio.client as aioclient
import redis.client
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.errors import (
    GKDError,
    RedisAuthError,
    RedisCommandError,
    RedisUnavailable,
    StreamGroupMissing,
)
from pipeline.notice import WaitNotice
from pipeline.settings import mask_url

log = logging.getLogger("gkd.redis")
T = TypeVar("T")

#: Longest a blocking XREADGROUP may wait; socket timeouts are set above it.
MAX_BLOCK_MS = 2000

#: Error codes with which Redis says "not now" rather than "never": waited out like an outage.
_TRANSIENT_CODES = frozenset(
    {
        "LOADING",
        "OOM",
        "READONLY",
        "MASTERDOWN",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "BUSY",
        "MISCONF",
        "NOREPLICAS",
        "UNBLOCKED",
    }
)
#: How redis-py prefixes the error of one command of a pipeline it raises.
_IN_PIPELINE = " of pipeline caused error: "
_AUTH_CODES = frozenset({"NOAUTH", "WRONGPASS", "NOPERM"})
#: redis-py strips the code of the errors it knows from the message; these are the classes it uses.
_CLASS_CODES: dict[type[BaseException], str] = {
    rex.OutOfMemoryError: "OOM",
    rex.ReadOnlyError: "READONLY",
    rex.NoPermissionError: "NOPERM",
    rex.ExecAbortError: "EXECABORT",
    rex.NoScriptError: "NOSCRIPT",
}
FAILURES = (rex.RedisError, rex.RedisClusterException, OSError)


def translate(exc: BaseException, where: str = "") -> GKDError:
    """The project's error for a redis-py (or socket) failure; see the module docstring. `where` is the
    server's URL, password masked: every message about the server names it."""
    text = f"{type(exc).__name__}: {exc}"
    at = f" at {where}" if where else ""
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return _auth_error(at, text)
    if isinstance(exc, rex.BusyLoadingError):
        return RedisUnavailable(f"Redis{at} is loading its data ({text})")
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError | OSError | rex.RedisClusterException):
        return RedisUnavailable(f"cannot reach Redis{at} ({text})")
    code = _code(exc)
    if code == "NOGROUP":
        return StreamGroupMissing(f"stream or consumer group missing (Redis lost its data?): {exc}")
    if code in _TRANSIENT_CODES:
        return RedisUnavailable(f"Redis{at} cannot serve now ({text})")
    if code in _AUTH_CODES:
        return _auth_error(at, text)
    return RedisCommandError(code, text)


def _auth_error(at: str, text: str) -> RedisAuthError:
    return RedisAuthError(
        f"Redis{at} refused the credentials of the URL ({text}); expected the server's password: fix it "
        "in --redis or GKD_REDIS_URL (redis://:PASSWORD@host:port/db)"
    )


def _code(exc: BaseException) -> str:
    for cls, code in _CLASS_CODES.items():
        if isinstance(exc, cls):
            return code
    text = str(exc)
    if _IN_PIPELINE in text:  # redis-py prefixes a pipeline's error with the command that failed
        text = text.split(_IN_PIPELINE, 1)[1].lstrip("('\"")
    first = text.split(" ", 1)[0]
    return first if first.isupper() and first.isalpha() else "ERR"


def cancelled(exc: BaseException | None = None) -> None:
    """Raise CancelledError if the running task is being cancelled but the cancellation did not
    surface: redis-py sometimes absorbs one that lands inside a command (the command then returns or
    fails as a connection error), and a loop around it would never end (seen: a cancelled heartbeat
    loop went on in 75 of 200 tries). Needs Python >= 3.11 (`Task.cancelling`); a no-op before."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError from exc


def translated(results: list[Any]) -> list[Any]:
    """A pipeline's results with redis-py's exception objects replaced (raise_on_error=False)."""
    return [translate(x) if isinstance(x, FAILURES) else x for x in results]


async def guarded(where: str, call: Awaitable[T], *, scripts: bool = False) -> T:
    """Await a redis-py call with its failures raised as ours (`translate`, naming `where`) and a cancellation
    that redis-py absorbed raised again (`cancelled`). With `scripts`, NoScriptError passes as it is:
    redis-py's Script then loads the script and calls again."""
    try:
        out = await call
    except FAILURES as exc:
        if scripts and isinstance(exc, rex.NoScriptError):
            raise
        cancelled(exc)
        raise translate(exc, where) from exc
    cancelled()
    return out


def guarded_sync(where: str, call: Callable[[], T], *, scripts: bool = False) -> T:
    """`guarded` for the blocking client: `call()` with its failures raised as ours."""
    try:
        return call()
    except FAILURES as exc:
        if scripts and isinstance(exc, rex.NoScriptError):
            raise
        raise translate(exc, where) from exc


def where(client: Any) -> str:
    """The URL (password masked) a client of `connect`/`connect_sync` talks to."""
    return str(getattr(client, "gkd_where", "") or "")


class _Pipeline(aioclient.Pipeline):
    gkd_where = ""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return translated(await guarded(self.gkd_where, super().execute(raise_on_error)))


class _Client(aioredis.Redis):
    gkd_where = ""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        return await guarded(self.gkd_where, super().execute_command(*args, **options), scripts=True)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> _Pipeline:
        pipe = _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.gkd_where = self.gkd_where
        return pipe


class _SyncPipeline(redis.client.Pipeline):
    gkd_where = ""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        call = super().execute
        return translated(guarded_sync(self.gkd_where, lambda: call(raise_on_error)))


class _SyncClient(redis.Redis):
    gkd_where = ""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        call = super().execute_command
        return guarded_sync(self.gkd_where, lambda: call(*args, **options), scripts=True)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> _SyncPipeline:
        pipe = _SyncPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.gkd_where = self.gkd_where
        return pipe


def connect(
    url: str, *, socket_timeout_s: float = 10.0, connect_timeout_s: float = 5.0, cluster: bool = False
) -> aioredis.Redis:
    """An asyncio Redis client for `url` (``redis://``, ``rediss://`` for TLS, ``unix://``); with
    `cluster`, a Redis Cluster client seeded by that node (`pipeline.queue.cluster`).

    Responses are bytes (payloads are binary). Every command has a finite socket timeout.
    """
    if cluster:
        from pipeline.queue import cluster as rc

        timeout_s = max(socket_timeout_s, MAX_BLOCK_MS / 1000 + 5)
        c: Any = rc.cluster_client(
            url, rc.AsyncClusterClient, socket_timeout_s=timeout_s, connect_timeout_s=connect_timeout_s
        )
        c.gkd_where = mask_url(url)
        return c  # type: ignore[no-any-return]
    client: aioredis.Redis = _Client.from_url(
        url,
        decode_responses=False,
        socket_timeout=max(socket_timeout_s, MAX_BLOCK_MS / 1000 + 5),
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )
    client.gkd_where = mask_url(url)  # type: ignore[attr-defined]
    return client


def connect_sync(url: str, *, socket_timeout_s: float = 10.0, cluster: bool = False) -> redis.Redis:
    """A blocking Redis client (for `gkd status`, the demo and tests), same timeouts and errors."""
    if cluster:
        from pipeline.queue import cluster as rc

        try:  # the blocking cluster client learns the slot map as it is built
            c: Any = rc.cluster_client(
                url, rc.SyncClusterClient, socket_timeout_s=socket_timeout_s, connect_timeout_s=5.0
            )
        except FAILURES as exc:
            raise translate(exc, mask_url(url)) from exc
        c.gkd_where = mask_url(url)
        return c  # type: ignore[no-any-return]
    client: redis.Redis = _SyncClient.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=5.0,
        retry=Retry(NoBackoff(), 0),
    )
    client.gkd_where = mask_url(url)  # type: ignore[attr-defined]
    return client


class Stop(Protocol):
    """A stop flag: an `asyncio.Event`, or a `threading.Event` set from another thread."""

    def is_set(self) -> bool: ...


async def wait_event(event: Stop, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `event`; True if it is set."""
    if event.is_set():
        return True
    if isinstance(event, asyncio.Event):
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
    else:  # set from another thread: poll
        deadline = time.monotonic() + timeout_s
        while not event.is_set() and (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.05))
    return event.is_set()


class RedisRetry:
    """The retry policy of every loop that talks to Redis: capped, doubling, jittered backoff.

    An outage is logged once when it begins and once when it ends (not once per failed call);
    `on_failure` is called on every failed attempt (a metrics counter).
    """

    def __init__(
        self,
        who: str,
        *,
        first_s: float = 0.1,
        max_s: float = 5.0,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.who = who
        self.first_s = first_s
        self.max_s = max_s
        self.on_failure = on_failure
        self._down_since: float | None = None
        self._notice = WaitNotice(log, level=logging.WARNING)

    @property
    def down(self) -> bool:
        """The last attempt failed and none has succeeded since."""
        return self._down_since is not None

    async def call(
        self,
        what: str,
        fn: Callable[[], Awaitable[T]],
        *,
        stop: Stop | None = None,
        attempts: int | None = None,
        errors: tuple[type[BaseException], ...] = (RedisUnavailable,),
    ) -> T:
        """`await fn()` until it succeeds. Raises the last of `errors` once `stop` is set or after
        `attempts` failures; other errors (e.g. StreamGroupMissing) at once."""
        delay, failures = 0.0, 0
        while True:
            try:
                out = await fn()
            except errors as exc:
                failures += 1
                if (stop is not None and stop.is_set()) or (attempts is not None and failures >= attempts):
                    raise
                delay = await self.backoff(what, exc, delay, stop)
                continue
            self.recovered()
            return out

    async def backoff(self, what: str, exc: BaseException, delay: float, stop: Stop | None = None) -> float:
        """Note the failure, wait the next delay (ending early once `stop` is set); return that delay."""
        self.failed(what, exc)
        delay = min(max(delay * 2, self.first_s), self.max_s)
        wait_s = delay * random.uniform(0.5, 1.0)
        if stop is not None:
            await wait_event(stop, wait_s)
        else:
            await asyncio.sleep(wait_s)
        return delay

    def failed(self, what: str, exc: BaseException) -> None:
        if self.on_failure is not None:
            self.on_failure()
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("%s: %s failed (%s); retrying", self.who, what, exc)
        self._notice.waiting(f"{self.who}: still retrying ({what}: {exc})")

    def recovered(self) -> None:
        if self._down_since is not None:
            down_s = time.monotonic() - self._down_since
            self._down_since = None
            self._notice.over()
            log.info("%s: Redis answers again after %.1fs", self.who, down_s)


async def wait_for_redis(r: aioredis.Redis, who: str, stop: Stop | None = None) -> bool:
    """Wait until Redis answers a PING, saying so (with the URL) at once when it does not, and every ~30 s
    while it still does not. Returns False if `stop` was set first. Raises RedisAuthError (a wrong
    password cannot get better by waiting)."""
    notice = WaitNotice(log, level=logging.WARNING)
    delay, since = 0.0, time.monotonic()
    while stop is None or not stop.is_set():
        try:
            await r.ping()
        except RedisUnavailable as exc:
            if not delay:
                hint = "start it, or point --redis / GKD_REDIS_URL at it"
                log.warning("%s: waiting for Redis: %s; %s", who, exc, hint)
            notice.waiting(f"{who}: still waiting for Redis ({exc})")
            delay = min(max(delay * 2, 0.1), 2.0)
            if stop is not None:
                await wait_event(stop, delay)
            else:
                await asyncio.sleep(delay)
            continue
        if delay:
            log.info("%s: Redis at %s answers (after %.1fs)", who, where(r), time.monotonic() - since)
        return True
    return False
