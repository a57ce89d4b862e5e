"""What `gkd status` reads from Redis and the numbers it derives (one JSON-ready dict per report).

It only reads Redis: one pipelined round trip per sample plus one for the heartbeats. Throughput is
the difference of the `stats` counters between two samples `--interval-s` apart, so `gkd status`
takes that long to answer (``--interval-s 0`` answers at once, without rates).

Heartbeat contract. Any process may add these optional fields to its heartbeat
(`pipeline.queue.runstate.Heartbeat(..., fields=...)`, names in `schema.HB`); `gkd status` shows them
when present:

- ``latency_p50_ms``, ``latency_p95_ms`` (float, milliseconds): percentiles of this process's teacher
  request latency over its recent requests (for example the last 60 s). The run-wide value shown is the
  largest over processes: an upper bound of the pooled percentile, since a quantile of a mixture never
  exceeds the largest quantile of its parts. Without them only the mean latency is shown, from the
  ``teacher_latency_ms_sum / teacher_requests`` counters.
- ``paused`` ("1" or "0"): the process is waiting for room in the stream it feeds (backpressure).

Every other heartbeat field is passed through under the worker in ``--json``.
Ages use the Redis server's clock (stream ids are its milliseconds); heartbeat ages compare the
worker's clock with it, so they are as good as the hosts' clock sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import GKDError, RedisCommandError, StreamGroupMissing
from pipeline.monitor.teachers import teachers_report
from pipeline.queue import schema as K
from pipeline.queue.schema import ALL_RUNS_PATTERN, HB, RunKeys, Stat, Stream, run_of_key
from pipeline.settings import mask_url

#: JSON name of a rate -> the counter it differentiates.
RATES = {
    "rollouts_produced_per_s": Stat.ROLLOUTS_PRODUCED,
    "scored_per_s": Stat.SCORED,
    "scored_positions_per_s": Stat.SCORED_POSITIONS,
    "trained_samples_per_s": Stat.TRAINED_SAMPLES,
    "trained_tokens_per_s": Stat.TRAINED_TOKENS,
    "trainer_steps_per_s": Stat.TRAINER_STEPS,
    "dead_per_s": Stat.DEAD,
    "teacher_requests_per_s": Stat.TEACHER_REQUESTS,
    "teacher_errors_per_s": Stat.TEACHER_ERRORS,
    "teacher_retries_per_s": Stat.TEACHER_RETRIES,
}


@dataclass
class Sample:
    """Everything `gkd status` reads from Redis at one moment."""

    t_s: float
    """Local monotonic seconds (rates divide counter deltas by differences of this)."""
    server_ms: int
    """Redis server time in ms (ages of stream entries and heartbeats are measured against it)."""
    lengths: dict[str, int]
    groups: dict[str, dict[str, Any] | None]
    """Per work stream: its group's XINFO GROUPS entry, or None when the stream or group is missing."""
    oldest: dict[str, dict[str, Any] | None]
    """Per work stream: XPENDING's first (oldest) pending entry, or None when nothing is pending."""
    dead_latest: list[dict[str, Any]]
    stats: dict[str, int]
    config: dict[str, str]
    policy: dict[str, str]
    workers: dict[str, dict[str, str]] = field(default_factory=dict)
    parts: list[dict[str, Any]] = field(default_factory=list)
    """Per partition of a partitioned run: its streams' lengths, pending entries and waiting bytes."""

    @property
    def has_data(self) -> bool:
        return bool(
            any(self.lengths.values())
            or any(self.groups.values())
            or self.stats
            or self.config
            or self.policy
            or self.workers
        )


def _s(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _strs(raw: dict[Any, Any] | None) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in (raw or {}).items()}


def _sid_ms(sid: Any) -> int:
    return int(_s(sid).split("-", 1)[0])


def _dead_entry(sid: Any, fields: dict[Any, Any]) -> dict[str, Any]:
    """A dead-stream entry without its payload: sid, id, stage, reason, deliveries (int)."""
    d: dict[str, Any] = _strs({k: v for k, v in fields.items() if _s(k) != K.FIELD_DATA})
    d["sid"] = _s(sid)
    n = num(d.get(K.FIELD_DELIVERIES))
    d[K.FIELD_DELIVERIES] = int(n) if n is not None else None
    return d


