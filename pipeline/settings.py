"""Typed settings: one dataclass per process, filled from flags, ``GKD_*`` environment variables and TOML.

Precedence: flag > environment > TOML file (``--config FILE`` or ``GKD_CONFIG``) > the field's default.
A field declares its help text (one line) and optionally extra flag spellings in its metadata:

    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL (redis:// or rediss://).",
                             flags=("--redis",))

Field ``redis_url`` becomes the flag ``--redis-url`` (plus ``--redis``), the environment variable
``GKD_REDIS_URL`` and the TOML key ``redis_url`` (top level or under the table named by the command).
Lists accept repeated flags or comma-separated values. A field declared with `section(...)` nests a
settings dataclass shared by several processes (pipeline.sections); its fields keep their flat names.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_args, get_origin

from pipeline.errors import SettingsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")
ENV_PREFIX = "GKD_"


def setting(
    default: Any,
    help: str,
    *,
    flags: Sequence[str] = (),
    choices: Sequence[str] | None = None,
    secret: bool = False,
    name: str | None = None,
) -> Any:
    """Declare a settings field: its default, one-line help, extra flag spellings, choices.

    `secret` fields (API keys, passwords) are masked by `redacted()`. `name` is the field's outside
    name (flag, environment variable, TOML key) when it differs from the attribute's.
    """
    meta = {"help": help, "flags": tuple(flags), "choices": choices, "secret": secret, "name": name}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, *expose: str, **defaults: Any) -> Any:
    """Declare a nested settings dataclass (a section shared by several processes).

    Its fields keep their own outside names (``--k``, ``GKD_K``, TOML ``k``); only those named in
    `expose` (all when none are named) become settings of the enclosing process, the others keep
    their defaults. `defaults` override the section's own defaults for this process.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    if not set(expose) | set(defaults) <= names:
        raise TypeError(f"section {cls.__name__}: no fields {sorted((set(expose) | set(defaults)) - names)}")
    meta = {"section": cls, "expose": expose or tuple(sorted(names)), "defaults": defaults}
    return dataclasses.field(default_factory=lambda: cls(**defaults), metadata=meta)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One setting as users see it: outside name, the attribute path to it, its field and type."""

    name: str
    path: tuple[str, ...]
    field: dataclasses.Field[Any]
    type: Any
    default: Any

    @property
    def dest(self) -> str:
        return "__".join(self.path)


def _leaves(cls: type, prefix: tuple[str, ...] = (), expose: Sequence[str] | None = None,
            defaults: Mapping[str, Any] | None = None) -> list[_Leaf]:  # fmt: skip
    out: list[_Leaf] = []
    for f, tp in _fields(cls):
        if expose is not None and f.name not in expose:
            continue
        if "section" in f.metadata:
            m = f.metadata
            out += _leaves(m["section"], (*prefix, f.name), m["expose"], m["defaults"])
            continue
        if defaults and f.name in defaults:
            default = defaults[f.name]
        else:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out.append(_Leaf(f.metadata.get("name") or f.name, (*prefix, f.name), f, tp, default))
    names = [leaf.name for leaf in out]
    if len(set(names)) != len(names):
        raise TypeError(
            f"{cls.__name__}: settings named twice: {sorted({n for n in names if names.count(n) > 1})}"
        )
    return out


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X`, `X | None`, `Optional[X]`."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _convert(name: str, tp: Any, raw: Any) -> Any:
    base, optional = _base_type(tp)
    if optional and (raw is None or (isinstance(raw, str) and raw.lower() in ("", "none"))):
        return None
    origin = get_origin(base)
    try:
        if origin is list:
            (item,) = get_args(base)
            items: list[Any] = []
            for part in raw if isinstance(raw, list) else [raw]:
                if isinstance(part, str):
                    items.extend(p.strip() for p in part.split(",") if p.strip())
                else:
                    items.append(part)
            return [_convert(name, item, p) for p in items]
        if base is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base is int and isinstance(raw, float):
            raise ValueError(raw)
        return base(raw)
    except (TypeError, ValueError):
        raise SettingsError(
            f"setting {name}: expected {getattr(base, '__name__', base)}, got {raw!r}"
        ) from None


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per setting of `cls` (defaults are resolved later, so every flag defaults to None)."""
    parser.add_argument("--config", help="TOML file with settings (lowest precedence; also GKD_CONFIG).")
    for leaf in _leaves(cls):
        f = leaf.field
        flag = "--" + leaf.name.replace("_", "-")
        names = [flag, *[x for x in f.metadata.get("flags", ()) if x != flag]]
        base, _ = _base_type(leaf.type)
        env = ENV_PREFIX + leaf.name.upper()
        shown = _shown_default(leaf.default, bool(f.metadata.get("secret")))
        help_text = f"{f.metadata.get('help', '')} [env {env}; default {shown!r}]"
        kwargs: dict[str, Any] = {"dest": leaf.dest, "default": None, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is list:
            kwargs["action"] = "append"
            kwargs["metavar"] = leaf.name.upper()
        else:
            kwargs["metavar"] = leaf.name.upper()
        parser.add_argument(*names, **kwargs)


def _shown_default(default: Any, secret: bool) -> Any:
    """A default as --help shows it: a secret's value masked, but a URL shown with only its password masked
    (the default Redis URL has none: users must see where a process looks for Redis)."""
    if not secret or not default:
        return default
    return mask_url(default) if isinstance(default, str) and "://" in default else "***"


def setting_names(cls: type) -> set[str]:
    """The outside names of every setting of `cls` (flag ``--<name>``, variable ``GKD_<NAME>``)."""
    return {leaf.name for leaf in _leaves(cls)}


def secret_flags(cls: type) -> dict[str, str]:
    """Every flag spelling of a secret setting of `cls` -> its environment variable."""
    out: dict[str, str] = {}
    for leaf in _leaves(cls):
        if leaf.field.metadata.get("secret"):
            for flag in ("--" + leaf.name.replace("_", "-"), *leaf.field.metadata.get("flags", ())):
                out[flag] = ENV_PREFIX + leaf.name.upper()
    return out


#: The settings class of every `gkd` command ("module:Class"). One TOML file may serve them all: its top
#: level holds settings of any of them (a command ignores those it does not have), a table named after a
#: command holds that command's own. tests/test_settings.py checks that every command is listed.
COMMAND_SETTINGS = (
    "pipeline.train.settings:TrainSettings",
    "pipeline.score.pool:WorkerSettings",
    "pipeline.produce.producer:RolloutSettings",
    "pipeline.serve.server:TeacherServerSettings",
    "pipeline.local.demo:DemoSettings",
    "workers.status:StatusSettings",
    "workers.runs:RunsSettings",
    "pipeline.dataset.exporter:ExportSettings",
    "pipeline.dataset.replayer:ReplaySettings",
)


def all_setting_names() -> set[str]:
    """The outside names of every setting of every `gkd` command (imports their modules)."""
    import importlib

    names: set[str] = set()
    for spec in COMMAND_SETTINGS:
        module, _, cls = spec.partition(":")
        names |= setting_names(getattr(importlib.import_module(module), cls))
    return names


def _toml(path: str | None, table: str | None, known: set[str]) -> dict[str, Any]:
    """The settings of a TOML file for one command: the top level, then the command's table over it.

    A key of the command's table must be one of its settings; a top-level key must be a setting of some
    `gkd` command (a shared file), so a typo is refused wherever it is.
    """
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path}: expected readable TOML, got {exc}") from exc
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    own: dict[str, Any] = data[table] if table and isinstance(data.get(table), dict) else {}
    if table is not None:
        unknown = sorted(set(own) - known - {"config"})
        if unknown:
            raise SettingsError(
                f"config file {path}: table [{table}] has unknown settings {unknown}; expected some of "
                f"{sorted(known)}"
            )
        stray = sorted(set(top) - known - {"config"})
        if stray and (stray := sorted(set(stray) - all_setting_names())):
            raise SettingsError(
                f"config file {path}: unknown settings {stray} (no gkd command has them); expected "
                f"settings of gkd commands (see gkd <command> --help), at the top level or in a table "
                f"named after the command"
            )
    return {**{k: v for k, v in top.items() if k in known}, **own}


