"""The Redis schema of a run: the only module that spells a key, a group, a field, a counter, a stage.

Every key carries a hash tag so that MULTI/Lua work in a Redis Cluster. For the run ``demo`` the
rollouts stream is ``gkd:{demo}:rollouts``. A run of P > 1 partitions (`RunKeys.parts`) keeps partition
p's streams, groups, journal, batch markers and partition counters under the hash tag ``{demo.p}``
(``gkd:{demo.3}:ready``, ``gkd:{demo.3}:stats``); run-wide keys (config, policy, the run's `stats`,
heartbeats, replay cursors) stay under ``{demo}``. A one-partition run keeps the names above. A test
(tests/test_schema.py) checks that no other module of `pipeline/` or `workers/` spells these names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import SettingsError

PREFIX = "gkd"
DEFAULT_RUN = "gkd"

#: Consumer group names on the two work streams.
TEACHERS_GROUP = "teachers"
TRAINERS_GROUP = "trainers"

#: Fields of an entry in the rollouts and ready streams.
FIELD_ID = "id"
FIELD_DATA = "data"

#: Extra fields of an entry in the dead stream (besides FIELD_ID and FIELD_DATA).
FIELD_STAGE = "stage"
FIELD_REASON = "reason"
FIELD_DELIVERIES = "deliveries"
FIELD_CUT_FROM = "cut_from"
"""Present when the payload was cut to the dead stream's size limit: the original length in bytes."""

#: Extra fields of an entry in the trained journal (besides FIELD_ID and FIELD_DATA, the rollout).
FIELD_STEP = "step"
"""The optimizer step that trained the sample."""
FIELD_CONSUMER = "consumer"
"""The trainer consumer that trained it."""

#: Default bounds of the dead stream: entries kept (older ones are trimmed, and counted), and the
#: payload bytes kept per record (longer payloads are cut; the record says so).
DEAD_MAX_ENTRIES = 10_000
DEAD_MAX_PAYLOAD_BYTES = 64 * 1024

#: A producer's batch marker lives this long: far above any retry of a lost reply (see streams.py).
BATCH_MARKER_TTL_MS = 6 * 3600 * 1000

#: Fields of the policy hash.
POLICY_VERSION = "version"
POLICY_CHECKPOINT = "checkpoint"
POLICY_UPDATED_MS = "updated_ms"

#: Fields of a replay cursor hash (`RunKeys.replay`): where the replay of one dataset into the run stands.
REPLAY_EPOCH = "cursor_epoch"
"""The epoch in progress (0-based); equals the epochs replayed once it reaches them."""
REPLAY_POS = "cursor_pos"
"""Samples of that epoch already in ready."""
REPLAY_SHARDS = "cursor_shards"
"""Shards the epoch in progress spans (a dataset may grow while it is replayed)."""
REPLAY_ORDER = "cursor_order"
""""sequential" or "shuffle:<seed>"."""
REPLAY_UPDATED_MS = "updated_ms"

_RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

#: The name of the unnamed teacher (`--teacher URL`): rollouts that name no teacher go to it.
DEFAULT_TEACHER = "default"
#: Teacher names: like run names (they appear in config fields, counters, heartbeats and metric labels).
TEACHER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class HB:
    """Fields of a process's heartbeat hash. The first five every process writes; the rest are
    optional extras that `gkd status` shows when present (see pipeline.monitor.report)."""

    HOST = "host"
    PID = "pid"
    ROLE = "role"
    IN_FLIGHT = "in_flight"
    LAST_SEEN_MS = "last_seen_ms"
    LATENCY_P50_MS = "latency_p50_ms"
    """Teacher request latency percentiles of a worker over its recent requests (float ms)."""
    LATENCY_P95_MS = "latency_p95_ms"
    PAUSED = "paused"
    """"1" while the process waits for room in the stream it feeds (backpressure), else "0"."""
    POSITIONS = "positions"
    SCORED = "scored"
    TEACHER = "teacher"
    STEP = "step"
    POLICY_VERSION = "policy_version"
    PRODUCED = "produced"
    EXPORTED = "exported"
    """Samples a `gkd export` process committed to its dataset."""
    DATASET = "dataset_dir"
    """The dataset folder of `gkd export` / `gkd replay`."""
    REPLAYED = "replayed"
    """Samples a `gkd replay` process added to ready."""
    SERVED = "served"
    """Rollouts `gkd replay --serve-rollouts` scored from its dataset."""
    INSTANCE = "instance"
    """A random id per process: a second live process with the same name finds another's here."""
    TEACHERS = "teachers"
    """A worker's teacher names, comma-separated (per-teacher fields follow, see `per_teacher`)."""
    T_MODEL = "model_id"
    T_POSITIONS = "positions"
    T_SCORED = "scored"
    T_ERRORS = "teacher_errors"
    T_WAITING = "waiting_rollouts"
    """Rollouts this worker holds that wait for the teacher (down, or at its in-flight limit)."""
    T_BREAKER = "breaker_state"
    """"closed", or "open n/m" (n of its m endpoints' circuit breakers open)."""
    T_DOWN_S = "teacher_down_s"
    """Seconds since the teacher stopped answering this worker (absent while it answers)."""

    @staticmethod
    def per_teacher(name: str, field: str) -> str:
        """The heartbeat field of one teacher's figure, e.g. ``teacher.math.latency_p50_ms``."""
        return f"teacher.{name}.{field}"

    @staticmethod
    def split_teacher(key: str) -> tuple[str, str] | None:
        """(teacher, field) of a `per_teacher` field name; None for any other field."""
        if not key.startswith("teacher.") or key.count(".") < 2:
            return None
        name, _, fld = key[len("teacher.") :].partition(".")
        return name, fld

    BASE = (HOST, PID, ROLE, IN_FLIGHT, LAST_SEEN_MS)


