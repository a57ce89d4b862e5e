"""The runs one Redis holds (what `gkd runs` lists) and clearing one (`gkd runs delete RUN`).

A run is every key with its hash tag (`schema.RunKeys.pattern`); runs are found by scanning for the
prefix every run key has (`schema.ALL_RUNS_PATTERN`). Blocking client (`connect_sync`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.queue import schema as K
from pipeline.queue.schema import ALL_RUNS_PATTERN, Config, RunKeys, run_of_key

#: Keys deleted per UNLINK.
DELETE_BATCH = 500


@dataclass
class RunInfo:
    """One run as `gkd runs` lists it."""

    run: str
    keys: int
    rollouts: int
    ready: int
    dead: int
    k: str | None
    """The run's fixed k (None: no process has joined it yet)."""
    policy_version: int | None
    live: list[str]
    """Names of its processes whose heartbeat has not expired."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _s(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def run_names(r: Any) -> dict[str, int]:
    """Run name -> number of its keys, for every run in this Redis (one SCAN)."""
    counts: dict[str, int] = {}
    for key in r.scan_iter(match=ALL_RUNS_PATTERN, count=1000):
        run = run_of_key(_s(key))
        counts[run] = counts.get(run, 0) + 1
    runs = K.fold_partitions(set(counts))
    for tag in set(counts) - runs:  # a partition's keys count for its run
        counts[tag.rpartition(".")[0]] += counts.pop(tag)
    return counts


def live_processes(r: Any, keys: RunKeys) -> list[str]:
    """Names of the run's processes whose heartbeat has not expired."""
    return sorted(keys.worker_name(_s(k)) for k in r.scan_iter(match=keys.worker_pattern, count=500))


def describe(r: Any, run: str, n_keys: int) -> RunInfo:
    """The numbers of one run (one pipelined round trip plus a SCAN of its heartbeats)."""
    keys = RunKeys(run)
    partitions = int(r.hget(keys.config, Config.PARTITIONS) or 1)
    pipe = r.pipeline(transaction=False)
    for part in keys.parts(partitions):
        for stream in (part.rollouts, part.ready, part.dead):
            pipe.xlen(stream.key)
    pipe.hget(keys.config, Config.K)
    pipe.hget(keys.policy, K.POLICY_VERSION)
    *lengths, k, version = pipe.execute()
    rollouts, ready, dead = (sum(lengths[i::3]) for i in range(3))
    return RunInfo(
        run=run, keys=n_keys, rollouts=int(rollouts), ready=int(ready), dead=int(dead),
        k=_s(k) if k is not None else None, policy_version=int(version) if version is not None else None,
        live=live_processes(r, keys),
    )  # fmt: skip


def list_runs(r: Any) -> list[RunInfo]:
    """Every run in this Redis, by name."""
    return [describe(r, run, n) for run, n in sorted(run_names(r).items())]


def delete_run(r: Any, keys: RunKeys) -> int:
    """Delete every key of the run (UNLINK in batches); returns how many were deleted."""
    deleted = 0
    partitioned = int(r.hget(keys.config, Config.PARTITIONS) or 1) > 1
    for pattern in (keys.pattern, keys.part_pattern) if partitioned else (keys.pattern,):
        batch: list[Any] = []
        for key in r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= DELETE_BATCH:
                deleted += int(r.unlink(*batch))
                batch = []
        if batch:
            deleted += int(r.unlink(*batch))
    return deleted


def render(runs: list[RunInfo], where: str) -> str:
    """The plain-text table of `gkd runs`."""
    if not runs:
        return f"no runs in Redis at {where}"
    head = ("run", "keys", "rollouts", "ready", "dead", "k", "policy", "live processes")
    rows = [
        (
            i.run, str(i.keys), str(i.rollouts), str(i.ready), str(i.dead), i.k or "-",
            str(i.policy_version) if i.policy_version is not None else "-",
            ", ".join(i.live) if i.live else "-",
        )
        for i in runs
    ]  # fmt: skip
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    lines = [f"runs in Redis at {where}:"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in [head, *rows]]  # fmt: skip
    return "\n".join(lines)
