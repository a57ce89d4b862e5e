"""Start a private Redis Cluster: masters and replicas of `redis-server --cluster-enabled yes` on loopback.

Used by the test suite (partitioned runs, failover, slot migration) and by `gkd bench redis`. Each node is
a `RedisServer` with its own data directory; `redis-cli --cluster create` joins them and assigns the slots.
A node's cluster bus listens on its port + 10000, so ports are chosen below 55536 with both free.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pipeline.local.redis_server import RedisServer, find_redis_server

#: Highest client port: the cluster bus port (+10000) must stay a valid port.
MAX_PORT = 55535


def find_redis_cli() -> str:
    """Path of redis-cli (next to redis-server, or on PATH)."""
    near = Path(find_redis_server()).with_name("redis-cli")
    path = str(near) if near.exists() else shutil.which("redis-cli")
    if not path:
        raise FileNotFoundError("expected redis-cli next to redis-server or on PATH, found none")
    return path


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(n: int, rng: random.Random | None = None) -> list[int]:
    """`n` ports below `MAX_PORT` whose port and bus port (+10000) are free now."""
    rng = rng or random.Random()
    out: list[int] = []
    while len(out) < n:
        port = rng.randint(20000, MAX_PORT)
        if port not in out and _free(port) and _free(port + 10000):
            out.append(port)
    return out


class RedisCluster:
    """`masters` masters with `replicas` replicas each, on loopback; `url` is a seed node."""

    def __init__(self, masters: int = 3, replicas: int = 1, *, node_timeout_ms: int = 2000) -> None:
        self.masters, self.replicas = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout_s: float = 60.0) -> RedisCluster:
        ports = cluster_ports(self.masters * (1 + self.replicas))
        args = [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
        ]  # fmt: skip
        try:
            for port in ports:
                self.nodes.append(RedisServer(port, extra_args=args).start())
            create = [find_redis_cli(), "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
            create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            subprocess.run(create, check=True, capture_output=True, timeout=timeout_s)
            self.wait_ok(timeout_s)
        except BaseException:
            self.cleanup()
            raise
        return self

    def cli(self, *args: str, port: int | None = None, timeout_s: float = 30.0) -> str:
        """Run redis-cli against one node (default: the seed); returns its output."""
        cmd = [find_redis_cli(), "-p", str(port or self.nodes[0].port), *args]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout_s).stdout

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Wait until every live node says cluster_state:ok and covers all 16384 slots, and every live
        replica's link to its master is up (its initial sync done)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                infos = [self.cli("cluster", "info", port=n.port) for n in self.live()]
                links = [self.cli("info", "replication", port=n.port) for n in self.live()]
            except subprocess.SubprocessError:
                infos, links = [], []
            synced = all("role:master" in i or "master_link_status:up" in i for i in links)
            if (
                infos
                and synced
                and all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos)
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster not ok within {timeout_s} s: {infos[:1]}")
            time.sleep(0.2)

    def master_ports(self) -> list[int]:
        """Ports of the nodes that are masters now (per the seed's view, live nodes only)."""
        live = {n.port for n in self.live()}
        seed = next(iter(live))
        out = []
        for line in self.cli("cluster", "nodes", port=seed).splitlines():
            parts = line.split()
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            if "master" in parts[2] and "fail" not in parts[2] and port in live:
                out.append(port)
        return sorted(out)

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()
        self.nodes = []

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
