"""`gkd status`: queue depths, lag, pending work, dead letters, live workers and throughput of a run.

    gkd status [--run NAME] [--redis URL] [--watch] [--interval-s 2] [--json]

Two samples of the run's Redis state `--interval-s` apart give the rates (counter deltas); the report
is printed as aligned plain-text tables, or as one JSON object with `--json` (one per refresh with
`--watch`, which runs until Ctrl-C and then exits 0). A run without keys prints that it has no data
yet. Redis unreachable at start: one error line on stderr and exit code 2.

Sampling and the numbers are in `pipeline.monitor.report`, which also documents the optional heartbeat
fields a process may publish for `gkd status` (``latency_p50_ms``, ``latency_p95_ms``, ``paused``); the
text tables in `pipeline.monitor.text`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import RedisUnavailable, SettingsError
from pipeline.monitor.report import (
    Sample,
    build_report,
    other_runs,
    take_sample,
)
from pipeline.monitor.text import render_text
from pipeline.queue.connection import connect_sync
from pipeline.queue.schema import RunKeys
from pipeline.sections import CommonSettings
from pipeline.settings import parse, setting


@dataclass
class StatusSettings(CommonSettings):
    """Settings of `gkd status`."""

    watch: bool = setting(False, "Refresh every --interval-s until Ctrl-C.")
    interval_s: float = setting(2.0, "Seconds between the two counter samples (rates) and between refreshes.")
    json_output: bool = setting(
        False, "Print one JSON object (one per line per refresh with --watch).", flags=("--json",)
    )
    dead_reasons: int = setting(5, "How many of the latest dead letters to show.")


def _emit(rep: dict[str, Any], as_json: bool, clear: bool) -> None:
    if as_json:
        print(json.dumps(rep, sort_keys=False), flush=True)
        return
    if clear:
        sys.stdout.write("\033[H\033[2J")
    print(render_text(rep), flush=True)


def _report(r: Any, keys: RunKeys, s: StatusSettings, prev: Sample | None) -> tuple[Sample, dict[str, Any]]:
    cur = take_sample(r, keys, s.dead_reasons)
    rep = build_report(prev, cur, run=keys.run, redis_url=s.run.redis_url)
    if not rep["has_data"]:
        rep["other_runs"] = other_runs(r)
    return cur, rep


def run(r: Any, keys: RunKeys, s: StatusSettings) -> int:
    """Print one report (two samples `interval_s` apart), or refresh until Ctrl-C with `watch`."""
    prev: Sample | None
    prev, rep = _report(r, keys, s, None)
    if not s.watch:
        if rep["has_data"] and s.interval_s > 0:
            time.sleep(s.interval_s)
            prev, rep = _report(r, keys, s, prev)
        _emit(rep, s.json_output, clear=False)
        return 0
    clear = sys.stdout.isatty() and not s.json_output
    while True:
        time.sleep(max(s.interval_s, 0.1))
        try:
            prev, rep = _report(r, keys, s, prev)
        except RedisUnavailable as exc:
            # A monitor outlives a Redis restart: say so, drop the old sample (its rates would mix).
            print(f"gkd status: {exc}; retrying", file=sys.stderr)
            prev = None
            continue
        _emit(rep, s.json_output, clear)
        if not s.json_output and not clear:
            print(flush=True)


def ping(r: Any) -> None:
    """Raise a GKDError naming the fix unless Redis answers (`gkd status` and `gkd runs` do not wait)."""
    try:
        r.ping()
    except RedisUnavailable as exc:
        raise RedisUnavailable(
            f"{exc}; expected a Redis server there: start one, or pass --redis URL (or set GKD_REDIS_URL)"
        ) from None


def main(argv: Sequence[str]) -> int:
    s = parse(StatusSettings, argv, prog="gkd status", description=__doc__.split("\n")[0])
    keys = s.run.keys
    if s.interval_s < 0 or s.dead_reasons < 0:
        raise SettingsError(
            f"expected --interval-s >= 0 and --dead-reasons >= 0, got {s.interval_s} and {s.dead_reasons}"
        )
    r = connect_sync(s.run.redis_url, cluster=s.run.redis_cluster)
    try:
        ping(r)
        return run(r, keys, s)
    except KeyboardInterrupt:
        return 0  # the way to end --watch
    finally:
        r.close()