class Role:
    """Values of the heartbeat's `role` field."""

    WORKER = "worker"
    TRAINER = "trainer"
    PRODUCER = "rollouts"
    EXPORT = "export"
    REPLAY = "replay"


class Config:
    """Fields of the run's `config` hash: the settings fixed for the whole run."""

    K = "k"
    """Teacher entries per position: the top-k, or in a sampled run the draws n (`--samples`)."""
    TEACHER_MODE = "teacher_mode"
    """`topk` or `sampled` (RS-KD: draws with counts, ScoredSample version 2)."""
    TEACHER_MODEL = "teacher_model"
    LOGPROB_DTYPE = "logprob_dtype"
    LOSS_MODE = "loss_mode"
    TOKENIZER_FINGERPRINT = "tokenizer_fingerprint"
    """Set by `gkd replay` from the dataset's manifest, when it has one."""
    TEACHER_TOKENIZER = "teacher_tokenizer"
    """Fingerprint of the teacher's tokenization of probe texts (pipeline.vocab); the student's must match."""
    TEACHER_TOKENIZER_SIZE = "teacher_tokenizer_size"
    """Tokens in the teacher's tokenizer, when its server says: the student's vocabulary must cover them."""
    PARTITIONS = "partitions"
    """Partitions of the run (`RunKeys.parts`); a run without the field has one."""
    TEACHER_MAX_MODEL_LEN = "teacher_max_model_len"
    """Longest sequence the run's teachers accept; recorded, not compared (a teacher may be restarted
    with another context length). Producers refuse prompts that cannot fit."""
    TEACHERS = "teachers"
    """The run's teacher names, sorted and comma-separated (``default`` is the unnamed `--teacher URL`);
    every worker of the run serves all of them."""

    @staticmethod
    def teacher_model(name: str) -> str:
        """The field of one named teacher's model id (the default teacher keeps `TEACHER_MODEL`)."""
        return Config.TEACHER_MODEL if name == DEFAULT_TEACHER else f"{Config.TEACHER_MODEL}.{name}"


class Stage:
    """Dead-letter stages: where a record failed for good."""

    DECODE = "decode"
    """A worker could not decode the rollout."""
    TEACHER = "teacher"
    """The teacher refused it for good, or workers kept dying on it (too many deliveries)."""
    ENCODE = "encode"
    """A worker could not encode the scored sample."""
    TRAINER = "trainer"
    """A trainer cannot train the sample (undecodable, another k, ids beyond the vocabulary, ...)."""
    EXPORT = "export"
    """`gkd export` cannot write the sample (undecodable, another teacher, k or dtype than the dataset)."""


