"""The real launcher (``python -m example_app``) and demo client as subprocesses."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from example_app.settings import parse_settings

from .messages import INITIALIZE as INIT
from .messages import MCP_HEADERS
from .processes import clean_env, launcher, run
from .servers import free_port

STEPS = (
    "session created",
    "tools listed",
    "agent description fetched",
    "interface fetched",
    "method invoked",
    "session id reused",
    "invalid session id rejected",
    "session closed on client exit",
    "DELETE closes session",
)


def test_demo_client_walks_the_whole_session_lifecycle(tmp_path: Path) -> None:
    with launcher(tmp_path) as server:
        result = run(["-m", "example_app.client", f"{server.base_url}/mcp"])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for step in STEPS:
        assert any(line.startswith(f"✓ {step}:") for line in lines), (step, result.stdout)
    assert "✗" not in result.stdout
    assert "echo" in result.stdout and "whoami" in result.stdout  # method names shown
    assert "Traceback" not in result.stderr


def test_banner_then_ctrl_c_shuts_down_cleanly(tmp_path: Path) -> None:
    with launcher(tmp_path) as server:
        response = httpx.post(f"{server.base_url}/mcp", json=INIT, headers=MCP_HEADERS)
        assert response.status_code == 200 and response.headers["mcp-session-id"]
        code = server.interrupt()
        stderr = server.stderr()
    assert f"MCP endpoint:    {server.base_url}/mcp" in stderr
    assert f"{server.base_url}/agent/ad.json" in stderr
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "Application shutdown complete" in stderr


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--port", "0x"], {}, "argument --port: not a port number: '0x'"),
        (["--port", "70000"], {}, "port must be 1-65535"),
        (["--session-timeout", "-1"], {}, "argument --session-timeout: must be greater than 0"),
        (["--cleanup-interval", "soon"], {}, "argument --cleanup-interval: not a number"),
        (["--log-level", "LOUD"], {}, "argument --log-level: log level must be one of"),
        (["--auth-mode", "static"], {}, "--auth-mode static needs --api-keys-file"),
        (["--auth-mode", "remote"], {}, "--auth-mode remote needs --auth-url"),
        (["--host", "0.0.0.0"], {}, "only binds to loopback hosts"),
        ([], {"MCP2ANP_PORT": "abc"}, "argument --port: not a port number: 'abc'"),
        ([], {"MCP2ANP_SESSION_TIMEOUT": "0"}, "argument --session-timeout: must be greater"),
        ([], {"MCP2ANP_ALLOW_PRIVATE": "maybe"}, "expected true or false"),
    ],
)
def test_bad_settings_are_refused_before_anything_starts(
    tmp_path: Path, flags: list[str], env: dict[str, str], message: str
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    args = ["-m", "example_app", "--data-dir", str(data_dir), *flags]
    if "MCP2ANP_PORT" not in env and "--port" not in flags:
        args += ["--port", str(port)]
    result = run(args, clean_env(**env))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "mcp2anp-middleware demo" not in result.stderr  # no banner: nothing started
    assert not data_dir.exists()  # no development DID generated either


def test_environment_variables_are_honoured(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        MCP2ANP_PORT=str(port), MCP2ANP_SESSION_TIMEOUT="1", MCP2ANP_CLEANUP_INTERVAL="7"
    )
    with launcher(tmp_path, env=env, port=port) as server, httpx.Client() as http:
        assert "idle timeout 1s, sweep every 7s" in server.stderr()
        created = http.post(f"{server.base_url}/mcp", json=INIT, headers=MCP_HEADERS)
        session = {
            **MCP_HEADERS,
            "Mcp-Session-Id": created.headers["mcp-session-id"],
            "MCP-Protocol-Version": "2025-11-25",
        }
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        assert http.post(f"{server.base_url}/mcp", json=listing, headers=session).is_success
        time.sleep(1.5)  # let the 1 s idle timeout pass (not a readiness wait)
        expired = http.post(f"{server.base_url}/mcp", json=listing, headers=session)
        assert expired.status_code == 404
        assert expired.json()["error"]["message"] == "Session not found"


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP2ANP_SESSION_TIMEOUT", "42")
    monkeypatch.setenv("MCP2ANP_LOG_LEVEL", "debug")
    settings = parse_settings(["--session-timeout", "5"])
    assert settings.session_timeout == 5.0 and settings.log_level == "DEBUG"


def test_bogus_auth_mode_from_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP2ANP_AUTH_MODE", "bogus")
    with pytest.raises(SystemExit):
        parse_settings(["--host", "0.0.0.0"])


def test_ipv6_loopback_base_url_is_a_valid_url() -> None:
    assert parse_settings(["--host", "::1"]).base_url == "http://[::1]:9880"


def test_client_fails_clearly_when_nothing_listens() -> None:
    result = run(["-m", "example_app.client", f"http://127.0.0.1:{free_port()}/mcp"])
    assert result.returncode == 1
    assert "cannot reach" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_client_refuses_a_non_http_url() -> None:
    result = run(["-m", "example_app.client", "ftp://127.0.0.1/mcp"])
    assert result.returncode == 2
    assert "not an http(s) URL" in result.stderr


def test_sigterm_ends_open_get_streams_and_does_not_wait_for_them(tmp_path: Path) -> None:
    """The server hears of its stop before it waits for open connections: a client's standalone
    GET stream (which never closes by itself) ends at once, and the process exits without
    waiting out its graceful-shutdown time (before, uvicorn waited the whole grace for the
    stream and then cancelled every request still running)."""
    with launcher(tmp_path, "--shutdown-grace", "300") as server, httpx.Client() as http:
        url = f"{server.base_url}/mcp"
        created = http.post(url, json=INIT, headers=MCP_HEADERS)
        session = {**MCP_HEADERS, "Mcp-Session-Id": created.headers["mcp-session-id"]}
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert http.post(url, json=initialized, headers=session).status_code == 202
        deadline = time.monotonic() + 60  # (a bound, far below the grace: the old way took 300 s)
        with http.stream("GET", url, headers=session, timeout=60) as stream:
            assert stream.status_code == 200
            server.process.send_signal(signal.SIGTERM)
            for _ in stream.iter_lines():
                assert time.monotonic() < deadline, "the GET stream was not ended"
        code = server.process.wait(timeout=60)
        stderr = server.stderr()
    assert code in (0, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr
    assert "Application shutdown complete" in stderr
