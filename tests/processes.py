"""Real launcher processes (``python -m example_app``) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .servers import free_port

ROOT = Path(__file__).resolve().parent.parent
STARTUP_DEADLINE = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without MCP2ANP_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP2ANP_")}
    return {**env, **extra}


def run(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=dict(env) if env is not None else clean_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    port: int
    stderr_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT, then the exit code (bounded wait)."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=20)


def wait_listening(
    process: subprocess.Popen[Any], port: int, name: str, output: Callable[[], str]
) -> None:
    """Until ``process`` accepts connections on ``port`` (its ``output`` shown if it fails)."""
    deadline = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{name} exited with {process.returncode}:\n{output()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(
        f"{name} did not listen on 127.0.0.1:{port} within {STARTUP_DEADLINE}s:\n{output()}"
    )


def stop_process(
    process: subprocess.Popen[Any], signum: int = signal.SIGINT, timeout: float = 20
) -> None:
    """Ask ``process`` to stop (``signum``), then kill it if it does not within ``timeout``."""
    if process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def launcher(
    tmp_path: Path,
    *flags: str,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    name: str = "server",
    data_dir: Path | None = None,
    python: str = sys.executable,
    cwd: Path = ROOT,
) -> Iterator[Launched]:
    """Run the launcher until the block ends (then Ctrl-C); its output goes to ``<name>.err``.

    ``python`` and ``cwd``: another interpreter (an installed wheel's venv) run from elsewhere."""
    port = port or free_port()
    args = ["--port", str(port)] if env is None or "MCP2ANP_PORT" not in env else []
    stdout = (tmp_path / f"{name}.out").open("wb")
    stderr_path = tmp_path / f"{name}.err"
    stderr = stderr_path.open("wb")
    data = str(data_dir or tmp_path / "data")
    process = subprocess.Popen(
        [python, "-m", "example_app", *args, "--data-dir", data, *flags],
        cwd=cwd,
        env=dict(env) if env is not None else clean_env(),
        stdout=stdout,
        stderr=stderr,
    )
    launched = Launched(process, port, stderr_path)
    try:
        wait_listening(process, port, "launcher", launched.stderr)
        yield launched
    finally:
        stop_process(process)
        stdout.close()
        stderr.close()
