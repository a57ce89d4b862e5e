"""The settings sections the processes of a run share: the run itself and the flow of work.

Each process's settings dataclass embeds them with `pipeline.settings.section`, exposing the fields it
uses (``--run``, ``--k``, ``--high-water``, ... keep their names for users). Validation lives here, once.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pipeline.errors import SettingsError
from pipeline.queue.schema import DEAD_MAX_ENTRIES, DEAD_MAX_PAYLOAD_BYTES, DEFAULT_RUN, Config, RunKeys
from pipeline.settings import mask_url, section, setting

#: Teacher modes: the top-k per position, or draws from the teacher's distribution (RS-KD).
TOPK, SAMPLED = "topk", "sampled"
TEACHER_MODES = (TOPK, SAMPLED)
LOSS_MODES = ("tail", "renorm", SAMPLED)
#: Most draws per position (the wire format's largest k, `pipeline.wire.codec.Limits.max_k`).
MAX_SAMPLES = 256

if TYPE_CHECKING:  # imported when used: it pulls in redis, which `gkd workers` loads after its signals
    from pipeline.queue.backpressure import WaterMarks
    from pipeline.queue.durable import Replicas


@dataclasses.dataclass
class RunSettings:
    """The run a process joins: where it lives, and the settings fixed for the whole run."""

    # --run-name: under torchrun, `--run` is taken as an abbreviation of torchrun's own --run-path.
    name: str = setting(
        DEFAULT_RUN,
        "Run name: every Redis key of the run carries it as the hash tag {run}.",
        name="run",
        flags=("--run-name",),
    )
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "Redis URL (redis://[:password@]host:port/db, or rediss:// for TLS).",
        flags=("--redis",),
        secret=True,
    )
    redis_cluster: bool = setting(
        False,
        "The Redis URL names a seed node of a Redis Cluster: use the cluster client (MOVED/ASK, failover).",
    )
    partitions: int = setting(
        1,
        "Partitions of the run (fixed for the run): each has its own streams under the hash tag "
        "{run.p}, so a Redis Cluster spreads them over its masters.",
    )
    redis_min_replicas: int = setting(
        -1,
        "After each producer batch, handoff and trainer read and acknowledgement, WAIT for this many "
        "replicas to have it (-1: 1 with --redis-cluster, else 0).",
    )
    redis_wait_ms: int = setting(1000, "Longest WAIT for those replicas; a shorter answer is logged.")
    k: int = setting(20, "Teacher top-k logprobs per position (fixed for the run; checked on every sample).")
    logprob_dtype: str = setting(
        "float16", "dtype of the stored top-k logprobs (fixed for the run).", choices=("float16", "float32")
    )
    loss_mode: str = setting(
        "tail",
        "Loss: tail (top-k + rest), renorm (renormalized over the top-k) or sampled (RS-KD on a sampled "
        "teacher's draws, --samples; forward KL, --beta 0 only).",
        choices=LOSS_MODES,
    )
    teacher_mode: str = setting(
        TOPK,
        "What the teacher sends per position: topk (its --k most likely tokens) or sampled (the distinct "
        "tokens of --samples draws from its distribution, with counts: RS-KD; the reference teacher only).",
        choices=TEACHER_MODES,
    )
    samples: int = setting(
        16,
        "Sampled runs: teacher draws per position (a row holds at most this many distinct tokens; fixed "
        "for the run in place of --k).",
    )

    def __post_init__(self) -> None:
        RunKeys.for_run(self.name)  # raises SettingsError naming the rule
        check_redis_url(self.redis_url)
        if self.k < 1:
            raise SettingsError(f"k: expected >= 1, got {self.k}")
        RunKeys(self.name).parts(self.partitions)  # raises SettingsError naming the range
        if self.redis_min_replicas < -1 or self.redis_wait_ms < 1:
            raise SettingsError(
                f"redis_min_replicas, redis_wait_ms: expected >= -1 and >= 1, got "
                f"{self.redis_min_replicas} and {self.redis_wait_ms}"
            )
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise SettingsError(f"samples: expected an int in [1, {MAX_SAMPLES}], got {self.samples}")

    @property
    def sampled(self) -> bool:
        """A sampled run: workers draw (--teacher-mode sampled), a trainer trains on draws (--loss-mode
        sampled). Each process exposes one of the two flags."""
        return self.teacher_mode == SAMPLED or self.loss_mode == SAMPLED

    @property
    def width(self) -> int:
        """Teacher entries per position on the wire: --samples in a sampled run, else --k."""
        return self.samples if self.sampled else self.k

    @property
    def keys(self) -> RunKeys:
        return RunKeys(self.name)

    @property
    def parts(self) -> list[RunKeys]:
        """The keys of each partition ([keys] for a one-partition run)."""
        return self.keys.parts(self.partitions)

    @property
    def min_replicas(self) -> int:
        """Replicas to WAIT for after a handoff or acknowledgement (the -1 default resolved)."""
        if self.redis_min_replicas >= 0:
            return self.redis_min_replicas
        return 1 if self.redis_cluster else 0

    def replicas(self, r: Any) -> Replicas:
        """What writes of client `r` wait for (`pipeline.queue.durable`)."""
        from pipeline.queue.durable import Replicas

        return Replicas(r, self.min_replicas, self.redis_wait_ms)

    def fixed(self, *fields: str) -> dict[str, object]:
        """The values of these run-config fields (`schema.Config`), for `check_run_config`."""
        values: dict[str, object] = {
            Config.K: self.width,
            Config.TEACHER_MODE: SAMPLED if self.sampled else TOPK,
            Config.LOGPROB_DTYPE: self.logprob_dtype,
            Config.LOSS_MODE: self.loss_mode,
            Config.PARTITIONS: self.partitions,
        }
        return {f: values[f] for f in fields}


#: The RunSettings fields every process that joins a run exposes next to its name and URL.
REDIS_LAYOUT = ("redis_cluster", "partitions", "redis_min_replicas", "redis_wait_ms")

#: URL schemes redis-py connects with.
REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_redis_url(url: str, name: str = "redis_url") -> None:
    """Raise SettingsError naming the fix unless `url` is a Redis URL redis-py can connect with."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in REDIS_SCHEMES and rest:
        return
    guess = mask_url(f"redis://{rest if sep else url}")
    guess = guess if guess.count("/") > 2 else guess + "/0"
    got = mask_url(url) if sep else mask_url(f"redis://{url}").removeprefix("redis://")
    raise SettingsError(
        f"{name}: expected a URL redis://[:password@]host:port/db (rediss:// for TLS, unix:///path), got "
        f"{got!r}; did you mean {guess!r}? (--redis or GKD_REDIS_URL)"
    )


