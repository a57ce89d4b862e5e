"""Typed settings: one dataclass per process, filled from flags, ``GKD_*`` environment variables and TOML.

Precedence: flag > environment > TOML file (``--config FILE`` or ``GKD_CONFIG``) > the field's default.
A field declares its help text (one line) and optionally extra flag spellings in its metadata:

    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL (redis:// or rediss://).",
                             flags=("--redis",))

Field ``redis_url`` becomes the flag ``--redis-url`` (plus ``--redis``), the environment variable
``GKD_REDIS_URL`` and the TOML key ``redis_url`` (top level or under the table named by the command).
Lists accept repeated flags or comma-separated values.
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
from pipeline.queue.schema import DEFAULT_RUN

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
) -> Any:
    """Declare a settings field: its default, one-line help, extra flag spellings, choices.

    `secret` fields (API keys, passwords) are masked by `redacted()`.
    """
    meta = {"help": help, "flags": tuple(flags), "choices": choices, "secret": secret}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class CommonSettings:
    """Settings every process of a run shares."""

    # --run-name: under torchrun, `--run` is taken as an abbreviation of torchrun's own --run-path.
    run: str = setting(
        DEFAULT_RUN,
        "Run name: every Redis key of the run carries it as the hash tag {run}.",
        flags=("--run-name",),
    )
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "Redis URL (redis://[:password@]host:port/db, or rediss:// for TLS).",
        flags=("--redis",),
        secret=True,
    )
    log_level: str = setting("info", "Log level.", choices=("debug", "info", "warning", "error"))


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
    """Add one flag per field of `cls` (defaults are resolved later, so every flag defaults to None)."""
    parser.add_argument("--config", help="TOML file with settings (lowest precedence; also GKD_CONFIG).")
    for f, tp in _fields(cls):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *[x for x in f.metadata.get("flags", ()) if x != flag]]
        base, _ = _base_type(tp)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        env = ENV_PREFIX + f.name.upper()
        shown = "***" if f.metadata.get("secret") and default else default
        help_text = f"{f.metadata.get('help', '')} [env {env}; default {shown!r}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is list:
            kwargs["action"] = "append"
            kwargs["metavar"] = f.name.upper()
        else:
            kwargs["metavar"] = f.name.upper()
        parser.add_argument(*names, **kwargs)


def _toml(path: str | None, section: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path}: expected readable TOML, got {exc}") from exc
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    if section and isinstance(data.get(section), dict):
        merged.update(data[section])
    return merged


def resolve(
    cls: type[T],
    ns: argparse.Namespace | None = None,
    *,
    env: Mapping[str, str] | None = None,
    section: str | None = None,
) -> T:
    """Build `cls` from parsed flags, then environment, then TOML, then defaults. Validates choices."""
    env = os.environ if env is None else env
    given = vars(ns) if ns is not None else {}
    toml = _toml(given.get("config") or env.get(ENV_PREFIX + "CONFIG"), section)
    known = {f.name for f, _ in _fields(cls)}
    unknown = sorted(set(toml) - known - {"config"})
    if unknown and section is not None:
        raise SettingsError(f"config file: unknown settings {unknown}; expected some of {sorted(known)}")
    values: dict[str, Any] = {}
    for f, tp in _fields(cls):
        raw: Any = given.get(f.name)
        if raw is None:
            raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            raw = toml.get(f.name)
        if raw is None:
            continue
        value = _convert(f.name, tp, raw)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise SettingsError(f"setting {f.name}: expected one of {list(choices)}, got {value!r}")
        values[f.name] = value
    return cls(**values)


def parse(cls: type[T], argv: Sequence[str], prog: str, description: str = "") -> T:
    """Parse `argv` into `cls` (flags, env, TOML); exits with usage on bad flags, like argparse."""
    # No abbreviations: `--api` must not silently mean `--api-key` (secrets are stripped by exact name).
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    add_arguments(parser, cls)
    ns = parser.parse_args(list(argv))
    try:
        return resolve(cls, ns, section=prog.split()[-1])
    except SettingsError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def redacted(obj: Any) -> dict[str, Any]:
    """The settings as a dict with secrets masked, safe to log."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("secret") and value:
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