def _read_part(r: Any, keys: RunKeys, dead_n: int) -> Sample:
    """The streams and counters of one partition (the run's own keys for one partition), one round trip;
    config and policy too for the run's own keys."""
    streams = keys.all_streams
    pipe = r.pipeline(transaction=False)
    for stream in streams:
        pipe.xlen(stream.key)
    for stream in keys.work_streams:
        pipe.xinfo_groups(stream.key)
        pipe.xpending_range(stream.key, stream.group, min="-", max="+", count=1)
    pipe.xrevrange(keys.dead.key, count=max(dead_n, 1))
    pipe.hgetall(keys.stats)
    pipe.hgetall(keys.config)
    pipe.hgetall(keys.policy)
    res = list(pipe.execute(raise_on_error=False))
    # XINFO/XPENDING fail (no such key, NOGROUP) only for a missing stream or group: that is "absent".
    g0, n_groups = len(streams), 2 * len(keys.work_streams)
    for i, v in enumerate(res):
        if isinstance(v, RedisCommandError | StreamGroupMissing) and g0 <= i < g0 + n_groups:
            res[i] = None
        elif isinstance(v, GKDError):
            raise v
    lengths = {s.kind: int(n) for s, n in zip(streams, res[:g0], strict=True)}
    groups: dict[str, dict[str, Any] | None] = {}
    oldest: dict[str, dict[str, Any] | None] = {}
    for j, stream in enumerate(keys.work_streams):
        infos, pend = res[g0 + 2 * j], res[g0 + 1 + 2 * j]
        groups[stream.kind] = next((g for g in infos or [] if _s(g["name"]) == stream.group), None)
        oldest[stream.kind] = pend[0] if pend else None
    dead_raw, stats, config, policy = res[g0 + n_groups :]
    return Sample(
        t_s=0.0, server_ms=0, lengths=lengths, groups=groups, oldest=oldest,
        dead_latest=[_dead_entry(sid, f) for sid, f in dead_raw],
        stats={k: int(v) for k, v in _strs(stats).items()}, config=_strs(config), policy=_strs(policy),
    )  # fmt: skip


def _merge(total: Sample, part: Sample) -> None:
    """Add a partition's streams and counters to the run's sample (sums; the oldest pending entry)."""
    for kind, n in part.lengths.items():
        total.lengths[kind] = total.lengths.get(kind, 0) + n
    for kind, g in part.groups.items():
        cur = total.groups.get(kind)
        if g is None or cur is None:
            total.groups[kind] = cur or g
            continue
        lag = None if cur.get("lag") is None or g.get("lag") is None else int(cur["lag"]) + int(g["lag"])
        total.groups[kind] = {**cur, "pending": int(cur["pending"]) + int(g["pending"]), "lag": lag,
                              "consumers": max(int(cur["consumers"]), int(g["consumers"]))}  # fmt: skip
    for kind, o in part.oldest.items():
        cur_o = total.oldest.get(kind)
        if o is not None and (cur_o is None or _sid_ms(o["message_id"]) < _sid_ms(cur_o["message_id"])):
            total.oldest[kind] = o
    total.dead_latest = sorted(total.dead_latest + part.dead_latest, key=lambda d: -_sid_ms(d["sid"]))
    for k, v in part.stats.items():
        total.stats[k] = total.stats.get(k, 0) + v


