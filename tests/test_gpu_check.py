"""The GPU check (`make gpu-check`, workers/gpu_check.py): its CPU dry run runs every part at tiny sizes and
writes every result row, so the script a short GPU window depends on cannot rot; a part that hangs is
stopped at its own budget (its process group with it) and the parts after it still run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.local.redis_server import env_without_proxy
from workers.bench.cli import FIELDS
from workers.gpu_check import Part, Plan, run_check

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "tests", "loss", "model", "trainer", "serve")


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(1400)
def test_dry_run_runs_every_part_and_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.jsonl"
    # A deadline 5x the dry run's default (budgets stretch with it): on a loaded 2-core machine the parts
    # take several times their quiet durations, and the check must not be cut short by the load.
    cmd = [sys.executable, "-m", "workers.gpu_check", "--dry-run", "--out", str(out),
           "--work", str(tmp_path / "work"), "--deadline-s", "1200"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env_without_proxy(), capture_output=True, text=True,
                          timeout=1300)  # fmt: skip
    log = Path(str(out) + ".log")
    assert proc.returncode == 0, proc.stdout[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    rows = rows_of(out)
    assert rows[0]["part"] == "check" and rows[0]["dry_run"] is True and rows[0]["parts"] == list(PARTS)
    assert {r["part"]: r["status"] for r in rows if "status" in r} == dict.fromkeys(PARTS, "ok")
    env = next(r for r in rows if r["part"] == "env" and "torch" in r)
    assert env["cuda_available"] is False and env["redis_server"]

    # Every test of tests/test_gpu.py ran (on the CPU) and passed, each with its own row.
    declared = set(re.findall(r"^(?:async )?def (test_\w+)", (ROOT / "tests/test_gpu.py").read_text(), re.M))
    tests = [r for r in rows if r["part"] == "tests" and "outcome" in r]
    assert {t["test"].split("[")[0] for t in tests} == declared
    assert all(t["outcome"] == "passed" for t in tests), [t for t in tests if t["outcome"] != "passed"]

    # The benches' rows, in gkd bench's format, tagged with their part.
    metrics = {(r["part"], r["metric"]) for r in rows if "metric" in r}
    for want in [("loss", "tail_fwd_bwd_ms"), ("loss", "renorm_peak_rss_delta_mb"),
                 ("trainer", "data_wait_frac_prefetch"), ("trainer", "tokens_per_s_prefetch"),
                 ("serve", "positions_per_s_k8"), ("serve", "positions_per_s_k16")]:  # fmt: skip
        assert want in metrics, want
    for r in rows:
        if "metric" in r:
            assert set(FIELDS) <= set(r) and isinstance(r["value"], float), r
    model = next(r for r in rows if r["part"] == "model" and "parameters" in r)
    assert model["preset"] == "tiny" and model["parameters"] > 0
    assert "results in" in proc.stdout and "positions_per_s_k16" in proc.stdout  # the closing table


def test_a_hung_part_is_stopped_at_its_budget_and_the_rest_still_runs(tmp_path: Path) -> None:
    py = sys.executable
    pid_file = tmp_path / "grandchild.pid"
    hang = (  # prints a row, starts a grandchild in its process group, then hangs
        "import json, subprocess, sys, time;"
        "print(json.dumps({'metric': 'early', 'value': 1.0}), flush=True);"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)"
    )
    parts = [
        Part("hang", 3, [py, "-c", hang]),
        Part("after", 30, [py, "-c", 'print(\'{"metric": "late", "value": 2.0}\')']),
        Part("needs-hang", 30, [py, "-c", "print('never')"], needs=("hang",)),
        Part("fails", 30, [py, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]),
    ]
    out = tmp_path / "out.jsonl"
    t0 = time.monotonic()
    statuses = run_check(Plan(dry_run=True, out=out, work=tmp_path / "w"), 100, all_parts=parts)
    assert time.monotonic() - t0 < 40
    by_part = {s["part"]: s for s in statuses}
    assert by_part["hang"]["status"] == "timeout" and by_part["hang"]["elapsed_s"] < 20
    assert by_part["after"]["status"] == "ok"
    assert by_part["needs-hang"]["status"] == "skipped" and "hang" in by_part["needs-hang"]["detail"]
    assert by_part["fails"]["status"] == "failed" and by_part["fails"]["rc"] == 3
    assert "boom" in by_part["fails"]["error"]
    rows = rows_of(out)
    # The row printed before the hang was kept; every status row is in the file too.
    assert {"part": "hang", "metric": "early", "value": 1.0} in rows
    assert {"part": "after", "metric": "late", "value": 2.0} in rows
    assert [r["part"] for r in rows if "status" in r] == ["hang", "after", "needs-hang", "fails"]
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the hung part's child outlived its part"


def test_parts_are_skipped_once_the_deadline_is_near(tmp_path: Path) -> None:
    py = sys.executable
    parts = [Part("first", 30, [py, "-c", "import time; time.sleep(2)"]), Part("second", 30, [py, "-c", "0"])]
    # 11 s: enough to start the first part (10 s at least), not the second one after it.
    statuses = run_check(Plan(dry_run=True, out=tmp_path / "o.jsonl", work=tmp_path), 11, all_parts=parts)
    assert [s["status"] for s in statuses] == ["ok", "skipped"]
    assert "before the deadline" in statuses[1]["detail"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by init in this container) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
