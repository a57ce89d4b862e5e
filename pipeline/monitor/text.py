"""`gkd status`'s plain-text rendering of a report (`pipeline.monitor.report.build_report`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pipeline.queue import schema as K
from pipeline.queue.schema import HB, RunKeys, Stat

_NUMERIC = re.compile(r"^-?[0-9.]+~?$")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable


def _numeric(v: Any) -> bool:
    return v is None or isinstance(v, int | float) or bool(_NUMERIC.match(str(v)))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Aligned plain-text table: numbers right-aligned, text left-aligned, None shown as '-'."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    right = [all(_numeric(row[i]) for row in rows) for i in range(len(headers))]

    def line(parts: Sequence[str]) -> str:
        out = [p.rjust(w) if r else p.ljust(w) for p, w, r in zip(parts, widths, right, strict=True)]
        return (indent + "  ".join(out)).rstrip()

    return [line(headers), *(line(r) for r in cells)]


def _oldest(o: dict[str, Any] | None) -> str:
    if not o:
        return "-"
    return f"{o['age_s']:.1f} s old, idle {o['idle_s']:.1f} s, {o[K.FIELD_DELIVERIES]}x, {o['consumer']}"


def render_text(rep: dict[str, Any]) -> str:
    """The report as the compact human-readable tables `gkd status` prints."""
    if not rep["has_data"]:
        return no_data_message(rep)
    sections = [
        _header(rep),
        _streams(rep),
        _rates(rep),
        _teacher_trainer(rep),
        _teachers(rep),
        _workers(rep),
    ]
    sections.append(_dead(rep))
    return "\n\n".join("\n".join(lines) for lines in sections)


def _header(rep: dict[str, Any]) -> list[str]:
    iv, pol = rep["interval_s"], rep["policy"]
    age = f", published {pol['updated_age_s']:.1f} s ago" if pol["updated_age_s"] is not None else ""
    cfg = " ".join(f"{k}={v}" for k, v in rep["config"].items())
    return [
        f"run {rep['run']!r}  redis {rep['redis']}  " + (f"rates over {iv:.2f} s" if iv else "no rates"),
        f"policy version {pol[K.POLICY_VERSION]} (checkpoint {pol[K.POLICY_CHECKPOINT] or '-'}{age})",
        f"config {cfg or '- (no process has joined yet)'}",
    ]


def _streams(rep: dict[str, Any]) -> list[str]:
    rows = []
    for kind, s in rep["streams"].items():
        size = _bytes(s["waiting_bytes"]) if "waiting_bytes" in s else "-"
        lag = f"{s['lag']}{'~' if s['lag_estimated'] else ''}" if "lag" in s else None
        rows.append([kind, s["length"], size, s.get("group"), s.get("consumers"), s.get("pending"), lag,
                     _oldest(s.get("oldest_pending"))])  # fmt: skip
    headers = ["stream", "length", "bytes", "group", "consumers", "pending", "lag", "oldest pending"]
    return table(headers, rows) + _partitions(rep)


def _partitions(rep: dict[str, Any]) -> list[str]:
    """One line per partition of a partitioned run (the streams table above is their sum)."""
    parts = rep.get("partitions") or []
    if not parts:
        return []
    rows = [
        [f"{p['partition']} {{{p['tag']}}}", *(p["lengths"].get(k, 0) for k in ("rollouts", "ready")),
         *(p["pending"].get(k, 0) for k in ("rollouts", "ready")), _bytes(p["waiting_bytes"].get("ready", 0)),
         p["lengths"].get("trained", 0), p["lengths"].get("dead", 0)]
        for p in parts
    ]  # fmt: skip
    headers = ["partition", "rollouts", "ready", "pending r", "pending t", "ready bytes", "journal", "dead"]
    return ["", f"  {len(parts)} partitions (the streams above are their sum):", *table(headers, rows)]


def _rates(rep: dict[str, Any]) -> list[str]:
    tp = rep["throughput"]
    names = ["rollouts_produced_per_s", "scored_per_s", "scored_positions_per_s", "trained_samples_per_s",
             "trained_tokens_per_s", "trainer_steps_per_s", "dead_per_s", "teacher_errors_per_s"]  # fmt: skip
    headers = ["per second", "rollouts", "scored", "scored pos", "trained", "tokens", "steps", "dead"]
    return table([*headers, "errors"], [["last interval", *(tp[n] for n in names)]])


def _teacher_trainer(rep: dict[str, Any]) -> list[str]:
    t, tr = rep["teacher"], rep["trainer"]
    pct = f"p50 {_ms(t[HB.LATENCY_P50_MS])}, p95 {_ms(t[HB.LATENCY_P95_MS])} (max over workers)"
    if t["latency_source"] != "heartbeats":
        pct = "p50/p95 not published by workers"
    return [
        f"teacher  latency mean {_ms(t['latency_mean_ms'])} (interval), "
        f"{_ms(t['latency_mean_ms_total'])} (run); {pct}",
        f"         requests {t['requests']}, errors {t['errors']}, retries {t['retries']}, "
        f"reclaimed {t[Stat.RECLAIMED]}",
        f"trainer  steps {tr['steps']}, {_fmt(tr['steps_per_s'])} steps/s, data-wait "
        f"{_pct(tr['data_wait_fraction'])} (interval), {_pct(tr['data_wait_fraction_total'])} (run), "
        f"stale skipped {tr[Stat.STALE_SKIPPED]}, requeued after a resume {tr[Stat.REQUEUED]}",
    ]


def _teachers(rep: dict[str, Any]) -> list[str]:
    ts = rep.get("teachers") or {}
    lines = [f"teachers: {len(ts)}" + (" (by name; p50/p95 max over workers)" if ts else "")]
    headers = [
        "teacher",
        "model",
        "pos/s",
        "scored",
        "errors",
        "err/s",
        "p50_ms",
        "p95_ms",
        "breaker",
        "waiting",
    ]
    rows = [
        [name, t["model"], t["positions_per_s"], t["scored"], t["errors"], t["errors_per_s"],
         t[HB.LATENCY_P50_MS], t[HB.LATENCY_P95_MS], t["breaker"], t["waiting"]]
        for name, t in ts.items()
    ]  # fmt: skip
    return lines + table(headers, rows) if rows else lines


def _workers(rep: dict[str, Any]) -> list[str]:
    ws = rep["workers"]
    lines = [f"workers: {len(ws)} live"]
    if ws:
        # Columns are the report's keys (heartbeat fields), with short headers for the long ones.
        fixed = ("name", HB.ROLE, HB.HOST, HB.PID, HB.IN_FLIGHT, "last_seen_age_s")
        extra = (HB.LATENCY_P50_MS, HB.LATENCY_P95_MS, HB.PAUSED)
        short = {"last_seen_age_s": "seen_s_ago", HB.LATENCY_P50_MS: "p50_ms", HB.LATENCY_P95_MS: "p95_ms"}
        rows = [[w[k] for k in fixed] + [w.get(k) for k in extra] for w in ws]
        lines += table([short.get(k, k) for k in (*fixed, *extra)], rows)
    return lines


def _dead(rep: dict[str, Any]) -> list[str]:
    d = rep["dead"]
    lines = [
        f"dead letters: {d['count']} in stream ({d['total']} dead-lettered in total, {d['trimmed']} trimmed "
        f"to the stream's limit, {d['cut']} with their payload cut)"
    ]
    if d["latest"]:
        rows = [[x["sid"], x.get(K.FIELD_ID), x.get(K.FIELD_STAGE), x.get(K.FIELD_DELIVERIES),
                 _clip(x.get(K.FIELD_REASON, ""), 100)] for x in d["latest"]]  # fmt: skip
        lines += table(["sid", K.FIELD_ID, K.FIELD_STAGE, K.FIELD_DELIVERIES, K.FIELD_REASON], rows)
    return lines


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def no_data_message(rep: dict[str, Any]) -> str:
    others = [x for x in rep.get("other_runs", []) if x != rep["run"]]
    hint = f"; runs with data there: {', '.join(others)}" if others else "; no run has data there yet"
    return (
        f"run {rep['run']!r} has no data yet in Redis at {rep['redis']} (no streams, counters, config, "
        f"policy or heartbeats under {RunKeys(rep['run']).key('*')}){hint}"
    )