def take_sample(r: Any, keys: RunKeys, dead_n: int = 5) -> Sample:
    """Read one consistent-enough picture of the run (one pipelined round trip per partition +
    heartbeats); a partitioned run's streams and counters are summed, `parts` has each partition's.

    Raises RedisUnavailable when Redis cannot be reached.
    """
    secs, micros = r.time()
    sample = _read_part(r, keys, dead_n)
    partitions = int(num(sample.config.get(K.Config.PARTITIONS)) or 1)
    for part in keys.parts(partitions) if partitions > 1 else []:
        one = _read_part(r, part, dead_n)
        _merge(sample, one)
        pending = {kind: int(g["pending"]) if g else 0 for kind, g in one.groups.items()}
        waiting = {s.kind: _waiting_bytes(s, one) for s in part.work_streams}
        sample.parts.append({"partition": part.index, "tag": part.tag, "lengths": one.lengths,
                             "pending": pending, "waiting_bytes": waiting})  # fmt: skip
    sample.dead_latest = sample.dead_latest[:dead_n]
    sample.t_s = time.monotonic()
    sample.server_ms = int(secs) * 1000 + int(micros) // 1000
    names = [_s(k) for k in r.scan_iter(match=keys.worker_pattern, count=500)]
    if names:
        hpipe = r.pipeline(transaction=False)
        for key in names:
            hpipe.hgetall(key)
        for key, raw in zip(names, hpipe.execute(), strict=True):
            if raw:  # expired between SCAN and HGETALL
                sample.workers[keys.worker_name(key)] = _strs(raw)
    return sample


def other_runs(r: Any, limit_keys: int = 20_000) -> list[str]:
    """Names of runs that have keys in this Redis (scans at most `limit_keys` keys)."""
    runs: set[str] = set()
    for n, key in enumerate(r.scan_iter(match=ALL_RUNS_PATTERN, count=1000)):
        if n >= limit_keys:
            break
        runs.add(run_of_key(_s(key)))
    return sorted(K.fold_partitions(runs))


def num(v: str | None) -> float | None:
    """The number in a heartbeat/hash field, or None when it is missing or not a number."""
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _waiting_bytes(stream: Stream, cur: Sample) -> int:
    return cur.stats.get(stream.bytes_in, 0) - cur.stats.get(stream.bytes_out, 0)


def _stream_report(stream: Stream, cur: Sample) -> dict[str, Any]:
    kind = stream.kind
    length = cur.lengths[kind]
    out: dict[str, Any] = {"length": length}
    if stream.counts_bytes:
        out["waiting_bytes"] = _waiting_bytes(stream, cur)
    if stream.group is None:
        return out
    g = cur.groups[kind]
    pending = int(g["pending"]) if g else 0
    lag = g.get("lag") if g else None
    # Acked entries are deleted, so the stream holds only waiting + pending work: XLEN - pending is
    # the lag whenever Redis cannot compute it (before 7.0, or after deletions past the group cursor).
    out.update(
        group=stream.group,
        group_exists=g is not None,
        consumers=int(g["consumers"]) if g else 0,
        pending=pending,
        lag=int(lag) if lag is not None else max(length - pending, 0),
        lag_estimated=lag is None,
    )
    o = cur.oldest[kind]
    out["oldest_pending"] = (
        {
            "sid": _s(o["message_id"]),
            "age_s": max(cur.server_ms - _sid_ms(o["message_id"]), 0) / 1000,
            "idle_s": int(o["time_since_delivered"]) / 1000,
            K.FIELD_DELIVERIES: int(o["times_delivered"]),
            "consumer": _s(o["consumer"]),
        }
        if o
        else None
    )
    return out


def _scalar(v: str) -> int | float | str:
    """A heartbeat extra as the JSON scalar it spells: int, float, else the string itself."""
    try:
        return int(v)
    except ValueError:
        value = num(v)
        return v if value is None else value


def _workers_report(cur: Sample) -> list[dict[str, Any]]:
    """One row per live process: name, the heartbeat's base fields (last seen as an age), its extras."""
    rows = []
    for name, hb in sorted(cur.workers.items(), key=lambda kv: (kv[1].get(HB.ROLE, ""), kv[0])):
        seen = num(hb.get(HB.LAST_SEEN_MS))
        row: dict[str, Any] = {
            "name": name,
            HB.ROLE: hb.get(HB.ROLE, ""),
            HB.HOST: hb.get(HB.HOST, ""),
            HB.PID: int(num(hb.get(HB.PID)) or 0),
            HB.IN_FLIGHT: int(num(hb.get(HB.IN_FLIGHT)) or 0),
            "last_seen_age_s": max(cur.server_ms - seen, 0) / 1000 if seen is not None else None,
        }
        for k, v in hb.items():
            if k not in HB.BASE:
                row[k] = v if k == HB.PAUSED else _scalar(v)
        rows.append(row)
    return rows


