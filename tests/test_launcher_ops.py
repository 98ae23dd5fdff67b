"""Operating the launcher (issue #13): its logs, how it refuses to start, its help, its server.

- Logs: every line of a running launcher has one shape, whoever logged it (the package through
  structlog, the SDK, uvicorn, the libraries): ``--log-format json`` gives one JSON object per
  line with ``event``, ``level``, ``logger`` and ``timestamp``. The SDK's ``Terminating session:
  None`` (once per request, stateless) is dropped by the library for every host, and only it.
- Fail fast: a store that does not answer, a missing extra, an unusable data directory, a port
  in use: one line, exit status 1 (unavailable now) or 2 (fix the command), no traceback, and no
  banner for a server that will not serve.
- Help: every flag explains itself and names its variable; ``--version``; a warning for a sweep
  slower than the idle timeout.
- Server: uvloop and httptools when importable (the ``example`` extra), named in the banner.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

import example_app.__main__ as launcher_main
from example_app.settings import parse_settings, startup_warnings
from mcp2anp_middleware import ANPMiddleware, logging_setup
from mcp2anp_middleware.log_redaction import URLRedactionFilter
from mcp2anp_middleware.logging_setup import SDK_TRANSPORT_LOGGER, tame_anp_logging
from mcp2anp_middleware.version import __version__

from .launcher_fakes import FakeUvicorn, fake_uvicorn
from .messages import INITIALIZE, MCP_HEADERS, PROTOCOL, answer_of
from .processes import clean_env, launcher, run
from .redis_server import redis_server_binary
from .servers import free_port

__all__ = ["fake_uvicorn"]  # the shared fixture, used by name

PROG = "python -m example_app"
BANNER_TITLE = "mcp2anp-middleware demo"
SECRET = "s3cret-Pa55"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


EXPECTED_LOOP = "uvloop" if _importable("uvloop") else "asyncio"
EXPECTED_HTTP = "httptools" if _importable("httptools") else "h11"


def _session_headers(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return {
        **MCP_HEADERS,
        "Mcp-Session-Id": response.headers["mcp-session-id"],
        "MCP-Protocol-Version": PROTOCOL,
    }


def _exercise(base_url: str) -> None:
    """An MCP initialize, then a tool call that reaches the demo agent (aiohttp, anp, signing)."""
    with httpx.Client(timeout=30) as http:
        created = http.post(f"{base_url}/mcp", json=INITIALIZE, headers=MCP_HEADERS)
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {
                "name": "anp_fetchDoc",
                "arguments": {"url": f"{base_url}/agent/ad.json"},
            },
        }
        answer = http.post(f"{base_url}/mcp", json=call, headers=_session_headers(created))
    assert answer.status_code == 200, answer.text
    assert answer_of(answer)["result"]["structuredContent"]["status"] == 200


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The only line a refused start printed (stdout empty), checked for the usual promises."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert BANNER_TITLE not in result.stderr
    line: str = lines[0]
    return line


# ---------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------


def test_json_logs_are_one_object_per_line_from_every_source(tmp_path: Path) -> None:
    flags = ["--log-format", "json", "--log-level", "DEBUG"]
    # A sweep slower than the timeout: its warning must be JSON too.
    flags += ["--session-timeout", "60", "--cleanup-interval", "120"]
    with launcher(tmp_path, *flags) as server:
        _exercise(server.base_url)
        assert server.interrupt() == 0, server.stderr()
    output = server.stderr() + (tmp_path / "server.out").read_text(encoding="utf-8")
    events = []
    for line in output.splitlines():
        if not line.strip():
            continue
        event = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(event, dict), line
        assert isinstance(event.get("event"), str), line
        assert event["level"] in ("debug", "info", "warning", "error", "critical"), line
        assert isinstance(event["logger"], str) and event["logger"], line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", event["timestamp"]), line
        events.append(event)
    loggers = {event["logger"] for event in events}
    for expected in ("uvicorn.error", "uvicorn.access", "example_app"):
        assert expected in loggers, sorted(loggers)
    assert any(name.startswith("mcp.") for name in loggers), sorted(loggers)
    assert any(name.startswith("mcp2anp_middleware") for name in loggers), sorted(loggers)
    by_event = {event["event"]: event for event in events}
    assert "Application startup complete." in by_event
    serving = by_event["launcher.serving"]
    assert (serving["loop"], serving["http"]) == (EXPECTED_LOOP, EXPECTED_HTTP)
    assert "--cleanup-interval" in by_event["launcher.warning"]["detail"]
    assert not any("Terminating session" in event["event"] for event in events)


_CONSOLE_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[(debug|info|warning|error|critical) *\] \S"
)


def test_console_logs_share_one_shape_and_the_banner_names_the_server(tmp_path: Path) -> None:
    with launcher(tmp_path) as server:
        _exercise(server.base_url)
        assert server.interrupt() == 0, server.stderr()
    lines = [line for line in server.stderr().splitlines() if line.strip()]
    first = lines.index(BANNER_TITLE)
    last = next(i for i, line in enumerate(lines) if "python -m example_app.client" in line)
    banner, logs = lines[first : last + 1], lines[:first] + lines[last + 1 :]
    assert (
        f"  server:          uvicorn, {EXPECTED_LOOP} event loop, {EXPECTED_HTTP} HTTP parser"
        in (banner)
    )
    for line in logs:
        assert _CONSOLE_LINE.match(line), line
    text = "\n".join(logs)
    for expected in (
        "[uvicorn.error]",  # uvicorn
        "[uvicorn.access]",
        "[mcp2anp_middleware.mcp_hosting]",  # stdlib logging, as the SDK uses
        "[mcp2anp_middleware.sessions]",  # the package, through structlog
    ):
        assert expected in text, text
    assert "Terminating session" not in text
    assert (tmp_path / "server.out").read_text(encoding="utf-8") == ""  # nothing on stdout


def _formatted(log_format: str, record: logging.LogRecord) -> str:
    return launcher_main.log_formatter(log_format).format(record)


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_a_traceback_cut_by_the_redaction_stays_cut(log_format: str) -> None:
    try:
        raise RuntimeError(f"cannot fetch https://agent.example/x?token={SECRET}")
    except RuntimeError:
        record = logging.LogRecord(
            "httpx", logging.ERROR, __file__, 1, "request failed", None, sys.exc_info()
        )
    URLRedactionFilter().filter(record)
    text = _formatted(log_format, record)
    assert SECRET not in text
    assert "https://agent.example/x" in text and "RuntimeError" in text
    if log_format == "json":
        assert json.loads(text)["event"] == "request failed"


class _Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, logger: str) -> list[str]:
        return [r.getMessage() for r in self.records if r.name == logger]


@pytest.fixture
def transport_log() -> Iterator[_Collected]:
    """Records of the SDK's transport logger at INFO, kept off the other handlers."""
    collected = _Collected()
    logger = logging.getLogger(SDK_TRANSPORT_LOGGER)
    saved = (logger.level, logger.propagate)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(collected)
    try:
        yield collected
    finally:
        logger.removeHandler(collected)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def test_only_the_stateless_termination_line_is_dropped(transport_log: _Collected) -> None:
    tame_anp_logging()
    logger = logging.getLogger(SDK_TRANSPORT_LOGGER)
    logger.info("Terminating session: None")
    logger.info("Terminating session: abc123")  # a stateful session's end still shows
    logger.warning("Terminating session: None")  # so does anything above INFO
    logger.info("Terminating session: %s", None)  # and a differently built record
    logging.getLogger(SDK_TRANSPORT_LOGGER + "_manager").info("Terminating session: None")
    assert transport_log.messages(SDK_TRANSPORT_LOGGER) == [
        "Terminating session: abc123",
        "Terminating session: None",
        "Terminating session: None",
    ]
    levels = [r.levelno for r in transport_log.records if r.name == SDK_TRANSPORT_LOGGER]
    assert levels == [logging.INFO, logging.WARNING, logging.INFO]


