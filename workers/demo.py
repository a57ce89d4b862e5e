"""`gkd demo`: the whole system on one machine, on embedded defaults, each part as its own process.

Everything runs from `pipeline.local.demo.run_demo`; this prints its summary. With `--json`, one line
``{"steps", "kl_first", "kl_last", "rollouts", "scored", "trained", "dead", "lost"}`` where
lost = produced - (trained + dead + still queued), which must be 0 (else the exit status is 1).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.local.demo import DemoSettings, run_demo
from pipeline.settings import parse


def _table(summary: dict[str, Any]) -> str:
    rows = [
        (k, "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        for k, v in summary.items()
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v:>10}" for k, v in rows)


def main(argv: list[str]) -> int:
    s = parse(DemoSettings, argv, prog="gkd demo", description=__doc__.split("\n\n")[0] if __doc__ else "")
    try:
        summary = run_demo(s)
    except KeyboardInterrupt:
        return 130
    if s.json_output:
        print(json.dumps(summary), flush=True)
        return 0 if summary["lost"] == 0 else 1
    print("\nsummary:\n" + _table(summary))
    kl_first, kl_last = summary["kl_first"], summary["kl_last"]
    if kl_first is not None and kl_last is not None:
        print(
            f"KL to the teacher fell from {kl_first:.3f} to {kl_last:.3f}"
            if kl_last < kl_first
            else f"KL to the teacher did not fall ({kl_first:.3f} -> {kl_last:.3f})"
        )
    print(f"inspect: gkd status --run {s.run.name}   |   redis-cli XLEN '{s.run.keys.ready.key}'")
    return 0 if summary["lost"] == 0 else 1
