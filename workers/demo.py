"""`gkd demo`: the whole system on one machine, on embedded defaults, each part as its own process.

Everything runs from `pipeline.local.demo.run_demo`; this prints its summary. With `--json`, one line
``{"steps", "kl_first", "kl_last", "rollouts", "scored", "trained", "dead", "queued_rollouts",
"queued_ready", "lost", "data_wait_after_warmup", "stalled_intervals"}`` where lost = rollouts -
(trained + dead + queued_rollouts + queued_ready), which must be 0 (else the exit status is 1).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.local.demo import DemoSettings, run_demo
from pipeline.queue.schema import RunKeys
from pipeline.settings import mask_url, parse


def _table(summary: dict[str, Any]) -> str:
    rows = [
        (k, "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        for k, v in summary.items()
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v:>10}" for k, v in rows)


def leftovers(s: DemoSettings, summary: dict[str, Any]) -> str | None:
    """Why work is left in the streams at the end (it is not lost: the trainer stopped first)."""
    ready, rollouts = summary["queued_ready"], summary["queued_rollouts"]
    if not ready and not rollouts:
        return None
    return (
        f"left in the streams: {ready} scored samples in ready, {rollouts} rollouts in rollouts: the trainer "
        f"stopped after --steps {s.steps} while the producer and the workers ran ahead; they are queued, not "
        f"lost (a longer run would train them)"
    )


def inspect_hint(s: DemoSettings) -> str:
    """How to look at the run afterwards: only possible on a Redis that outlives the demo."""
    run = s.run.name
    if s.redis_url is None:
        url = "redis://127.0.0.1:6379/0"
        return (
            f"the demo's private Redis stopped with it, and its run with it. To inspect a run afterwards, "
            f"give the demo a Redis that stays up: gkd demo --redis {url} --run demo-2, then "
            f"gkd status --run demo-2 --redis {url}"
        )
    url = mask_url(s.redis_url)
    hidden = " (with the password of your URL)" if url != s.redis_url else ""
    key = RunKeys(run).ready.key
    return f"inspect{hidden}: gkd status --run {run} --redis '{url}'   |   redis-cli -u '{url}' XLEN '{key}'"


def main(argv: list[str]) -> int:
    s = parse(DemoSettings, argv, prog="gkd demo", description=__doc__.split("\n\n")[0] if __doc__ else "")
    summary = run_demo(s)  # Ctrl-C: every process stopped, then exit status 130 (workers/cli.py)
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
    left = leftovers(s, summary)
    if left:
        print(left)
    print(inspect_hint(s))
    return 0 if summary["lost"] == 0 else 1
