"""`gkd status` per teacher: rates from the per-teacher `stats` counters, state from the workers' heartbeats.

A teacher appears when the run config names it, a counter counts for it, or a worker's heartbeat reports it.
Its latency percentiles are the largest over workers (an upper bound of the pooled percentile, as for the
run-wide ones), its breaker state the worst one a worker reports, its waiting rollouts the sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.queue.schema import HB, Config, Stat

#: JSON name of a per-teacher rate -> the counter it differentiates.
TEACHER_RATES = {
    "scored_per_s": Stat.SCORED,
    "positions_per_s": Stat.SCORED_POSITIONS,
    "requests_per_s": Stat.TEACHER_REQUESTS,
    "errors_per_s": Stat.TEACHER_ERRORS,
}


def _num(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def teacher_names(
    stats: dict[str, int], config: dict[str, str], workers: dict[str, dict[str, str]]
) -> list[str]:
    """Every teacher the run config, the counters or a heartbeat names, sorted."""
    names = set(filter(None, config.get(Config.TEACHERS, "").split(",")))
    names |= {split[0] for key in stats if (split := Stat.split_teacher(key)) is not None}
    for hb in workers.values():
        names |= {split[0] for key in hb if (split := HB.split_teacher(key)) is not None}
    return sorted(names)


def _breaker(states: list[str]) -> str | None:
    """The worst breaker state workers report ("open n/m on w1" for the first open one)."""
    return next((s for s in states if s.startswith("open")), states[0] if states else None)


def teachers_report(
    stats: dict[str, int],
    config: dict[str, str],
    workers: dict[str, dict[str, str]],
    delta: Callable[[str], int | None],
    dt: float,
) -> dict[str, dict[str, Any]]:
    """Teacher name -> its figures (rates None without an interval)."""
    out: dict[str, dict[str, Any]] = {}
    for name in teacher_names(stats, config, workers):

        def hb(field: str, n: str = name) -> list[tuple[str, str]]:
            key = HB.per_teacher(n, field)
            return [(w, b[key]) for w, b in sorted(workers.items()) if key in b]

        def count(stat: str, n: str = name) -> int:
            return stats.get(Stat.per_teacher(n, stat), 0)

        rates = {}
        for rate, stat in TEACHER_RATES.items():
            d = delta(Stat.per_teacher(name, stat))
            rates[rate] = d / dt if d is not None and dt > 0 else None
        p50 = [x for _, v in hb(HB.LATENCY_P50_MS) if (x := _num(v)) is not None]
        p95 = [x for _, v in hb(HB.LATENCY_P95_MS) if (x := _num(v)) is not None]
        down = [x for _, v in hb(HB.T_DOWN_S) if (x := _num(v)) is not None]
        breakers = [f"{v} on {w}" if v.startswith("open") else v for w, v in hb(HB.T_BREAKER)]
        models = {v for _, v in hb(HB.T_MODEL)}
        requests = count(Stat.TEACHER_REQUESTS)
        out[name] = {
            "model": config.get(Config.teacher_model(name)) or (models.pop() if len(models) == 1 else None),
            **rates,
            "scored": count(Stat.SCORED),
            Stat.SCORED_POSITIONS: count(Stat.SCORED_POSITIONS),
            "requests": requests,
            "errors": count(Stat.TEACHER_ERRORS),
            "latency_mean_ms": count(Stat.TEACHER_LATENCY_MS_SUM) / requests if requests else None,
            HB.LATENCY_P50_MS: max(p50) if p50 else None,
            HB.LATENCY_P95_MS: max(p95) if p95 else None,
            "breaker": _breaker(breakers),
            "waiting": sum(int(x) for _, v in hb(HB.T_WAITING) if (x := _num(v)) is not None),
            "down_s": max(down) if down else None,
        }
    return out
