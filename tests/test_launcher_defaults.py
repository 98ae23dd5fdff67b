"""The launcher's defaults agree with each other and refuse what they cannot serve.

- Shutdown: uvicorn's graceful timeout and the middleware's ``shutdown_grace`` come from one
  setting that outlasts the tools' own fetch deadline, so a tool call in flight at SIGTERM ends.
- Numbers: NaN, infinities, negatives, zero (where meaningless) and absurd sizes are refused at
  start with one line naming the flag or environment variable, exit status 2, no traceback.
- Egress: by default the tools reach public addresses and the launcher's own demo agent (exact
  scheme, host and port), not the rest of loopback or the private network.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

import example_app.__main__ as launcher_main
from example_app.app import create_app
from example_app.settings import FETCH_DEADLINE, Settings, parse_settings, startup_warnings
from mcp2anp_middleware import URLPolicy

from .launcher_fakes import FakeUvicorn, fake_uvicorn
from .messages import INITIALIZE, MCP_HEADERS, PROTOCOL, answer_of
from .processes import clean_env, run
from .servers import free_port, serve

__all__ = ["fake_uvicorn"]  # the shared fixture, used by name

# ---------------------------------------------------------------------------------------------
# Shutdown grace
# ---------------------------------------------------------------------------------------------


def test_fetch_deadline_is_the_url_policys() -> None:
    assert URLPolicy().timeout == FETCH_DEADLINE


def test_default_grace_outlasts_the_fetch_deadline_everywhere(
    tmp_path: Path, fake_uvicorn: FakeUvicorn
) -> None:
    settings = parse_settings(["--data-dir", str(tmp_path)])
    assert settings.shutdown_grace == FETCH_DEADLINE + 5
    assert launcher_main.main(["--data-dir", str(tmp_path)]) == 0
    served = fake_uvicorn.app
    fetch_deadline = served.toolkit.url_policy.timeout
    assert fetch_deadline == FETCH_DEADLINE
    assert served.shutdown_grace == settings.shutdown_grace > fetch_deadline
    assert fake_uvicorn.options["timeout_graceful_shutdown"] >= served.shutdown_grace


def test_grace_from_flag_and_environment_drives_both(
    tmp_path: Path, fake_uvicorn: FakeUvicorn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCP2ANP_SHUTDOWN_GRACE", "40")
    assert launcher_main.main(["--data-dir", str(tmp_path)]) == 0
    assert fake_uvicorn.app.shutdown_grace == 40.0
    assert fake_uvicorn.options["timeout_graceful_shutdown"] == 40
    assert launcher_main.main(["--data-dir", str(tmp_path), "--shutdown-grace", "30.5"]) == 0
    assert fake_uvicorn.app.shutdown_grace == 30.5
    assert fake_uvicorn.options["timeout_graceful_shutdown"] == 31  # uvicorn takes whole seconds


def test_grace_not_above_the_fetch_deadline_is_warned_about(
    tmp_path: Path, fake_uvicorn: FakeUvicorn, capsys: pytest.CaptureFixture[str]
) -> None:
    assert launcher_main.main(["--data-dir", str(tmp_path), "--shutdown-grace", "5"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "--shutdown-grace" in warnings[0] and f"{FETCH_DEADLINE:g}" in warnings[0]
    assert fake_uvicorn.app.shutdown_grace == 5.0  # honoured: the operator may want it short


def test_default_grace_is_not_warned_about(
    tmp_path: Path, fake_uvicorn: FakeUvicorn, capsys: pytest.CaptureFixture[str]
) -> None:
    assert launcher_main.main(["--data-dir", str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_library_refusal_at_build_time_is_one_line(
    tmp_path: Path,
    fake_uvicorn: FakeUvicorn,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refuse(settings: Settings) -> Any:
        raise ValueError("session_timeout must be a finite number of seconds above 0, got inf")

    monkeypatch.setattr(launcher_main, "create_app", refuse)
    assert launcher_main.main(["--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "python -m example_app: error: session_timeout must be a finite number of seconds "
        "above 0, got inf"
    ]
    assert fake_uvicorn.app is None  # nothing served


# ---------------------------------------------------------------------------------------------
# Numeric flags and environment variables
# ---------------------------------------------------------------------------------------------

DURATIONS = ("--session-timeout", "--cleanup-interval", "--shutdown-grace", "--body-timeout")
OPTIONAL_DURATIONS = ("--touch-interval", "--max-session-age")
CAPS = ("--per-principal-cap", "--global-cap")
BAD_DURATIONS = ("nan", "inf", "-inf", "Infinity", "-1", "0", "1e300", "soon")


def _env_name(flag: str) -> str:
    return "MCP2ANP_" + flag[2:].upper().replace("-", "_")


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Parse; it must exit 2 with exactly one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for flag in (*DURATIONS, *OPTIONAL_DURATIONS, *CAPS, "--port"):
        monkeypatch.delenv(_env_name(flag), raising=False)
    return monkeypatch


@pytest.mark.parametrize("flag", DURATIONS)
@pytest.mark.parametrize("value", BAD_DURATIONS)
def test_bad_durations_are_refused_naming_the_flag(
    flag: str,
    value: str,
    capsys: pytest.CaptureFixture[str],
    clean_environment: pytest.MonkeyPatch,
) -> None:
    line = _refused([f"{flag}={value}"], capsys)
    assert f"argument {flag}:" in line and repr(value) in line


@pytest.mark.parametrize("flag", (*DURATIONS, *OPTIONAL_DURATIONS))
@pytest.mark.parametrize("value", ("nan", "inf", "-5", "1e300"))
def test_bad_durations_from_the_environment_name_the_variable(
    flag: str,
    value: str,
    capsys: pytest.CaptureFixture[str],
    clean_environment: pytest.MonkeyPatch,
) -> None:
    clean_environment.setenv(_env_name(flag), value)
    line = _refused([], capsys)
    assert f"environment variable {_env_name(flag)}" in line and repr(value) in line


@pytest.mark.parametrize("flag", OPTIONAL_DURATIONS)
@pytest.mark.parametrize("value", ("nan", "inf", "-inf", "-1", "1e300"))
def test_bad_optional_durations_are_refused(
    flag: str,
    value: str,
    capsys: pytest.CaptureFixture[str],
    clean_environment: pytest.MonkeyPatch,
) -> None:
    assert f"argument {flag}:" in _refused([f"{flag}={value}"], capsys)


@pytest.mark.parametrize("flag", CAPS)
@pytest.mark.parametrize("value", ("nan", "inf", "-1", "2.5"))
def test_bad_caps_are_refused(
    flag: str,
    value: str,
    capsys: pytest.CaptureFixture[str],
    clean_environment: pytest.MonkeyPatch,
) -> None:
    assert f"argument {flag}:" in _refused([f"{flag}={value}"], capsys)
    clean_environment.setenv(_env_name(flag), value)
    assert _env_name(flag) in _refused([], capsys)


@pytest.mark.parametrize("value", ("inf", "nan", "0", "-1", "65536", "80.5"))
def test_bad_ports_are_refused(
    value: str, capsys: pytest.CaptureFixture[str], clean_environment: pytest.MonkeyPatch
) -> None:
    assert "argument --port:" in _refused(["--port", value], capsys)
    clean_environment.setenv("MCP2ANP_PORT", value)
    assert "MCP2ANP_PORT" in _refused([], capsys)


def test_good_numbers_and_the_documented_spellings_of_none(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    settings = parse_settings(
        [
            "--session-timeout=0.5",
            "--cleanup-interval=60",
            "--shutdown-grace=25",
            "--touch-interval=0",
            "--max-session-age=none",
            "--per-principal-cap=0",
            "--global-cap=10",
        ]
    )
    assert (settings.session_timeout, settings.cleanup_interval) == (0.5, 60.0)
    assert (settings.touch_interval, settings.max_session_age) == (None, None)
    assert (settings.per_principal_cap, settings.global_cap) == (None, 10)
    assert math.isfinite(settings.shutdown_grace)


def test_flag_wins_over_a_bad_environment_value(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("MCP2ANP_MAX_SESSION_AGE", "inf")
    clean_environment.setenv("MCP2ANP_TOUCH_INTERVAL", "10")
    settings = parse_settings(["--max-session-age", "none", "--touch-interval", "5"])
    assert settings.max_session_age is None and settings.touch_interval == 5.0


def test_infinite_session_timeout_with_redis_never_starts(tmp_path: Path) -> None:
    # The reported case: accepted, then every initialize was a 500 (OverflowError in the TTL).
    data_dir = tmp_path / "data"
    env = clean_env(MCP2ANP_SESSION_TIMEOUT="inf", MCP2ANP_STORE_URL="redis://127.0.0.1:1/0")
    result = run(["-m", "example_app", "--data-dir", str(data_dir)], env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "python -m example_app: error: argument --session-timeout: not a finite number: 'inf' "
        "(from environment variable MCP2ANP_SESSION_TIMEOUT)"
    ]
    assert not data_dir.exists()  # nothing was built


# ---------------------------------------------------------------------------------------------
# What the tools may reach by default
# ---------------------------------------------------------------------------------------------


def test_private_ranges_are_off_by_default(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.delenv("MCP2ANP_ALLOW_PRIVATE", raising=False)
    assert parse_settings([]).allow_private is False
    assert parse_settings(["--allow-private", "true"]).allow_private is True


@asynccontextmanager
async def _launched(tmp_path: Path, *flags: str) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """The launcher's app on a loopback port, and an MCP session's HTTP client."""
    port = free_port()
    settings = parse_settings(["--port", str(port), "--data-dir", str(tmp_path), *flags])
    async with serve(create_app(settings), port=port) as base, httpx.AsyncClient() as http:
        created = await http.post(f"{base}/mcp", json=INITIALIZE, headers=MCP_HEADERS)
        assert created.status_code == 200, created.text
        http.headers.update(
            {
                **MCP_HEADERS,
                "Mcp-Session-Id": created.headers["mcp-session-id"],
                "MCP-Protocol-Version": PROTOCOL,
            }
        )
        yield base, http


async def _fetch(http: httpx.AsyncClient, base: str, url: str) -> dict[str, Any]:
    call = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "anp_fetchDoc", "arguments": {"url": url}},
    }
    response = await http.post(f"{base}/mcp", json=call)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = answer_of(response)["result"]
    return result


@pytest.mark.anyio
async def test_by_default_only_the_demo_agent_is_reachable_off_the_public_network(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.delenv("MCP2ANP_ALLOW_PRIVATE", raising=False)
    async with _launched(tmp_path) as (base, http):
        ad = await _fetch(http, base, f"{base}/agent/ad.json")
        assert not ad.get("isError"), ad
        assert ad["structuredContent"]["status"] == 200
        other_port = f"http://127.0.0.1:{free_port()}/agent/ad.json"
        port = base.rsplit(":", 1)[1]
        for url in (
            other_port,  # the rest of loopback: another service on this machine
            f"http://127.0.0.2:{port}/agent/ad.json",
            f"http://localhost:{port}/agent/ad.json",  # not the demo agent's exact origin
            f"{base}/mcp",  # the launcher's own endpoint, beside the agent
            f"{base}/agent/../mcp",  # climbing out of the agent's path
            f"{base}/agent/%2e%2e/mcp",
            f"http://127.0.0.1:{port}@10.0.0.1/",  # userinfo trick
            "http://10.0.0.1/",  # the LAN: refused before any connection
            "http://[::ffff:192.168.1.1]/",
        ):
            result = await _fetch(http, base, url)
            assert result.get("isError"), (url, result)
            assert result["structuredContent"]["error"]["code"] == "URL_REFUSED", (url, result)


@pytest.mark.anyio
async def test_allow_private_opens_loopback_again(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    async with _launched(tmp_path, "--allow-private", "true") as (base, http):
        result = await _fetch(http, base, f"http://127.0.0.1:{free_port()}/x")
    # Allowed by the policy, so the call gets as far as connecting (nothing listens there).
    assert result["structuredContent"]["error"]["code"] == "UNREACHABLE", result


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--stats-token="], "--stats-token: must not be empty"),
        (["--admin-token="], "--admin-token: must not be empty"),
        (["--stats-token", " padded"], "must be printable Latin-1 without surrounding spaces"),
        (["--admin-token", "key-\u20ac"], "must be printable Latin-1 without surrounding spaces"),
        (["--stats-path", "/mcp/stats"], "must be outside the MCP endpoint /mcp"),
        (["--stats-path", "/mcp"], "must be outside the MCP endpoint /mcp"),
    ],
)
def test_side_apps_that_would_be_open_or_unreachable_are_refused_at_once(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert reason in _refused(argv, capsys)


def test_statistics_served_without_a_token_are_warned_about() -> None:
    unset = parse_settings(["--stats-path", "/stats"], env={"MCP2ANP_STATS_TOKEN": ""})
    assert any("serves /stats to anyone" in w for w in startup_warnings(unset))
    guarded = parse_settings(["--stats-path", "/stats", "--stats-token", "t" * 20], env={})
    assert not [w for w in startup_warnings(guarded) if "--stats-path" in w]