def resolve(
    cls: type[T],
    ns: argparse.Namespace | None = None,
    *,
    env: Mapping[str, str] | None = None,
    table: str | None = None,
) -> T:
    """Build `cls` from parsed flags, then environment, then TOML (top level and table `table`), then
    defaults. Validates choices; sections validate themselves (raising SettingsError)."""
    env = os.environ if env is None else env
    given = vars(ns) if ns is not None else {}
    known = setting_names(cls)
    toml = _toml(given.get("config") or env.get(ENV_PREFIX + "CONFIG"), table, known)
    leaves = _leaves(cls)
    values: dict[tuple[str, ...], Any] = {}
    for leaf in leaves:
        raw: Any = given.get(leaf.dest)
        if raw is None:
            raw = env.get(ENV_PREFIX + leaf.name.upper())
        if raw is None:
            raw = toml.get(leaf.name)
        if raw is None:
            continue
        value = _convert(leaf.name, leaf.type, raw)
        choices = leaf.field.metadata.get("choices")
        if choices and value not in choices:
            raise SettingsError(f"setting {leaf.name}: expected one of {list(choices)}, got {value!r}")
        values[leaf.path] = value
    return _build(cls, values)


def _build(
    cls: type[T], values: Mapping[tuple[str, ...], Any], defaults: Mapping[str, Any] | None = None
) -> T:
    kwargs: dict[str, Any] = dict(defaults or {})
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if "section" in f.metadata:
            inner = {p[1:]: v for p, v in values.items() if p[0] == f.name}
            kwargs[f.name] = _build(f.metadata["section"], inner, f.metadata["defaults"])
        elif (f.name,) in values:
            kwargs[f.name] = values[(f.name,)]
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section's validation
        raise SettingsError(str(exc)) from exc


