"""Settings: flags beat GKD_* environment variables beat TOML beat defaults; bad values say what came."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from pipeline.errors import SettingsError
from pipeline.sections import CommonSettings
from pipeline.settings import add_arguments, mask_url, redacted, resolve, setting


@dataclasses.dataclass
class Demo(CommonSettings):
    k: int = setting(20, "Top-k.")
    teacher: list[str] = setting([], "Teacher URLs.")
    beta: float = setting(0.5, "JSD beta.")
    prefetch: bool = setting(True, "Prefetch batches.")
    api_key: str | None = setting(None, "API key.", secret=True)
    mode: str = setting("tail", "Loss mode.", choices=("tail", "renorm"))


def parse(argv: list[str], env: dict[str, str] | None = None) -> Demo:
    p = argparse.ArgumentParser()
    add_arguments(p, Demo)
    return resolve(Demo, p.parse_args(argv), env=env or {}, table="demo")


def test_defaults() -> None:
    s = parse([])
    assert (s.k, s.teacher, s.beta, s.prefetch, s.api_key, s.run.name) == (20, [], 0.5, True, None, "gkd")


def test_precedence_flag_env_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "gkd.toml"
    cfg.write_text(
        'k = 5\nbeta = 0.1\nrun = "top"\n[demo]\nmode = "renorm"\nteacher = ["http://a", "http://b"]\n'
    )
    env = {"GKD_CONFIG": str(cfg), "GKD_K": "7"}
    s = parse(["--beta", "0.9"], env)
    assert s.beta == 0.9  # flag
    assert s.k == 7  # env beats TOML
    assert s.mode == "renorm" and s.teacher == ["http://a", "http://b"] and s.run.name == "top"  # TOML


def test_lists_repeat_or_comma_and_bools() -> None:
    s = parse(["--teacher", "http://a,http://b", "--teacher", "http://c", "--no-prefetch"])
    assert s.teacher == ["http://a", "http://b", "http://c"] and s.prefetch is False
    assert parse([], {"GKD_PREFETCH": "false", "GKD_TEACHER": "x,y"}).teacher == ["x", "y"]


def test_redis_flag_alias_and_env_name() -> None:
    assert parse(["--run-name", "r2"]).run.name == "r2"
    assert parse(["--redis", "redis://h:1/0"]).run.redis_url == "redis://h:1/0"
    assert parse([], {"GKD_REDIS_URL": "redis://e:2/0"}).run.redis_url == "redis://e:2/0"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GKD_K": "many"}, "setting k: expected int, got 'many'"),
        ({"GKD_PREFETCH": "maybe"}, "setting prefetch: expected bool, got 'maybe'"),
        ({"GKD_MODE": "full"}, "setting mode: expected one of ['tail', 'renorm'], got 'full'"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse([], env)


def test_unknown_toml_key_is_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "gkd.toml"
    cfg.write_text("kk = 5\n")
    with pytest.raises(SettingsError, match="unknown settings \\['kk'\\]"):
        parse(["--config", str(cfg)])


def test_secrets_are_masked() -> None:
    s = parse(["--api-key", "sk-secret", "--redis", "redis://:hunter2@h:6379/0"])
    shown = redacted(s)
    assert shown["api_key"] == "***" and "hunter2" not in str(shown) and "sk-secret" not in str(shown)
    assert mask_url("rediss://user:pw@h:1/0") == "rediss://user:***@h:1/0"
    assert mask_url("redis://h:1/0") == "redis://h:1/0"


def test_every_commands_settings_are_known_to_a_shared_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A top-level TOML key is accepted when some gkd command has that setting: every command is listed."""
    import importlib

    from pipeline.settings import COMMAND_SETTINGS
    from workers.cli import COMMANDS

    class Parsed(Exception):
        pass

    seen: list[str] = []

    def capture(cls: type, *args: object, **kwargs: object) -> None:
        seen.append(f"{cls.__module__}:{cls.__name__}")
        raise Parsed

    for name, (module_name, _) in COMMANDS.items():
        if name == "bench":  # suites parse their own flags; no settings file
            continue
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, "parse", capture)
        with pytest.raises(Parsed):
            module.main([])
    assert set(seen) == set(COMMAND_SETTINGS)