@pytest.mark.anyio
async def test_every_host_loses_the_sdk_termination_line(
    tmp_path: Path, transport_log: _Collected
) -> None:
    """Through a host's own ANPMiddleware (no launcher), a session's requests log no SDK
    transport chatter: full sessions are served by this package's own transport, and the
    filter stays installed for hosts that also run the SDK's."""
    middleware = ANPMiddleware(Starlette(), data_dir=tmp_path / "data")
    async with LifespanManager(middleware) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            created = await http.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
            listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
            answer = await http.post("/mcp", json=listing, headers=_session_headers(created))
            assert answer.status_code == 200, answer.text
            deleted = await http.delete("/mcp", headers=_session_headers(created))
            assert deleted.status_code == 204
    assert not any("Terminating session" in m for m in transport_log.messages(SDK_TRANSPORT_LOGGER))
    assert logging_setup._SDK_FILTER in logging.getLogger(SDK_TRANSPORT_LOGGER).filters


# ---------------------------------------------------------------------------------------------
# Fail fast, in one line
# ---------------------------------------------------------------------------------------------


def _launch(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    data_dir = tmp_path / "data"
    args = ["-m", "example_app", "--data-dir", str(data_dir), *flags]
    if "--port" not in flags:
        args += ["--port", str(free_port())]
    return run(args, env if env is not None else clean_env())


def test_an_unreachable_redis_is_one_line_naming_host_and_port_not_the_password(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens there
    result = _launch(tmp_path, "--store-url", f"redis://:{SECRET}@127.0.0.1:{port}/0")
    assert result.returncode == 1, result.stderr
    line = _one_line(result)
    assert line.startswith(f"{PROG}: error: session store 127.0.0.1:{port} does not answer: ")
    assert "refused" in line.lower()  # the cause
    assert SECRET not in line
    assert not (tmp_path / "data").exists()  # refused before anything was built


def test_an_unreachable_redis_in_json_mode_is_one_json_line(tmp_path: Path) -> None:
    port = free_port()
    result = _launch(
        tmp_path, "--log-format", "json", "--store-url", f"redis://:{SECRET}@127.0.0.1:{port}/0"
    )
    assert result.returncode == 1, result.stderr
    event = json.loads(_one_line(result))
    assert (event["event"], event["level"], event["logger"]) == (
        "launcher.error",
        "error",
        "example_app",
    )
    assert f"127.0.0.1:{port} does not answer" in event["detail"]
    assert SECRET not in result.stderr


@contextmanager
def _own_redis(directory: Path, password: str | None = None) -> Iterator[int]:
    """A redis-server of this test's own on a free loopback port (the launcher writes its
    default key prefix, which the session-wide server's users should not see); yields the port.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
    args += ["--dir", str(directory), "--save", ""]
    if password is not None:
        args += ["--requirepass", password]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1)
        deadline = time.monotonic() + 15
        while True:  # readiness poll, bounded
            assert process.poll() is None, "redis-server exited"
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_reachable_redis_is_served_and_shown_without_credentials(tmp_path: Path) -> None:
    with _own_redis(tmp_path / "redis", password=SECRET) as port:
        url = f"redis://:{SECRET}@127.0.0.1:{port}/0?health_check_interval=5"
        with launcher(tmp_path, "--store-url", url) as server:
            _exercise(server.base_url)
            stderr = server.stderr()
    assert f"  session store:   redis://127.0.0.1:{port}\n" in stderr
    assert SECRET not in stderr


def test_credentials_redis_refuses_are_one_line_without_the_password(tmp_path: Path) -> None:
    with _own_redis(tmp_path / "redis", password="the-right-one") as port:
        result = _launch(tmp_path, "--store-url", f"redis://:{SECRET}@127.0.0.1:{port}/0")
    assert result.returncode == 2, result.stderr  # fix the command: retrying cannot help
    line = _one_line(result)
    assert f"session store 127.0.0.1:{port} refuses the credentials of --store-url" in line
    assert SECRET not in line


def test_a_missing_redis_extra_names_the_extra_to_install(tmp_path: Path) -> None:
    # A redis package that fails to import the way an absent one does, ahead on the path.
    shadow = tmp_path / "shadow" / "redis"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'redis'\", name='redis')\n", encoding="utf-8"
    )
    env = clean_env(PYTHONPATH=str(shadow.parent))
    result = _launch(tmp_path, "--store-url", "redis://127.0.0.1:6379/0", env=env)
    assert result.returncode == 2, result.stderr
    assert _one_line(result) == (
        f'{PROG}: error: --store-url redis:// needs the optional extra "redis", which is not '
        'installed: pip install "mcp2anp-middleware[redis]"'
    )


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unusable_data_dir_is_one_line_naming_the_flag(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("", encoding="utf-8")
    data_dir = blocker if where == "a file" else blocker / "data"
    result = run(
        ["-m", "example_app", "--port", str(free_port()), "--data-dir", str(data_dir)],
        clean_env(),
    )
    assert result.returncode == 2, result.stderr
    line = _one_line(result)
    assert line.startswith(f"{PROG}: error: --data-dir {data_dir}: cannot write"), line
    assert str(data_dir) in line


def test_a_port_in_use_is_one_line_and_no_banner(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _launch(tmp_path, "--port", str(port))
    assert result.returncode == 1, result.stderr
    line = _one_line(result)
    assert line == (
        f"{PROG}: error: cannot listen on 127.0.0.1:{port}: the port is already in use "
        "(another server? choose one with --port)"
    )


# ---------------------------------------------------------------------------------------------
# Help, version, warnings
# ---------------------------------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    result = run(["-m", "example_app", "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mcp2anp-middleware {__version__}\n"


def test_every_flag_has_help_naming_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--help"], env={})
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = list(re.finditer(r"(--[a-z][a-z-]+) ([A-Z][A-Z_]+) ", text))
    in_usage = set(re.findall(r"\[(--[a-z][a-z-]+) [A-Z_]+\]", text))
    assert {m.group(1) for m in options} == in_usage  # each option's entry was found
    assert {"--host", "--port", "--log-format", "--store-url"} <= in_usage
    for index, match in enumerate(options):
        end = options[index + 1].start() if index + 1 < len(options) else len(text)
        entry = text[match.end() : end]
        flag, metavar = match.groups()
        assert f"[MCP2ANP_{metavar}]" in entry, (flag, entry)
        assert metavar == flag[2:].upper().replace("-", "_")
        assert len(entry.replace(f"[MCP2ANP_{metavar}]", "").split()) >= 3, (flag, entry)
    assert "--version" in text


@pytest.mark.parametrize(
    ("flags", "warned"),
    [
        (["--cleanup-interval", "600", "--session-timeout", "300"], True),
        (["--cleanup-interval", "300", "--session-timeout", "300"], False),
        ([], False),
    ],
)
def test_a_sweep_slower_than_the_timeout_is_warned_about(flags: list[str], warned: bool) -> None:
    settings = parse_settings(flags, env={})
    found = [w for w in startup_warnings(settings) if "--cleanup-interval" in w]
    assert bool(found) == warned
    if warned:
        assert "--session-timeout" in found[0] and "600s" in found[0] and "300s" in found[0]


# ---------------------------------------------------------------------------------------------
# The launcher in this process, uvicorn faked
# ---------------------------------------------------------------------------------------------


def test_uvicorn_gets_the_fastest_importable_server_and_the_banner_says_which(
    tmp_path: Path, fake_uvicorn: FakeUvicorn, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data-dir", str(tmp_path), "--port", str(free_port())]
    assert launcher_main.main(argv) == 0
    assert fake_uvicorn.options is not None
    assert (fake_uvicorn.options["loop"], fake_uvicorn.options["http"]) == (
        EXPECTED_LOOP,
        EXPECTED_HTTP,
    )
    assert fake_uvicorn.options["log_config"] is None  # uvicorn logs through the root handler
    err = capsys.readouterr().err
    assert f"uvicorn, {EXPECTED_LOOP} event loop, {EXPECTED_HTTP} HTTP parser" in err


def test_the_sweep_warning_is_printed_at_start(
    tmp_path: Path, fake_uvicorn: FakeUvicorn, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data-dir", str(tmp_path), "--port", str(free_port())]
    assert launcher_main.main([*argv, "--cleanup-interval", "90", "--session-timeout", "30"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{PROG}: warning: --cleanup-interval")
    assert fake_uvicorn.options is not None  # a warning, not a refusal