class Stat:
    """Field names of the monotonic counters in the `stats` hash."""

    ROLLOUTS_PRODUCED = "rollouts_produced"
    SCORED = "scored"
    SCORED_POSITIONS = "scored_positions"
    DEAD = "dead"
    TEACHER_ERRORS = "teacher_errors"
    TEACHER_RETRIES = "teacher_retries"
    TEACHER_REQUESTS = "teacher_requests"
    TEACHER_LATENCY_MS_SUM = "teacher_latency_ms_sum"
    RECLAIMED = "reclaimed"
    TRAINED_SAMPLES = "trained_samples"
    TRAINED_TOKENS = "trained_tokens"
    TRAINER_STEPS = "trainer_steps"
    STALE_SKIPPED = "stale_skipped"
    DATA_WAIT_MS = "data_wait_ms"
    STEP_MS = "step_ms"
    EXPORTED = "exported"
    REPLAYED = "replayed"
    CACHE_SCORED = "cache_scored"
    REQUEUED = "requeued"
    """Trained samples whose steps no checkpoint kept, put back into rollouts by a resume."""
    JOURNAL_DROPPED = "journal_dropped"
    """Journal entries a resume found already inside its checkpoint (deleted, not requeued)."""
    DEAD_TRIMMED = "dead_trimmed"
    """Dead letters removed to keep the dead stream under its entry limit."""
    DEAD_CUT = "dead_cut"
    """Dead letters whose payload was cut to the size limit."""

    @staticmethod
    def per_teacher(name: str, stat: str) -> str:
        """The counter of one teacher's share of `stat` (SCORED, SCORED_POSITIONS, TEACHER_REQUESTS,
        TEACHER_ERRORS, TEACHER_LATENCY_MS_SUM), e.g. ``scored_positions.teacher.math``."""
        return f"{stat}.teacher.{name}"

    @staticmethod
    def split_teacher(key: str) -> tuple[str, str] | None:
        """(teacher, stat) of a `per_teacher` counter name; None for any other counter."""
        stat, sep, name = key.partition(".teacher.")
        return (name, stat) if sep and name else None


@dataclass(frozen=True)
class Stream:
    """One stream of a run (or of one partition): its key, its consumer group (None for `dead`) and its
    byte counters (in the `stats` hash of the same hash tag)."""

    run: RunKeys
    kind: str
    """"rollouts", "ready", "dead" or "trained" (the journal)."""

    @property
    def key(self) -> str:
        return self.run.part_key(self.kind)

    def of(self, part: RunKeys) -> Stream:
        """The same stream of another partition."""
        return Stream(part, self.kind)

    @property
    def group(self) -> str | None:
        return {"rollouts": TEACHERS_GROUP, "ready": TRAINERS_GROUP}.get(self.kind)

    @property
    def bytes_in(self) -> str:
        """`stats` counter of payload bytes ever added to the stream."""
        return f"{self.kind}_bytes_in"

    @property
    def bytes_out(self) -> str:
        """`stats` counter of payload bytes ever removed (acknowledged or dead-lettered) from it."""
        return f"{self.kind}_bytes_out"

    @property
    def counts_bytes(self) -> bool:
        """Whether `stats` tracks the payload bytes in this stream (all but `dead`)."""
        return self.kind != "dead"

    @property
    def dead_counter(self) -> str:
        """`stats` counter of entries dead-lettered from the stream."""
        return f"dead_{self.kind}"


#: Most partitions a run may have (each is a few streams; more spread no better over a cluster's slots).
MAX_PARTITIONS = 1024


