"""The Redis schema lives in pipeline/queue/schema.py only: checked on the syntax tree of every module.

Outside the schema module no string literal (docstrings aside) may
- spell a Redis key (``gkd:{run}:...`` or a glob of one), or
- equal a name the schema defines (heartbeat field, run-config field, dead-letter stage, stats counter,
  consumer group, stream entry field, policy field, role).

A few schema names are ordinary words with another meaning elsewhere (GENERIC below: wire-format fields,
command names, a chat message's role, ...). Those are refused only where they would name something in
Redis: among the arguments of a Redis command and in heartbeat fields.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pipeline.queue import schema as S

ROOT = Path(__file__).resolve().parents[1]

#: Schema names that are also common words, with where else they legitimately appear.
GENERIC = {
    "id": "wire-format field (codec), JSON bodies of the teacher protocols",
    "data": "wire-format tensor field (codec, mpack), JSON bodies of the teacher protocols",
    "k": "wire-format field (codec)",
    "policy_version": "wire-format field (codec)",
    "teacher": "gkd command, bench suite, wire-format field, status report section",
    "trainer": "bench suite, demo process, status report section",
    "worker": "bench suite",
    "rollouts": "gkd command, demo process, demo summary",
    "dead": "status report section, demo summary, trainer verdict",
    "scored": "demo summary, bench results",
    "step": "metrics.jsonl field",
    "role": "a chat message's role (prompts)",
    "stage": "Prometheus label of gkd_worker_dead_lettered_total",
    "gkd": "the project's name (logger names, the default run)",
    "export": "gkd command, bench suite, the export state of a scored dataset's manifest",
    "replay": "gkd command",
    "version": "field of a scored dataset's manifest",
    "teachers": "the workers' consumer group and run-config field; also gkd status's per-teacher section",
    "default": "argparse's default= (settings); the default teacher's name is schema.DEFAULT_TEACHER",
    "consumer": "the consumer of XPENDING's oldest entry in gkd status, a checkpoint's per-rank listing",
    "partitions": "the run setting's name (--partitions), a status report section",
}

#: Methods of a redis-py client or pipeline that send a command.
REDIS_COMMANDS = {
    "delete", "eval", "evalsha", "exists", "expire", "hget", "hgetall", "hincrby", "hmget",
    "hset", "pexpire", "scan_iter", "xack", "xadd", "xautoclaim", "xclaim", "xdel",
    "xgroup_create", "xinfo_groups", "xlen", "xpending", "xpending_range", "xrange", "xreadgroup",
    "xrevrange", "xtrim", "zadd",
}  # fmt: skip

KEY_SPELLING = re.compile(re.escape(S.PREFIX) + r":(\\)?\{")


def schema_names() -> set[str]:
    names = {v for cls in (S.HB, S.Role, S.Config, S.Stage, S.Stat) for k, v in vars(cls).items()
             if isinstance(v, str) and not k.startswith("_")}  # fmt: skip
    return names | {v for k, v in vars(S).items() if k.isupper() and isinstance(v, str)}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            out.add(id(first.value))
    return out


def _redis_contexts(tree: ast.AST) -> list[ast.AST]:
    """Arguments of Redis commands, and heartbeat fields (`fields=` of a Heartbeat, *heartbeat_fields)."""
    out: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr in REDIS_COMMANDS:
                out += [*node.args, *(kw.value for kw in node.keywords)]
            out += [kw.value for kw in node.keywords if kw.arg == "fields"]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.endswith(
            "heartbeat_fields"
        ):
            out.append(node)
    return out


def _section_args(tree: ast.AST) -> set[int]:
    """Arguments of `section(Cls, "field", ...)`: attribute names of a settings section, not Redis names."""
    return {
        id(arg) for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "section"
        for arg in node.args
    }  # fmt: skip


def violations(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, literal) of every schema name or key spelled in `source`."""
    tree = ast.parse(source)
    docs = _docstrings(tree) | _section_args(tree)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            value = node.value
            if KEY_SPELLING.search(value) or (value in names and value not in GENERIC):
                found.add((node.lineno, value))
    for ctx in _redis_contexts(tree):
        for node in ast.walk(ctx):
            if isinstance(node, ast.Constant) and node.value in GENERIC and node.value in names:
                found.add((node.lineno, node.value))
    return sorted(found)


def test_the_checker_finds_each_kind_of_spelling() -> None:
    names = schema_names()
    cases = {
        'k = "gkd:{demo}:ready"': "gkd:{demo}:ready",
        'p = f"gkd:\\\\{{{run}\\\\}}:*"': "gkd:\\{",
        'hb = {"in_flight": 3}': "in_flight",
        'cfg = {"teacher_model": "m"}': "teacher_model",
        'reason = ("decode", "x")': "decode",
        'r.hincrby(keys.stats, "trained_samples", 1)': "trained_samples",
        'r.hset(key, mapping={"step": 3})': "step",
        'Heartbeat(r, keys, "n", Role.WORKER, fields=lambda: {"teacher": t})': "teacher",
        'def _heartbeat_fields(self):\n    return {"step": 1}': "step",
    }
    for source, literal in cases.items():
        found = violations(source, names)
        assert found and (literal in found[0][1] or found[0][1] == literal), (source, found)
    clean = ['"""A docstring may say gkd:{demo}:ready and in_flight."""', 'ids = {"id": 1, "k": 4}',
             'msg = {"role": "user"}', 'COMMANDS = {"teacher": 1, "rollouts": 2}',
             'run: RunSettings = section(RunSettings, "name", "k", "loss_mode")']  # fmt: skip
    for source in clean:
        assert violations(source, names) == [], source


def test_no_redis_name_is_spelled_outside_the_schema_module() -> None:
    names = schema_names()
    assert set(GENERIC) <= names, sorted(set(GENERIC) - names)  # stale exemptions go
    bad = []
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("workers/**/*.py")]):
        if path == ROOT / "pipeline/queue/schema.py":
            continue
        for line, literal in violations(path.read_text(), names):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {literal!r}")
    assert not bad, "spell these through pipeline.queue.schema:\n" + "\n".join(bad)
