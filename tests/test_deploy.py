"""deploy/: the compose file, the Kubernetes manifests, the systemd units and the Dockerfile parse, hang
together (ports, names, grace periods) and start `gkd` subcommands, flags and GKD_* settings that exist."""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import importlib
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.sections import CommonSettings
from pipeline.settings import ENV_PREFIX, add_arguments, setting_names
from workers.cli import COMMANDS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
GKD_BIN = ("gkd", "/opt/gkd/.venv/bin/gkd")


@dataclass
class Launch:
    """One `gkd` process a deployment file starts."""

    where: str
    argv: list[str]
    """The command line, placeholders already resolved."""
    env: dict[str, str]
    """Environment set for this process alone."""
    shared_env: dict[str, str] = field(default_factory=dict)
    """Environment shared by every process of the run (a ConfigMap, a compose anchor)."""

    def gkd_args(self) -> tuple[str, list[str]]:
        """(subcommand, its arguments), whether started as `gkd ...` or `torchrun ... -m workers.cli ...`."""
        argv = self.argv
        if Path(argv[0]).name == "torchrun":
            from torch.distributed.run import get_args_parser

            ns = get_args_parser().parse_args(argv[1:])
            assert ns.module and ns.training_script == "workers.cli", f"{self.where}: {argv}"
            return ns.training_script_args[0], ns.training_script_args[1:]
        assert argv[0] in GKD_BIN, f"{self.where}: expected gkd or torchrun, got {argv}"
        return argv[1], argv[2:]


def substitute(pattern: str, values: dict[str, str], text: str) -> str:
    """`text` with every match of `pattern` (group 1: a variable name) replaced by its value."""
    return re.sub(pattern, lambda m: values[m.group(1)], text)


# ---------------------------------------------------------------------------------- compose


