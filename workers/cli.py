"""The `gkd` command line: one subcommand per process a user starts. Each module's `main(argv)` runs it.

Failures are reported here, once for every command (`run_command`): an expected failure (any
`pipeline.errors.GKDError`: bad settings, a refused start, an unreachable service) is one line on stderr,
``gkd <command>: <what was expected, what came, how to fix it>``, and exit status 2; Ctrl-C is exit status
130 without a traceback. A traceback is shown only with ``--debug`` (or ``GKD_DEBUG=1``, which child
processes inherit); anything else is a bug and keeps Python's traceback (exit status 1).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from pipeline.errors import GKDError

#: subcommand -> (module with `main(argv) -> int`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("workers.demo", "Run the whole system on one machine on embedded defaults."),
    "teacher": (
        "workers.teacher_server",
        "Serve a Hugging Face causal LM with the vLLM prompt_logprobs API.",
    ),
    "workers": ("workers.pool", "Run the teacher worker pool: rollouts -> teacher top-k -> ready."),
    "train": ("workers.trainer", "Train the student on ready samples with the top-k GKD loss."),
    "rollouts": ("workers.rollouts", "Produce rollouts from JSONL prompts (dataset or on-policy student)."),
    "export": ("workers.export", "Write a run's scored samples into Parquet shards (a scored dataset)."),
    "replay": ("workers.replay", "Feed a scored dataset into a run's ready stream, epoch by epoch."),
    "status": ("workers.status", "Show queue depths, lag, dead letters, workers and throughput of a run."),
    "runs": ("workers.runs", "List the runs in Redis; `gkd runs delete RUN` clears one."),
    "bench": ("workers.bench.cli", "Run a benchmark suite (codec, worker, loss, trainer, e2e, ...)."),
}

#: Environment variable that turns on tracebacks (set by --debug, inherited by child processes).
DEBUG_ENV = "GKD_DEBUG"


def usage() -> str:
    lines = [
        "usage: gkd [--version] [--debug] <command> [options]   (gkd <command> --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "--debug (anywhere, or GKD_DEBUG=1): show the Python traceback of a failure."]
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return f"gkd-pipeline {dist_version('gkd-pipeline')}"
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "gkd-pipeline (not installed)"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def run_command(name: str, fn: Callable[[], int]) -> int:
    """Run one command's body; report an expected failure in one line (exit 2), Ctrl-C as exit 130."""
    try:
        return fn()
    except KeyboardInterrupt:
        if debugging():
            traceback.print_exc()
        print(f"gkd {name}: interrupted", file=sys.stderr, flush=True)
        return 130
    except GKDError as exc:
        if debugging():
            traceback.print_exc()
        print(f"gkd {name}: {exc}", file=sys.stderr, flush=True)
        return 2


def _interrupted_exit() -> None:
    """After Ctrl-C, leave now: threads still loading a model (non-daemon, maybe for minutes) must not
    hold the exit, and nothing may raise a second KeyboardInterrupt during interpreter shutdown."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(130)


def main(argv: Sequence[str] | None = None) -> int:
    # torch logs cache statistics at INFO from an atexit hook: noise at the end of every command's log.
    logging.getLogger("torch").setLevel(logging.WARNING)
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args.remove("--debug")
        os.environ[DEBUG_ENV] = "1"  # children (worker pool, demo) inherit it
    if args[:1] in (["-h"], ["--help"], ["help"]):
        print(usage())
        return 0
    if args[:1] == ["--version"]:
        print(version())
        return 0
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"gkd: unknown command {name!r}; expected one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2

    def body() -> int:
        module = importlib.import_module(COMMANDS[name][0])
        result: int = module.main(rest)
        return result

    status = run_command(name, body)
    if status == 130 and argv is None:  # the program itself (not a caller in this process) was interrupted
        _interrupted_exit()
    return status


if __name__ == "__main__":
    sys.exit(main())