def build_report(prev: Sample | None, cur: Sample, *, run: str, redis_url: str) -> dict[str, Any]:
    """All numbers of the status as one JSON-ready dict. Rates are None without `prev` (one sample)."""
    st = cur.stats
    dt = cur.t_s - prev.t_s if prev is not None else 0.0

    def delta(name: str) -> int | None:
        if prev is None or dt <= 0:
            return None
        d = st.get(name, 0) - prev.stats.get(name, 0)
        return d if d >= 0 else None  # a counter went backwards: the stats hash was reset

    rates = {k: (d / dt if (d := delta(c)) is not None else None) for k, c in RATES.items()}
    workers = _workers_report(cur)
    p50s = [w[HB.LATENCY_P50_MS] for w in workers if isinstance(w.get(HB.LATENCY_P50_MS), int | float)]
    p95s = [w[HB.LATENCY_P95_MS] for w in workers if isinstance(w.get(HB.LATENCY_P95_MS), int | float)]
    d_req, d_lat = delta(Stat.TEACHER_REQUESTS), delta(Stat.TEACHER_LATENCY_MS_SUM)
    d_step, d_wait = delta(Stat.STEP_MS), delta(Stat.DATA_WAIT_MS)
    updated = num(cur.policy.get(K.POLICY_UPDATED_MS))
    keys = RunKeys.for_run(run)
    return {
        "run": run,
        "redis": mask_url(redis_url),
        "has_data": cur.has_data,
        "server_time_ms": cur.server_ms,
        "interval_s": dt if prev is not None else None,
        "streams": {s.kind: _stream_report(s, cur) for s in keys.all_streams},
        keys.dead.kind: {
            "count": cur.lengths[keys.dead.kind],
            "total": st.get(Stat.DEAD, 0),
            "trimmed": st.get(Stat.DEAD_TRIMMED, 0),
            "cut": st.get(Stat.DEAD_CUT, 0),
            "latest": cur.dead_latest,
        },
        "partitions": cur.parts,
        "workers": workers,
        "throughput": rates,
        "teachers": teachers_report(st, cur.config, cur.workers, delta, dt),
        "teacher": {
            "latency_mean_ms": _ratio(d_lat, d_req) if d_lat is not None and d_req else None,
            "latency_mean_ms_total": _ratio(
                st.get(Stat.TEACHER_LATENCY_MS_SUM, 0), st.get(Stat.TEACHER_REQUESTS, 0)
            ),
            HB.LATENCY_P50_MS: max(p50s) if p50s else None,
            HB.LATENCY_P95_MS: max(p95s) if p95s else None,
            "latency_source": "heartbeats" if p95s or p50s else "counters (mean only)",
            "requests": st.get(Stat.TEACHER_REQUESTS, 0),
            "errors": st.get(Stat.TEACHER_ERRORS, 0),
            "retries": st.get(Stat.TEACHER_RETRIES, 0),
            Stat.RECLAIMED: st.get(Stat.RECLAIMED, 0),
        },
        "trainer": {
            "steps": st.get(Stat.TRAINER_STEPS, 0),
            "steps_per_s": rates["trainer_steps_per_s"],
            "data_wait_fraction": _ratio(d_wait, d_step) if d_wait is not None and d_step else None,
            "data_wait_fraction_total": _ratio(st.get(Stat.DATA_WAIT_MS, 0), st.get(Stat.STEP_MS, 0)),
            Stat.STALE_SKIPPED: st.get(Stat.STALE_SKIPPED, 0),
            Stat.REQUEUED: st.get(Stat.REQUEUED, 0),
        },
        "backpressure": {
            w.kind: {"entries": cur.lengths[w.kind], "bytes": _waiting_bytes(w, cur)}
            for w in keys.work_streams
        },
        "stats": dict(sorted(st.items())),
        "config": dict(sorted(cur.config.items())),
        "policy": {
            K.POLICY_VERSION: int(num(cur.policy.get(K.POLICY_VERSION)) or 0),
            K.POLICY_CHECKPOINT: cur.policy.get(K.POLICY_CHECKPOINT) or None,
            "updated_age_s": max(cur.server_ms - updated, 0) / 1000 if updated is not None else None,
        },
    }