@dataclass(frozen=True)
class RunKeys:
    """All keys of one run, or of one partition of it. Build with ``RunKeys.for_run("demo")``; the keys
    of partition p of a P-partition run with ``keys.parts(P)[p]``."""

    run: str
    partition: int | None = None
    """None: the run's own keys (also partition 0 of a one-partition run); p: partition p of P > 1."""

    @classmethod
    def for_run(cls, run: str) -> RunKeys:
        """Validate the run name (letters, digits, ``_.-``, 1-64 chars) and return its keys."""
        if not _RUN_NAME.match(run):
            raise SettingsError(f"run name: expected 1-64 characters from [A-Za-z0-9_.-], got {run!r}")
        return cls(run)

    @property
    def tag(self) -> str:
        """The hash tag of the partition's keys: ``demo`` (run-wide, one partition) or ``demo.3``."""
        return self.run if self.partition is None else f"{self.run}.{self.partition}"

    @property
    def index(self) -> int:
        """The partition's number (0 for the run's own keys)."""
        return self.partition or 0

    def parts(self, partitions: int) -> list[RunKeys]:
        """The keys of each partition of a run of `partitions` partitions: [self] for one."""
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise SettingsError(f"partitions: expected 1..{MAX_PARTITIONS}, got {partitions}")
        if partitions == 1:
            return [RunKeys(self.run)]
        return [RunKeys(self.run, p) for p in range(partitions)]

    def stats_keys(self, partitions: int) -> list[str]:
        """Every `stats` hash of the run: its own, then one per partition when P > 1 (scripts count what
        they move in their partition's hash; a counter's total is the sum over these)."""
        own = RunKeys(self.run).stats
        return [own] if partitions == 1 else [own, *(p.stats for p in self.parts(partitions))]

    def key(self, suffix: str) -> str:
        """The run-wide key ``gkd:{run}:<suffix>``."""
        return f"{PREFIX}:{{{self.run}}}:{suffix}"

    def part_key(self, suffix: str) -> str:
        """The partition's key ``gkd:{run.p}:<suffix>`` (``gkd:{run}:<suffix>`` for the run's own)."""
        return f"{PREFIX}:{{{self.tag}}}:{suffix}"

    @property
    def rollouts(self) -> Stream:
        """Rollouts waiting for (or being scored by) the teacher workers; group `teachers`."""
        return Stream(self, "rollouts")

    @property
    def ready(self) -> Stream:
        """ScoredSamples waiting for (or trained but not yet checkpointed by) trainers; group `trainers`."""
        return Stream(self, "ready")

    @property
    def dead(self) -> Stream:
        """Dead-lettered entries with stage, reason, deliveries and the original payload."""
        return Stream(self, "dead")

    @property
    def journal(self) -> Stream:
        """Compact rollouts of trained samples that no checkpoint includes yet, with their step."""
        return Stream(self, "trained")

    def batch_marker(self, batch_id: str) -> str:
        """Key (with TTL) written with a producer's batch: it landed, whatever happened to the reply."""
        return self.part_key(f"batch:{batch_id}")

    @property
    def all_streams(self) -> tuple[Stream, Stream, Stream, Stream]:
        """Every stream of the run: rollouts, ready, dead and the trained journal."""
        return self.rollouts, self.ready, self.dead, self.journal

    @property
    def work_streams(self) -> tuple[Stream, Stream]:
        """The two streams with consumer groups: rollouts and ready."""
        return self.rollouts, self.ready

    @property
    def stats(self) -> str:
        """Hash of monotonic counters (field names in `Stat`): the partition's for partition keys."""
        return self.part_key("stats")

    @property
    def policy(self) -> str:
        """Hash with the latest published student policy: version, checkpoint, updated_ms."""
        return self.key("policy")

    @property
    def config(self) -> str:
        """Hash of the run's fixed settings (fields in `Config`), checked by every joining process."""
        return self.key("config")

    def replay(self, dataset_id: str) -> str:
        """Hash with the cursor of the replay of one scored dataset into this run (REPLAY_* fields)."""
        return self.key(f"replay:{dataset_id}")

    def worker(self, name: str) -> str:
        """Heartbeat hash (with TTL) of one process (fields in `HB`)."""
        return self.key(f"worker:{name}")

    @property
    def worker_pattern(self) -> str:
        """SCAN pattern matching every heartbeat key of the run (braces escaped for glob)."""
        return f"{PREFIX}:\\{{{self.run}\\}}:worker:*"

    def worker_name(self, key: str) -> str:
        """The worker name inside a heartbeat key."""
        return key.rsplit(":worker:", 1)[1]

    @property
    def pattern(self) -> str:
        """SCAN pattern matching every key of the run (not of its partitions: `part_pattern`)."""
        return f"{PREFIX}:\\{{{self.run}\\}}:*"

    @property
    def part_pattern(self) -> str:
        """SCAN pattern matching every key of the run's partitions (P > 1)."""
        return f"{PREFIX}:\\{{{self.run}.[0-9]*\\}}:*"


#: SCAN pattern matching every key of every run.
ALL_RUNS_PATTERN = f"{PREFIX}:\\{{*"


def fold_partitions(tags: set[str]) -> set[str]:
    """Run names from the hash tags of keys: a tag ``<run>.<p>`` is a partition of ``<run>`` when that run
    has keys of its own (its config, stats, heartbeats), else a run of that name."""
    return {t for t in tags if not (t.rpartition(".")[2].isdigit() and t.rpartition(".")[0] in tags)}


def run_of_key(key: str) -> str:
    """The hash tag inside any key of a run: its name, or ``<run>.<p>`` for a key of partition p."""
    return key[len(PREFIX) + 2 :].split("}", 1)[0]
