"""`gkd bench <suite> [--json] [suite options]`: run a benchmark suite.

Each suite is a module `workers.bench.<suite>` with `run(args: list[str]) -> list[dict]`; every dict is
one measurement ``{"bench", "metric", "value", "unit", "baseline", "ratio"}`` (baseline and ratio None
where there is none; ratio says how many times better than the baseline, > 1 is better), optionally
with more keys after those (``spread`` and ``seeds`` of a value averaged over seeds). With ``--json``
each is printed as one JSON line, else as an aligned table.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

SUITES: dict[str, str] = {
    "codec": "encode/decode of a ScoredSample (T=4096, k=64) against a memory copy",
    "worker": "teacher worker pool against an ms-swift-style blocking baseline",
    "loss": "top-k GKD loss time and peak memory against a full-vocabulary loss",
    "trainer": "data-wait fraction of step time with prefetch on and off",
    "e2e": "async pipeline against a synchronous fetch-then-train loop",
    "redis_loss": "what a Redis kill -9 loses with appendfsync always vs everysec",
    "redis": "samples/s handed off and consumed through one Redis node and a 3-master cluster (P=3, 6)",
    "teacher": "gkd workers against vllm serve (JSON), gkd teacher --engine vllm and gkd teacher (binary)",
    "serve": "positions/s of the reference teacher server (gkd teacher) scoring for the worker pool",
    "export": "scored datasets: bytes per token on disk, export and replay throughput",
    "fidelity": "student quality after distillation with each loss (trains models, ~20 min on 2 cores)",
}

ON_REQUEST = ("redis_loss", "redis", "teacher", "serve", "fidelity")
"""Suites that `all` leaves out: redis_loss and redis measure Redis itself, teacher needs vLLM (its own
environment), serve the reference server on a device (the GPU check runs it), fidelity trains models
for about 20 minutes."""

FIELDS = ("bench", "metric", "value", "unit", "baseline", "ratio")


def result(
    bench: str,
    metric: str,
    value: float,
    unit: str,
    baseline: float | None = None,
    ratio: float | None = None,
) -> dict[str, Any]:
    """One measurement in the output format of ARCHITECTURE.md ("Tests and benchmarks")."""
    return {
        "bench": bench,
        "metric": metric,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    if not args or args[0] in ("-h", "--help"):
        print("usage: gkd bench <suite|all> [--json] [suite options]\n\nsuites:")
        for name, desc in SUITES.items():
            print(f"  {name:<10} {desc}")
        return 0 if args else 2
    suite, rest = args[0], args[1:]
    names = [n for n in SUITES if n not in ON_REQUEST] if suite == "all" else [suite]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(
            f"gkd bench: unknown suite {unknown[0]!r}; expected one of {', '.join(SUITES)} or all",
            file=sys.stderr,
        )
        return 2
    for name in names:
        module = importlib.import_module(f"workers.bench.{name}")
        rows: list[dict[str, Any]] = module.run(rest)
        for row in rows:
            if as_json:
                extra = {k: v for k, v in row.items() if k not in FIELDS}
                print(json.dumps({k: row.get(k) for k in FIELDS} | extra), flush=True)
            else:
                print("  ".join(f"{_fmt(row.get(k)):>14}" for k in FIELDS), flush=True)
    return 0
