"""Real Redis Sentinel and Redis Cluster deployments on loopback, from the Debian redis-server.

High availability is only believable against the real thing: Sentinel's election and Cluster's
replica promotion are what the store must survive, so these start real processes (no mocks, no
home-made failover). Timeouts are cut to the bone (``down-after-milliseconds 1000``,
``cluster-node-timeout 1000``) so a failover takes a couple of seconds, and every wait polls a
condition against a deadline instead of sleeping a guessed time.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .processes import stop_process
from .servers import free_port

SERVICE = "mymaster"
DEADLINE = 30.0


def binary(name: str) -> str:
    """The binary on PATH; missing is a loud failure, never a skip (CI must run these)."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found on PATH: apt-get install redis-server redis-tools")
    return found


def command(port: int, *args: str, timeout: float = 1.0) -> str:
    """One redis-cli call (text reply, empty on failure): a client outside the code under test."""
    try:
        done = subprocess.run(
            [binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout if done.returncode == 0 else ""


def wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def info(port: int, section: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in command(port, "INFO", section).splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            fields[key] = value
    return fields


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class Node:
    """One redis-server (or sentinel) process, restartable with the same arguments."""

    def __init__(self, directory: Path, port: int, args: list[str]) -> None:
        self.directory = directory
        self.port = port
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary("redis-server"), *self.args],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, f"redis on port {self.port}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis on port {self.port} exited with {self.process.returncode}")
        return command(self.port, "PING").strip() == "PONG"

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (no final save, no goodbye to replicas)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGTERM, timeout=10)
        self.process = None


def _server_args(port: int, *extra: str) -> list[str]:
    return [
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--protected-mode", "yes", *extra,
    ]  # fmt: skip


