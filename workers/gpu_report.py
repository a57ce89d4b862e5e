"""The GPU check's output (workers/gpu_check.py): result rows, the summary table, the environment probe, and
the pytest plugin (`-p workers.gpu_report`) that writes one row per test of the `gpu` part."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

OUT_ENV = "GKD_GPU_CHECK_OUT"
PART_ENV = "GKD_GPU_CHECK_PART"


def append_row(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """One JSON line, in one write to a file opened for appending (rows of concurrent writers stay whole)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, default=str) + "\n")


def summary(out: Path) -> str:
    """A short table of the results file (the device tool shows the end of the output)."""
    lines = []
    for line in out.read_text().splitlines():
        row = json.loads(line)
        if "metric" in row:
            value = row["value"]
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            base = row.get("baseline")
            extra = f"  (baseline {base:.4g}, ratio {row['ratio']:.3g})" if isinstance(base, float) and \
                isinstance(row.get("ratio"), float) else ""  # fmt: skip
            lines.append(f"{row['part']:<8} {row['metric']:<40} {shown:>12} {row['unit']}{extra}")
        elif "test" in row and row.get("outcome") != "passed":
            lines.append(f"{row['part']:<8} {row['test']:<40} {row['outcome']}")
        elif "status" in row:
            lines.append(f"{row['part']:<8} {'status':<40} {row['status']:>12} {row.get('elapsed_s', '')}")
    return "\n".join(lines)


def probe() -> dict[str, Any]:
    """The environment the numbers come from."""
    import platform
    from importlib import metadata

    import torch

    from pipeline.local.redis_server import find_redis_server

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            device_count=torch.cuda.device_count(),
        )
    server = find_redis_server()
    version = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10).stdout
    info.update(redis_server=server, redis_server_version=version.split()[2] if version else None)
    # Versions from the installed metadata: importing transformers alone takes seconds.
    for name in (
        "transformers",
        "redis",
        "orjson",
        "hiredis",
        "pytest",
        "pytest-asyncio",
        "aiohttp",
        "numpy",
    ):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


# ---------------------------------------------------------------------------------------------- pytest plugin


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One row per test outcome (the call, or a setup/teardown that did not pass) while pytest runs."""
    out = os.environ.get(OUT_ENV)
    if not out or (report.when != "call" and report.passed):
        return
    row: dict[str, Any] = {
        "part": os.environ.get(PART_ENV, "tests"),
        "test": report.nodeid.split("::", 1)[-1],
        "when": report.when,
        "outcome": report.outcome,
        "duration_s": round(report.duration, 3),
    }
    if report.failed:
        row["error"] = str(report.longrepr)[-3000:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        row["detail"] = str(report.longrepr[2])
    append_row(out, row)


_warned: set[str] = set()


def pytest_warning_recorded(warning_message: Any, when: str, nodeid: str, location: Any) -> None:
    """Warnings do not fail the check (-W default), but the first 20 distinct ones are reported."""
    out = os.environ.get(OUT_ENV)
    text = f"{warning_message.category.__name__}: {warning_message.message}"
    if not out or text in _warned or len(_warned) >= 20:
        return
    _warned.add(text)
    append_row(out, {"part": os.environ.get(PART_ENV, "tests"), "warning": text[:500], "test": nodeid})
