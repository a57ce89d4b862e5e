"""The `gkd` command line: one subcommand per process a user starts. Each module's `main(argv)` runs it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

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
    "bench": ("workers.bench.cli", "Run a benchmark suite (codec, worker, loss, trainer, e2e)."),
}


def usage() -> str:
    lines = ["usage: gkd <command> [options]   (gkd <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"gkd: unknown command {name!r}; expected one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