class SentinelDeployment:
    """A master, one replica and three sentinels (quorum 2) watching service ``mymaster``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        master, replica = free_port(), free_port()
        self.nodes = [
            Node(directory / "a", master, _server_args(master)),
            Node(
                directory / "b",
                replica,
                [*_server_args(replica), "--replicaof", "127.0.0.1", str(master)],
            ),
        ]
        self.sentinels: list[Node] = []
        for index in range(3):
            port = free_port()
            config = directory / f"sentinel-{index}.conf"
            self.sentinels.append(Node(directory / f"s{index}", port, [str(config), "--sentinel"]))

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            node.start()
        for sentinel in self.sentinels:
            Path(sentinel.args[0]).write_text(
                f"port {sentinel.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.nodes[0].port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 3000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            sentinel.start()
        self.wait_healthy()

    def master_port(self) -> int:
        reply = command(self.sentinels[0].port, "SENTINEL", "get-master-addr-by-name", SERVICE)
        return int(reply.split()[1])

    def master(self) -> Node:
        port = self.master_port()
        return next(node for node in self.nodes if node.port == port)

    def _healthy(self) -> bool:
        """Every sentinel agrees on the master, which has an online replica in sync, and knows the
        two other sentinels (else an election could not reach quorum)."""
        try:
            ports = {
                command(s.port, "SENTINEL", "get-master-addr-by-name", SERVICE).split()[1]
                for s in self.sentinels
            }
        except IndexError:
            return False
        if len(ports) != 1:
            return False
        port = int(ports.pop())
        replication = info(port, "replication")
        if replication.get("role") != "master" or "state=online" not in replication.get(
            "slave0", ""
        ):
            return False
        for sentinel in self.sentinels:
            master = command(sentinel.port, "SENTINEL", "master", SERVICE).split()
            state = dict(zip(master[::2], master[1::2], strict=False))
            if state.get("num-other-sentinels") != "2" or state.get("num-slaves") != "1":
                return False
            if state.get("flags") != "master":
                return False
        return True

    def wait_healthy(self) -> None:
        wait_for(self._healthy, "the Sentinel deployment to be healthy")

    def crash_master(self) -> Node:
        """SIGKILL the master; the sentinels promote the replica by themselves."""
        victim = self.master()
        victim.kill()
        return victim

    def heal(self, victim: Node) -> None:
        """Bring the crashed master back as the new master's replica, as an operator would (the
        sentinels would convert it too, but only after their 10-second INFO period)."""
        victim.args = [
            *_server_args(victim.port),
            "--replicaof",
            "127.0.0.1",
            str(self.master_port()),
        ]
        victim.start()
        self.wait_healthy()

    def stop(self) -> None:
        for node in [*self.sentinels, *self.nodes]:
            node.stop()


class ClusterDeployment:
    """Three masters and three replicas, made with ``redis-cli --cluster create``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.nodes: list[Node] = []
        for index in range(6):
            port = cluster_port()
            args = _server_args(
                port,
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "1000",
                "--cluster-replica-validity-factor", "0",
            )  # fmt: skip
            self.nodes.append(Node(directory / f"n{index}", port, args))

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = ["--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"]
        done = subprocess.run(
            [binary("redis-cli"), *create],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        self.wait_healthy()

    def roles(self) -> dict[int, str]:
        return {node.port: info(node.port, "replication").get("role", "") for node in self.nodes}

    def _healthy(self) -> bool:
        """All six up, the cluster ``ok`` everywhere, three masters each with an online replica."""
        for node in self.nodes:
            if "cluster_state:ok" not in command(node.port, "CLUSTER", "INFO"):
                return False
        masters = [port for port, role in self.roles().items() if role == "master"]
        if len(masters) != 3:
            return False
        return all(
            "state=online" in info(port, "replication").get("slave0", "") for port in masters
        )

    def wait_healthy(self) -> None:
        wait_for(self._healthy, "the Redis Cluster to be healthy")

    def master_for(self, key: str) -> Node:
        """The node that owns ``key``'s slot now."""
        owner = self.owner(key)
        if owner is None:
            raise RuntimeError(f"no master owns the slot of {key}")
        return owner

    def owner(self, key: str) -> Node | None:
        """The master serving ``key``'s slot, or None while none does (mid-failover)."""
        slot = int(command(self.nodes[0].port, "CLUSTER", "KEYSLOT", key).strip())
        for line in command(self.nodes[0].port, "CLUSTER", "NODES").splitlines():
            parts = line.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for span in parts[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                    return next(node for node in self.nodes if node.port == port)
        return None

    def crash(self, node: Node) -> None:
        """SIGKILL a master; its replica is promoted by the cluster itself."""
        node.kill()

    def heal(self, victim: Node) -> None:
        """Restart the crashed node (same nodes.conf): it rejoins as the new master's replica."""
        victim.start()
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


_STARTED: dict[str, SentinelDeployment | ClusterDeployment] = {}


def shared_deployment(config: pytest.Config, kind: str, directory: Path) -> Any:
    """The one deployment of ``kind`` ("sentinel" or "cluster") for the whole test session,
    started on first use from any module (test modules import fixtures by name, so a
    session-scoped fixture would start one per importing module) and stopped at the end."""
    if kind not in _STARTED:
        deployment = (
            SentinelDeployment(directory) if kind == "sentinel" else ClusterDeployment(directory)
        )
        config.add_cleanup(deployment.stop)
        deployment.start()
        _STARTED[kind] = deployment
    return _STARTED[kind]


@pytest.fixture
def sentinel_deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> SentinelDeployment:
    """Master, replica and three sentinels, started once and shared (tests use own prefixes)."""
    deployment: SentinelDeployment = shared_deployment(
        request.config, "sentinel", tmp_path_factory.mktemp("sentinel")
    )
    return deployment


@pytest.fixture
def cluster_deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> ClusterDeployment:
    """Three masters and three replicas, started once and shared."""
    deployment: ClusterDeployment = shared_deployment(
        request.config, "cluster", tmp_path_factory.mktemp("cluster")
    )
    return deployment
