"""The Redis key schema of a run: the only module that spells a key, a group, a field or a counter name.

Every key carries the hash tag ``{run}`` so that a run lives in one Redis Cluster slot and MULTI/Lua
work there. For the run ``demo`` the rollouts stream is ``gkd:{demo}:rollouts``.
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

#: Fields of the worker heartbeat hash.
HB_HOST = "host"
HB_PID = "pid"
HB_IN_FLIGHT = "in_flight"
HB_LAST_SEEN_MS = "last_seen_ms"
HB_ROLE = "role"

#: Fields of the policy hash.
POLICY_VERSION = "version"
POLICY_CHECKPOINT = "checkpoint"
POLICY_UPDATED_MS = "updated_ms"

_RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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

    @staticmethod
    def bytes_in(stream_kind: str) -> str:
        """Counter of payload bytes ever added to the stream ("rollouts" or "ready")."""
        return f"{stream_kind}_bytes_in"

    @staticmethod
    def bytes_out(stream_kind: str) -> str:
        """Counter of payload bytes ever removed (acknowledged or dead-lettered) from the stream."""
        return f"{stream_kind}_bytes_out"

    @staticmethod
    def dead_stage(stream_kind: str) -> str:
        """Counter of entries dead-lettered from the stream."""
        return f"dead_{stream_kind}"


@dataclass(frozen=True)
class RunKeys:
    """All keys of one run. Build with ``RunKeys.for_run("demo")``."""

    run: str

    @classmethod
    def for_run(cls, run: str) -> RunKeys:
        """Validate the run name (letters, digits, ``_.-``, 1-64 chars) and return its keys."""
        if not _RUN_NAME.match(run):
            raise SettingsError(f"run name: expected 1-64 characters from [A-Za-z0-9_.-], got {run!r}")
        return cls(run)

    def _key(self, suffix: str) -> str:
        return f"{PREFIX}:{{{self.run}}}:{suffix}"

    @property
    def rollouts(self) -> str:
        """Stream of Rollouts waiting for (or being scored by) the teacher workers; group `teachers`."""
        return self._key("rollouts")

    @property
    def ready(self) -> str:
        """Stream of ScoredSamples waiting for (or trained but not yet checkpointed by) trainers."""
        return self._key("ready")

    @property
    def dead(self) -> str:
        """Stream of dead-lettered entries with stage, reason, deliveries and the original payload."""
        return self._key("dead")

    @property
    def stats(self) -> str:
        """Hash of monotonic counters (field names in `Stat`)."""
        return self._key("stats")

    @property
    def policy(self) -> str:
        """Hash with the latest published student policy: version, checkpoint, updated_ms."""
        return self._key("policy")

    @property
    def config(self) -> str:
        """Hash of the run's fixed settings, written once, checked by every joining process."""
        return self._key("config")

    def worker(self, name: str) -> str:
        """Heartbeat hash (with TTL) of one process."""
        return self._key(f"worker:{name}")

    @property
    def worker_pattern(self) -> str:
        """SCAN pattern matching every heartbeat key of the run (braces escaped for glob)."""
        return f"{PREFIX}:\\{{{self.run}\\}}:worker:*"

    def worker_name(self, key: str) -> str:
        """The worker name inside a heartbeat key."""
        return key.rsplit(":worker:", 1)[1]
