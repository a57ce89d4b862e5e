"""`gkd runs`: the runs in a Redis; `gkd runs delete RUN` clears one.

    gkd runs [--redis URL] [--json]
    gkd runs delete RUN [--yes] [--force] [--redis URL]

`delete` removes every key of the run (its streams, counters, config, policy, heartbeats), asking first
unless `--yes`; it refuses while processes of the run are alive (`--force` deletes anyway: they would
recreate some keys). Redis unreachable: one line and exit status 2, like `gkd status`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import SettingsError
from pipeline.monitor.runs import delete_run, describe, list_runs, render, run_names
from pipeline.queue.connection import connect_sync, where
from pipeline.queue.schema import RunKeys
from pipeline.sections import RunSettings
from pipeline.settings import parse, section, setting
from workers.status import ping


@dataclass
class RunsSettings:
    """Settings of `gkd runs`."""

    run: RunSettings = section(RunSettings, "redis_url", "redis_cluster")
    json_output: bool = setting(False, "Print the runs as one JSON list.", flags=("--json",))
    yes: bool = setting(False, "delete: do not ask for confirmation.")
    force: bool = setting(False, "delete: even while processes of the run are alive.")


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise SettingsError(
            "delete: expected a terminal to ask for confirmation, got none (stdin is not a terminal); "
            "pass --yes to delete without asking"
        )
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def delete(r: object, run: str, s: RunsSettings) -> int:
    keys = RunKeys.for_run(run)
    n = run_names(r).get(run, 0)
    if n == 0:
        print(f"run {run!r} has no keys in Redis at {where(r)}; nothing to delete")
        return 0
    info = describe(r, run, n)
    if info.live and not s.force:
        raise SettingsError(
            f"delete: expected run {run!r} to have no live processes, got {len(info.live)} "
            f"({', '.join(info.live[:5])}); stop them first (their heartbeats expire within seconds), or "
            f"pass --force"
        )
    what = (
        f"run {run!r} ({n} keys: rollouts {info.rollouts}, ready {info.ready}, dead {info.dead}, "
        f"policy version {info.policy_version if info.policy_version is not None else '-'})"
    )
    if not s.yes and not _confirm(f"delete {what} from Redis at {where(r)}?"):
        print("nothing deleted")
        return 1
    deleted = delete_run(r, keys)
    print(f"deleted {what}: {deleted} keys")
    return 0


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    action = args.pop(0) if args[:1] == ["delete"] else None
    run = args.pop(0) if action and args and not args[0].startswith("-") else None
    s = parse(RunsSettings, args, prog="gkd runs", description=__doc__.split("\n")[0])
    if action and run is None:
        raise SettingsError("delete: expected the run to delete (gkd runs delete RUN), got none")
    r = connect_sync(s.run.redis_url, cluster=s.run.redis_cluster)
    try:
        ping(r)
        if action:
            assert run is not None
            return delete(r, run, s)
        runs = list_runs(r)
        print(json.dumps([i.as_dict() for i in runs]) if s.json_output else render(runs, where(r)))
        return 0
    finally:
        r.close()