def dotenv(path: Path) -> dict[str, str]:
    """NAME=value lines (comments after ' #' dropped, as compose and systemd examples are written)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} over a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        assert op != ":?", f"compose requires {name} and deploy/.env.example does not set it"
        return arg if op in (":-", "-") else ""

    return _COMPOSE_VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        pytest.skip("`docker compose version` fails here: no compose plugin (the YAML checks still run)")
    proc = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(DEPLOY / ".env.example"), "config", "-q"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "teacher", "workers", "trainer", "rollouts", "status"} <= set(services)
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--appendfsync everysec" in redis_cmd
    assert "--requirepass ${REDIS_PASSWORD" in redis_cmd
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert "redis-data" in compose["volumes"]
    teacher = services["teacher"]
    assert teacher["image"].startswith("vllm/vllm-openai:") and teacher["entrypoint"] == ["vllm", "serve"]
    cmd = teacher["command"]
    assert cmd[cmd.index("--max-logprobs") + 1] == "${GKD_K:-20}"
    for name in ("teacher", "trainer"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
    assert str(services["workers"]["deploy"]["replicas"]).startswith("${WORKER_REPLICAS")
    for name in ("redis", "teacher", "workers"):
        assert services[name]["healthcheck"]["test"], name
    assert services["workers"]["depends_on"]["teacher"]["condition"] == "service_healthy"
    assert (COMPOSE.parent / services["workers"]["build"]["context"] / "deploy/Dockerfile").exists()


def test_compose_settings_come_from_the_environment(compose: dict[str, Any]) -> None:
    example = dotenv(DEPLOY / ".env.example")
    used = {m.group(1) for m in _COMPOSE_VAR.finditer(COMPOSE.read_text())}
    required = {m.group(1) for m in _COMPOSE_VAR.finditer(COMPOSE.read_text()) if m.group(2) == ":?"}
    assert required <= set(example), f"required but not in .env.example: {required - set(example)}"
    assert used - set(example) <= {"GKD_TEACHER"}, f"undocumented: {used - set(example)}"
    for name in ("workers", "trainer", "rollouts", "status"):
        env = compose["services"][name]["environment"]
        assert env["GKD_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD"), name
        assert env["GKD_RUN"] == "${GKD_RUN:-gkd}", name


def compose_launches(compose: dict[str, Any]) -> list[Launch]:
    env = dotenv(DEPLOY / ".env.example")
    shared = interpolate(compose["x-gkd-env"], env)
    out = []
    for name, svc in interpolate(compose["services"], env).items():
        if not str(svc.get("image", "")).startswith(env["GKD_IMAGE"]):
            continue
        argv = list(svc.get("entrypoint", ["gkd"])) + list(svc["command"])
        own = {k: str(v) for k, v in svc["environment"].items() if k not in shared}
        out.append(Launch(f"compose {name}", argv, own, {k: str(v) for k, v in shared.items()}))
    return out


# ------------------------------------------------------------------------------- kubernetes


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_k8s_manifests_have_the_expected_objects(manifests: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in manifests}
    assert {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Deployment", "Job", "Service",
            "PodDisruptionBudget", "PersistentVolumeClaim"} <= kinds  # fmt: skip
    assert all(d["metadata"].get("namespace") == "gkd" for d in manifests if d["kind"] != "Namespace")
    redis = by_kind(manifests, "StatefulSet")["redis"]
    cmd = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "--appendonly yes" in cmd and "--appendfsync everysec" in cmd and "--requirepass" in cmd
    assert redis["spec"]["volumeClaimTemplates"]
    teacher = by_kind(manifests, "Deployment")["teacher"]["spec"]["template"]["spec"]["containers"][0]
    assert teacher["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--max-logprobs" in teacher["args"]
    workers = by_kind(manifests, "Deployment")["workers"]
    res = workers["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"] and res["limits"]
    pdb = by_kind(manifests, "PodDisruptionBudget")["workers"]
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= workers["spec"]["template"]["metadata"]["labels"].items()
    )


def test_k8s_references_resolve(manifests: list[dict[str, Any]]) -> None:
    """Secret/ConfigMap keys exist, Service selectors match pods, probes name declared ports."""
    secrets = {
        n: set(d.get("stringData", d.get("data", {}))) for n, d in by_kind(manifests, "Secret").items()
    }
    configs = {n: set(d["data"]) for n, d in by_kind(manifests, "ConfigMap").items()}
    pods = [
        (d["metadata"]["name"], d["spec"]["template"]) for d in manifests if "template" in d.get("spec", {})
    ]
    for name, tmpl in pods:
        for c in tmpl["spec"]["containers"]:
            ports = {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, f"{name}: {probe} port {port} not in {ports}"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]], (name, e)
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in configs[ref["configMapKeyRef"]["name"]], (name, e)
    labels = [t["metadata"]["labels"] | {"job-name": n} for n, t in pods]
    for svc in by_kind(manifests, "Service").values():
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= lab.items() for lab in labels), f"service {svc['metadata']['name']}"


def test_k8s_trainer_is_an_indexed_job_with_torchrun_rendezvous(manifests: list[dict[str, Any]]) -> None:
    job = by_kind(manifests, "Job")["trainer"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    svc = by_kind(manifests, "Service")[pod["subdomain"]]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    c = pod["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    args = c["args"]
    assert (
        args[args.index("--nnodes") + 1] == "$(NNODES)" and int(env["NNODES"]["value"]) == spec["completions"]
    )
    assert args[args.index("--node-rank") + 1] == "$(NODE_RANK)"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    master = args[args.index("--master-addr") + 1]
    assert master.startswith(f"{job['metadata']['name']}-0.{pod['subdomain']}.")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == int(env["GPUS_PER_NODE"]["value"])


def test_k8s_grace_periods_cover_the_processes_own(manifests: list[dict[str, Any]]) -> None:
    workers = by_kind(manifests, "Deployment")["workers"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in workers["containers"][0]["env"]}
    assert workers["terminationGracePeriodSeconds"] > float(env["GKD_GRACE_S"])
    assert env["GKD_METRICS_HOST"] == "0.0.0.0"
    assert int(env["GKD_METRICS_PORT"]) in {p["containerPort"] for p in workers["containers"][0]["ports"]}
    trainer = by_kind(manifests, "Job")["trainer"]["spec"]["template"]["spec"]
    tenv = {e["name"]: e.get("value") for e in trainer["containers"][0]["env"]}
    assert trainer["terminationGracePeriodSeconds"] > int(tenv["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])


def test_finite_processes_are_not_restarted_into_a_replay(
    compose: dict[str, Any], manifests: list[dict[str, Any]]
) -> None:
    """A producer exits 0 after its passes over the prompts: a restart-always wrapper must loop it instead."""
    deploy = by_kind(manifests, "Deployment")["rollouts"]["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in deploy["env"]}["GKD_EPOCHS"] == "0"
    services = compose["services"]
    assert services["rollouts"]["restart"] == "on-failure" and services["trainer"]["restart"] == "on-failure"


def k8s_launches(docs: list[dict[str, Any]]) -> list[Launch]:
    configs = {n: d["data"] for n, d in by_kind(docs, "ConfigMap").items()}
    out = []
    for d in docs:
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if not c["image"].startswith("gkd-pipeline"):
                continue
            shared = {
                k: v for ref in c.get("envFrom", []) for k, v in configs[ref["configMapRef"]["name"]].items()
            }
            # Secret and field references resolve at run time: "0" stands in for them here.
            own = {e["name"]: str(e.get("value", "0")) for e in c.get("env", [])}
            values = shared | own
            argv = [
                substitute(r"\$\((\w+)\)", values, a) for a in c.get("command", ["gkd"]) + c.get("args", [])
            ]
            out.append(Launch(f"k8s {d['metadata']['name']}", argv, own, shared))
    return out


# ---------------------------------------------------------------------------------- systemd


def unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    cp.read_string(path.read_text())
    return cp


def test_systemd_units() -> None:
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {p.name for p in units} >= {"gkd-workers.service", "gkd-trainer.service"}
    for path in units:
        u = unit(path)
        assert {"Unit", "Service", "Install"} <= set(u.sections()), path.name
        svc = u["Service"]
        assert svc["Restart"] == "on-failure" and svc["KillSignal"] == "SIGTERM", path.name
        env_file = DEPLOY / "systemd" / Path(svc["EnvironmentFile"]).name
        assert env_file.exists(), f"{path.name}: no example {env_file.name}"
        env = dotenv(env_file)
        stop_s = int(svc["TimeoutStopSec"])
        grace = float(env.get("GKD_GRACE_S", env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "0")))
        assert stop_s > grace > 0, (
            f"{path.name}: TimeoutStopSec {stop_s} must exceed the process grace {grace}"
        )


def test_systemd_analyze_verify_accepts_the_units() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (the configparser checks still run)")
    units = [str(p) for p in sorted((DEPLOY / "systemd").glob("*.service"))]
    proc = subprocess.run([tool, "verify", "--man=no", *units], capture_output=True, text=True, timeout=120)
    # The install paths (/opt/gkd/.venv/bin/...) do not exist on a test machine; anything else is an error.
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln and "is not executable" not in ln]
    assert not problems, problems


def systemd_launches() -> list[Launch]:
    out = []
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        svc = unit(path)["Service"]
        env = dotenv(DEPLOY / "systemd" / Path(svc["EnvironmentFile"]).name)
        argv = [substitute(r"\$\{(\w+)\}", env, a) for a in shlex.split(svc["ExecStart"])]
        out.append(Launch(f"systemd {path.name}", argv, env))
    return out


# ------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_torch_before_the_project() -> None:
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert any(ln.startswith("FROM python:3.11-slim") for ln in lines)
    torch_at = next(i for i, ln in enumerate(lines) if "pip install" in ln and "TORCH_SPEC" in ln)
    project_at = next(i for i, ln in enumerate(lines) if re.search(r"pip install \.(\s|$)", ln))
    assert torch_at < project_at
    user = next(ln.split()[1] for ln in lines if ln.startswith("USER "))
    assert user not in ("root", "0")
    assert 'ENTRYPOINT ["gkd"]' in lines


# --------------------------------------------------------------- commands, flags and settings


@pytest.fixture(scope="module")
def launches(compose: dict[str, Any], manifests: list[dict[str, Any]]) -> list[Launch]:
    return compose_launches(compose) + k8s_launches(manifests) + systemd_launches()


def settings_classes(sub: str) -> list[type]:
    """The CommonSettings dataclasses of a subcommand's module (skips when the module is not there yet)."""
    module_name = COMMANDS[sub][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        pytest.skip(f"{module_name} does not exist yet: its flags and settings cannot be checked")
    found = [
        v for v in vars(module).values()
        if isinstance(v, type) and dataclasses.is_dataclass(v) and issubclass(v, CommonSettings)
    ]  # fmt: skip
    if not found:
        pytest.skip(f"{module_name} has no CommonSettings dataclass to check flags against")
    return found


def test_every_launch_runs_an_existing_subcommand(launches: list[Launch]) -> None:
    subs = {launch.where: launch.gkd_args()[0] for launch in launches}
    assert set(subs.values()) <= set(COMMANDS), subs
    assert {"workers", "train", "rollouts"} <= set(subs.values())


@pytest.mark.parametrize("sub", ["workers", "train", "rollouts", "status"])
def test_flags_and_gkd_env_are_settings_of_the_subcommand(launches: list[Launch], sub: str) -> None:
    mine = [launch for launch in launches if launch.gkd_args()[0] == sub]
    assert mine, f"no deployment file starts gkd {sub}"
    classes = settings_classes(sub)
    parser = argparse.ArgumentParser(conflict_handler="resolve")
    fields = set()
    for cls in classes:
        add_arguments(parser, cls)
        fields |= setting_names(cls)
    per_sub = [_fields_or_none(s) for s in ("workers", "train", "rollouts", "status")]
    # A shared variable must be read by some process: checkable once every module exists.
    every = set().union(*per_sub) if all(f is not None for f in per_sub) else None  # type: ignore[arg-type]
    for launch in mine:
        _, args = launch.gkd_args()
        _, unknown = parser.parse_known_args(args)
        assert not unknown, f"{launch.where}: gkd {sub} has no flags {unknown}"
        for name in launch.env:
            if name.startswith(ENV_PREFIX):
                assert name[len(ENV_PREFIX) :].lower() in fields, f"{launch.where}: gkd {sub} ignores {name}"
        for name in launch.shared_env:
            if name.startswith(ENV_PREFIX) and every is not None:
                assert name[len(ENV_PREFIX) :].lower() in every, f"{launch.where}: no process reads {name}"


def _fields_or_none(sub: str) -> set[str] | None:
    """Field names of every settings class of `sub`, or None when its module is not written yet."""
    try:
        module = importlib.import_module(COMMANDS[sub][0])
    except ModuleNotFoundError:
        return None
    return {
        name for v in vars(module).values()
        if isinstance(v, type) and dataclasses.is_dataclass(v) and issubclass(v, CommonSettings)
        for name in setting_names(v)
    }  # fmt: skip


# ---------------------------------------------------------------------------------- Redis Cluster

CLUSTER = DEPLOY / "cluster"
CLUSTER_ENV = ("GKD_REDIS_CLUSTER", "GKD_PARTITIONS")


def test_compose_cluster_override_runs_a_partitioned_run_on_six_cluster_nodes(
    compose: dict[str, Any],
) -> None:
    doc = yaml.safe_load((CLUSTER / "docker-compose.cluster.yml").read_text())
    services = doc["services"]
    nodes = [name for name, svc in services.items() if "command" in svc and "redis-server" in svc["command"]]
    assert nodes == ["redis", "redis-2", "redis-3", "redis-4", "redis-5", "redis-6"]
    for name in nodes:
        argv = services[name]["command"]
        assert argv[argv.index("--cluster-enabled") + 1] == "yes" and "--masterauth" in argv, name
        assert argv[argv.index("--cluster-config-file") + 1] == "nodes.conf", name
    create = " ".join(services["redis-cluster-create"]["entrypoint"])
    assert "--cluster-replicas 1" in create and "--cluster-yes" in create
    joined = create.split("--cluster create", 1)[1]
    assert all(f"getent hosts {n} " in joined for n in nodes), joined
    gkd = {"workers", "trainer", "rollouts", "status"}
    assert gkd <= set(compose["services"]), "the override names services of docker-compose.yml"
    for name in gkd:
        env = services[name]["environment"]
        assert env["GKD_REDIS_CLUSTER"] == "1" and "GKD_PARTITIONS" in env, name
    subs = {"workers": "workers", "trainer": "train", "rollouts": "rollouts", "status": "status"}
    for name, sub in subs.items():
        fields = set().union(*(setting_names(cls) for cls in settings_classes(sub)))
        for var in services[name]["environment"]:
            assert var[len(ENV_PREFIX) :].lower() in fields, f"gkd {sub} ignores {var}"


def test_k8s_redis_cluster_has_six_nodes_and_joins_them_with_a_replica_each() -> None:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "k8s" / "10-redis-cluster.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Service", "StatefulSet", "Job"}
    sts, svc = kinds["StatefulSet"], kinds["Service"]
    assert sts["spec"]["replicas"] == 6 and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert {p["port"] for p in svc["spec"]["ports"]} == {6379, 16379}  # clients and the cluster bus
    argv = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    assert argv[argv.index("--cluster-enabled") + 1] == "yes" and "--masterauth" in argv
    create = kinds["Job"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    pods = [f"redis-cluster-{i}.redis-cluster.gkd.svc:6379" for i in range(6)]
    assert all(p in create for p in pods) and "--cluster-replicas 1" in create
    # the settings the header asks to add to the run's ConfigMap are settings every process has
    for var in CLUSTER_ENV:
        assert var[len(ENV_PREFIX) :].lower() in setting_names(CommonSettings), var