def parse(cls: type[T], argv: Sequence[str], prog: str, description: str = "") -> T:
    """Parse `argv` into `cls` (flags, env, TOML). Exits with usage on unknown flags, like argparse;
    raises SettingsError for a bad value (the command line reports it in one line)."""
    # No abbreviations: `--api` must not silently mean `--api-key` (secrets are stripped by exact name).
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    add_arguments(parser, cls)
    # Read by the `gkd` command line before the command runs (workers/cli.py); listed for --help.
    parser.add_argument(
        "--debug", action="store_true", help="On a failure, show the Python traceback (also GKD_DEBUG=1)."
    )
    ns = parser.parse_args(list(argv))
    return resolve(cls, ns, table=prog.split()[-1])


def changed(obj: Any) -> dict[str, Any]:
    """The settings of `obj` (outside name -> value) whose values differ from their defaults."""
    out: dict[str, Any] = {}
    for leaf in _leaves(type(obj)):
        value = obj
        for part in leaf.path:
            value = getattr(value, part)
        if value != leaf.default:
            out[leaf.name] = value
    return out


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def to_argv(obj: Any) -> list[str]:
    """`obj`'s non-default settings as command-line flags (what `parse` turns back into `obj`)."""
    out: list[str] = []
    for name, value in changed(obj).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        else:
            out += [flag, _text(value)]
    return out


def redacted(obj: Any) -> dict[str, Any]:
    """The settings as a dict (sections nested) with secrets masked, safe to log."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "section" in f.metadata:
            value = redacted(value)
        elif f.metadata.get("secret") and value:
            value = mask_url(value) if isinstance(value, str) and "://" in value else "***"
        out[f.name] = value
    return out


def mask_url(url: str) -> str:
    """A URL with any password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, _, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in cred else f"{scheme}://***@{host}"
