"""One exception hierarchy for the whole pipeline.

Retry and dead-letter logic branch on the class, never on message text:

    GKDError
    ├── RetryableError        the same request may succeed later (connection, timeout, 429, 5xx)
    │   ├── TeacherConnectionError
    │   ├── TeacherTimeout
    │   ├── TeacherOverloaded  (HTTP 429)
    │   ├── TeacherServerError (HTTP 5xx)
    │   └── RedisUnavailable  Redis unreachable, timing out, loading, out of memory or read-only for now
    ├── PermanentError        the same input will fail again; the rollout goes to `dead`
    │   ├── WireFormatError    a msgpack record or tensor is invalid (names the field)
    │   ├── TeacherBadRequest  (HTTP 4xx other than 429)
    │   ├── TeacherIncompatible the teacher serves another model or tokenizer than this run needs
    │   ├── MalformedResponse  a teacher body that does not parse or fails validation
    │   ├── UnknownTeacher     a rollout names a teacher the workers do not have
    │   ├── RedisAuthError     Redis refused the credentials of the URL
    │   └── RedisCommandError  Redis refused a command (a bug or an incompatible server); `code` says why
    ├── ApiError              the reference teacher server refuses a request (HTTP status, vLLM's type)
    ├── LeaseLost             this consumer no longer owns a stream entry; it must not publish
    ├── StreamGroupMissing    a stream's consumer group is gone (Redis lost its data): recreate it
    ├── ConfigMismatch        a process joins a run whose fixed settings differ from its own
    ├── DatasetError          a scored dataset on disk is unusable here (another teacher or k, a bad checksum)
    ├── MissingExtra          an optional dependency is not installed (names the extra that installs it)
    ├── PolicyRegression      a trainer would publish a lower policy version than the run's
    ├── NameInUse             another live process of the run has this process's name
    ├── SettingsError         a flag, environment variable or TOML value is invalid
    └── CheckpointFailed      a trainer checkpoint could not be written (the previous one is intact)

redis-py's exceptions never leave `pipeline.queue.connection`: its clients raise the classes above.
"""

from __future__ import annotations


class GKDError(Exception):
    """Base of every error raised on purpose by gkd-pipeline."""


class RetryableError(GKDError):
    """A failure that may go away: retry with backoff, or fail over to another endpoint."""


class PermanentError(GKDError):
    """A failure that will repeat for the same input: dead-letter it with this message as the reason."""


class WireFormatError(PermanentError):
    """A wire record or tensor is invalid. `field` names the offending field (dotted for nesting)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TeacherConnectionError(RetryableError):
    """The teacher endpoint could not be reached or dropped the connection."""


class TeacherTimeout(RetryableError):
    """The teacher did not answer within the configured timeout."""


class TeacherOverloaded(RetryableError):
    """The teacher answered HTTP 429 (too many requests)."""


class TeacherServerError(RetryableError):
    """The teacher answered HTTP 5xx."""


class TeacherBadRequest(PermanentError):
    """The teacher answered HTTP 4xx (not 429): the request itself is wrong (e.g. k above --max-logprobs)."""


class TeacherIncompatible(PermanentError):
    """The teacher serves another model, or tokenizes differently from the student (checked at start)."""


class MalformedResponse(PermanentError):
    """The teacher's body did not parse, or its numbers fail validation (row count, NaN, logprob > 0, ...)."""


class UnknownTeacher(PermanentError):
    """A rollout names a teacher the worker does not have (the message names the teachers it has)."""


class ApiError(GKDError):
    """A request to the reference teacher server (`gkd teacher`) is refused: answered with `status` and
    vLLM's error body (`message`, `type`, `param`), see pipeline/teacher/vllm.error_body."""

    def __init__(
        self, status: int, message: str, type: str = "BadRequestError", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param


class RedisUnavailable(RetryableError):
    """Redis did not answer, or answered that it cannot serve right now (loading, OOM, read-only)."""


class RedisAuthError(PermanentError):
    """Redis refused the password or user of the URL; retrying with the same URL cannot help."""


class RedisCommandError(PermanentError):
    """Redis refused a command. `code` is Redis's error code (the reply's first word, e.g. WRONGTYPE)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamGroupMissing(GKDError):
    """A stream or its consumer group is missing (NOGROUP): Redis restarted without its data. Nobody
    owns the entries read from it any more; readers recreate the groups."""


class LeaseLost(GKDError):
    """The stream entry was reclaimed by another consumer; publishing it now would create a duplicate."""


class ConfigMismatch(GKDError):
    """The run's stored config differs from this process's settings (names every differing setting)."""


class DatasetError(GKDError):
    """A scored dataset on disk cannot be used here: another teacher, k or dtype than the run, a shard whose
    checksum differs from its manifest, a folder that holds no dataset (the message names the reason)."""


class MissingExtra(GKDError):
    """An optional dependency is missing; the message names the extra to install."""


class PolicyRegression(GKDError):
    """A trainer would publish (or start from) a lower policy version than the run has published: the
    producers would go back to an older policy. The published version never decreases."""


class NameInUse(GKDError):
    """Another live process of the run uses this name (its heartbeat keeps beating)."""


class SettingsError(GKDError):
    """A setting from a flag, a GKD_* environment variable or a TOML file is invalid."""


class CheckpointFailed(GKDError):
    """A trainer checkpoint could not be written on some rank; the previous checkpoint is intact."""
