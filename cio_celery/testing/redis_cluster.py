"""A throw-away Redis Cluster on loopback: three masters, no replicas, for tests and benchmarks.

Each master is a ``redis-server --cluster-enabled yes`` with its own folder (its
``nodes.conf``, and its AOF when asked), joined by ``redis-cli --cluster create``. A stopped
master started again keeps its slots: it reads its ``nodes.conf`` back.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from .redis_server import RedisServer

__all__ = ["RedisClusterServers", "free_cluster_port"]


def free_cluster_port() -> int:
    """A port free on 127.0.0.1 whose cluster bus port (``port + 10000``) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) on 127.0.0.1")


def _cluster_info(port: int) -> dict[str, str]:
    """``CLUSTER INFO`` of one node, as text fields."""
    client: Any = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        raw: Any = client.execute_command("CLUSTER INFO")
    finally:
        client.close()
    if isinstance(raw, (bytes, str)):
        text = raw.decode() if isinstance(raw, bytes) else raw
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {str(k): str(v) for k, v in dict(raw).items()}


def _node(executable: str, port: int, data_dir: Path, appendonly: bool, node_timeout_ms: int) -> RedisServer:
    """One master of the cluster: a private redis-server with cluster mode on."""
    return RedisServer(port=port, appendonly=appendonly, executable=executable, data_dir=str(data_dir),
                       extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                   "--cluster-node-timeout", str(node_timeout_ms)])


class RedisClusterServers:
    """Start a Redis Cluster of ``masters`` masters (no replicas) on 127.0.0.1, and stop it.

    ``url`` is the store URL cio_celery accepts for it (``redis+cluster://127.0.0.1:PORT``);
    ``node_urls`` are plain ``redis://`` URLs of each master, for looking at one of them.
    """

    def __init__(self, masters: int = 3, appendonly: bool = False, executable: str | None = None,
                 node_timeout_ms: int = 2000) -> None:
        if masters < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        exe = executable or shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if exe is None or cli is None:
            raise RuntimeError("redis-server and redis-cli are not installed (apt-get install redis-server)")
        self.cli = cli
        self.data_dir = Path(tempfile.mkdtemp(prefix="cio-redis-cluster-"))
        ports: list[int] = []
        while len(ports) < masters:
            port = free_cluster_port()
            if port not in ports:
                ports.append(port)
        self.nodes = [_node(exe, p, self.data_dir / str(p), appendonly, node_timeout_ms) for p in ports]

    @property
    def url(self) -> str:
        return f"redis+cluster://{self.nodes[0].address}"

    @property
    def node_urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        if not (self.nodes[0].data_dir / "nodes.conf").exists() or not self._slots_assigned():
            subprocess.run(  # noqa: S603
                [self.cli, "--cluster", "create", *(n.address for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout,
            )
        self.wait_ok(timeout)
        return self

    def _slots_assigned(self) -> bool:
        try:
            return _cluster_info(self.nodes[0].port).get("cluster_slots_assigned") == "16384"
        except (redis.RedisError, OSError):
            return False

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node says ``cluster_state:ok`` (and agrees on the slots)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(_cluster_info(n.port).get("cluster_state") == "ok" for n in self.nodes):
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the cluster did not reach cluster_state:ok within {timeout}s")

    def stop_node(self, index: int, kill: bool = False) -> None:
        self.nodes[index].stop(kill=kill)

    def start_node(self, index: int, timeout: float = 30.0) -> None:
        self.nodes[index].start()
        self.wait_ok(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