@dataclasses.dataclass
class FlowSettings:
    """How work flows through a stream: backpressure on the stream a process feeds, leases on the one
    it reads."""

    high_water: int = setting(4096, "Pause when the stream this process feeds holds this many entries.")
    low_water: int = setting(2048, "Resume once it holds no more than this many entries.")
    high_water_bytes: int = setting(512 * 2**20, "Pause when that stream holds this many payload bytes.")
    low_water_bytes: int = setting(256 * 2**20, "Resume once it holds no more than this many bytes.")
    lease_ms: int = setting(
        60_000,
        "Lease on a read entry, renewed while it is held: idle longer (its process died or stalled) and "
        "another process may reclaim it.",
    )
    max_deliveries: int = setting(5, "An entry delivered more often than this goes to the dead stream.")
    dead_max_entries: int = setting(
        DEAD_MAX_ENTRIES, "The dead stream keeps about this many records (older ones are trimmed, counted)."
    )
    dead_max_payload_bytes: int = setting(
        DEAD_MAX_PAYLOAD_BYTES, "A dead record keeps at most this many payload bytes (cut beyond, marked)."
    )

    def __post_init__(self) -> None:
        try:
            self.marks  # noqa: B018 -- WaterMarks validates the marks
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if min(self.max_deliveries, self.dead_max_entries, self.dead_max_payload_bytes) < 1:
            raise SettingsError(
                f"max_deliveries, dead_max_entries, dead_max_payload_bytes: expected >= 1, got "
                f"{self.max_deliveries}, {self.dead_max_entries}, {self.dead_max_payload_bytes}"
            )
        if self.lease_ms < 10 or self.max_deliveries < 1:
            raise SettingsError(
                f"lease_ms, max_deliveries: expected >= 10 and >= 1, "
                f"got {self.lease_ms}, {self.max_deliveries}"
            )

    @property
    def marks(self) -> WaterMarks:
        from pipeline.queue.backpressure import WaterMarks

        return WaterMarks(self.high_water, self.low_water, self.high_water_bytes, self.low_water_bytes)


@dataclasses.dataclass
class CommonSettings:
    """Settings every process has: the run it joins (name and Redis) and its log level."""

    run: RunSettings = section(RunSettings, "name", "redis_url", *REDIS_LAYOUT)
    log_level: str = setting("info", "Log level.", choices=("debug", "info", "warning", "error"))
