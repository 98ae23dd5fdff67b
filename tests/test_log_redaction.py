"""URLs in the logs of the libraries the package drives keep to scheme://host[:port]/path.

httpx logs every request's whole URL at INFO; a secret in the remote verifier's query string (or
userinfo) would land in the host's logs. These tests run a real verifier call with everything at
DEBUG, then exercise the redactor on records shaped like those httpx, aiohttp, anp and mcp emit.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
import yarl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mcp2anp_middleware import ANPMiddleware
from mcp2anp_middleware.anp_tools.toolkit import _redacted
from mcp2anp_middleware.authentication.authenticators import RemoteVerifierAuthenticator
from mcp2anp_middleware.authentication.base import Credentials, StaticConfigAuthenticator
from mcp2anp_middleware.log_redaction import (
    URLRedactionFilter,
    redact_library_logs,
    redact_url,
    redact_urls,
)
from mcp2anp_middleware.logging_setup import tame_anp_logging

from .servers import serve

SECRET = "s3cr3t-verifier-token-5f2a"
PASSWORD = "hunter2-userinfo-9c1e"


class _Collect(logging.Handler):
    """Formats every record as a host's handler would, exception text included."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def collected() -> Iterator[_Collect]:
    """A DEBUG handler on the root logger; the library loggers opened up to DEBUG as well."""
    handler = _Collect()
    root = logging.getLogger()
    names = ["", "httpx", "httpcore", "aiohttp", "anp", "mcp"]
    levels = {name: logging.getLogger(name).level for name in names}
    root.addHandler(handler)
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# ---------------------------------------------------------------------------------------------
# A real remote verifier call
# ---------------------------------------------------------------------------------------------


class _Verifier:
    def __init__(self) -> None:
        self.failures = 1

    async def verify(self, request: Request) -> Response:
        await request.body()
        if self.failures:  # one 503 first, so the retry path logs too
            self.failures -= 1
            return PlainTextResponse("down", status_code=503)
        return JSONResponse({"principal": "alice"})


@pytest.fixture
async def verifier_base() -> AsyncIterator[str]:
    state = _Verifier()
    app = Starlette(routes=[Route("/verify", state.verify, methods=["POST"])])
    async with serve(app, lifespan="off") as base:
        yield base


@pytest.mark.anyio
async def test_remote_verifier_url_secrets_never_reach_the_logs(
    verifier_base: str, collected: _Collect
) -> None:
    port = verifier_base.rsplit(":", 1)[1]
    url = f"http://alice:{PASSWORD}@127.0.0.1:{port}/verify?token={SECRET}&x=1#frag-{SECRET}"

    async def no_sleep(delay: float) -> None:
        return None

    async with RemoteVerifierAuthenticator(url, sleep=no_sleep) as auth:
        config = await auth(Credentials(api_key="sk-whatever-0123456789"))
    assert config.principal == "alice"

    httpx_lines = [line for line in collected.lines if " httpx " in line]
    assert len(httpx_lines) == 2, collected.lines  # the 503 and the 200 were both logged
    assert all(f"http://127.0.0.1:{port}/verify " in line for line in httpx_lines)
    for record, line in zip(collected.records, collected.lines, strict=True):
        for secret in (SECRET, PASSWORD, "token="):
            assert secret not in line, (record.name, line)
            assert secret not in repr(record.args), (record.name, record.args)


# ---------------------------------------------------------------------------------------------
# The redactor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET https://agent.example/ad.json?sig=abc", "GET https://agent.example/ad.json"),
        ("https://u:p@h.example:8443/a/b?x=1#f", "https://h.example:8443/a/b"),
        (
            "'http://127.0.0.1:9/v?t=1' and 'http://[::1]:80/w#x'",
            "'http://127.0.0.1:9/v' and 'http://[::1]:80/w'",
        ),
        ("HTTPS://Agent.Example?q=1", "HTTPS://Agent.Example"),
        ("ws://host/socket?key=k", "ws://host/socket"),
        ("no url here, only ?token=x", "no url here, only ?token=x"),
        ("https://agent.example/path/only", "https://agent.example/path/only"),
        ("http://agent.example/a'b?token=SECRET", "http://agent.example/a'b"),
        ("'http://agent.example/a'b?token=SECRET'", "'http://agent.example/a'b'"),
        ("ftp://user:SECRET@files.example/f?x=SECRET", "ftp://files.example/f"),
        ("redis+sentinel://:SECRET@h:26379/mymaster", "redis+sentinel://h:26379/mymaster"),
        ("['http://a/x?q=1', 'http://b/y']", "['http://a/x', 'http://b/y']"),
        ("URL('http://h/?t=SECRET')", "URL('http://h/')"),
        ("请求https://u:SECRET@h/p?token=SECRET", "请求https://h/p"),
        ("x_https://h/p?token=SECRET", "x_https://h/p"),
        ("42https://h/p?token=SECRET", "42https://h/p"),
        ("see ://h/p?token=SECRET", "see ://h/p"),
    ],
)
def test_redact_urls(text: str, expected: str) -> None:
    assert redact_urls(text) == expected
    assert redact_urls(expected) == expected  # idempotent


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        ("http://127.0.0.1:1/'?t=SECRET", "http://127.0.0.1:1/'"),
        ("https://u:SECRET@agent.example/ad.json?sig=SECRET", "https://agent.example/ad.json"),
        ("http://agent.example/a ?t=SECRET", "http://agent.example/a"),
        ("  http://agent.example/a\ttoken=SECRET", "http://agent.example/a"),
        ("ftp://u:SECRET@h/", "ftp://h/"),
        ("http:/h/?t=SECRET", "(not an absolute URL)"),
        ("127.0.0.1:1/?token=SECRET", "(not an absolute URL)"),
        ("data:text/plain,SECRET", "(not an absolute URL)"),
        ("agent.example/rpc?key=SECRET&back=https://x", "(not an absolute URL)"),
        ("http:/h/?t=SECRET&u=http://x", "(not an absolute URL)"),
        ("", "(not an absolute URL)"),
    ],
)
def test_a_url_a_client_gave_is_logged_without_what_may_be_secret(value: str, logged: str) -> None:
    assert redact_url(value) == logged


def _record(
    name: str,
    msg: Any,
    args: Any = (),
    *,
    level: int = logging.INFO,
    exc_info: Any = None,
    pathname: str = __file__,
) -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, msg, args, exc_info)


def _filtered(record: logging.LogRecord) -> str:
    assert URLRedactionFilter().filter(record)
    return logging.Formatter("%(message)s").format(record)


def test_httpx_style_record_keeps_its_template() -> None:
    url = httpx.URL(f"https://alice:{PASSWORD}@verify.example:8443/check?token={SECRET}")
    record = _record(
        "httpx",
        'HTTP Request: %s %s "%s %d %s"',
        ("POST", url, "HTTP/1.1", 200, "OK"),
    )
    text = _filtered(record)
    assert text == 'HTTP Request: POST https://verify.example:8443/check "HTTP/1.1 200 OK"'
    assert record.msg == 'HTTP Request: %s %s "%s %d %s"'  # still groupable by template


def test_aiohttp_style_records_yarl_urls_and_exceptions() -> None:
    url = yarl.URL(f"http://agent.example/rpc?key={SECRET}")
    assert SECRET not in _filtered(_record("aiohttp.client", "request to %r failed", (url,)))
    try:
        raise aiohttp.InvalidURL(f"http://agent.example/x?key={SECRET}")
    except aiohttp.InvalidURL:
        record = _record("aiohttp.client", "boom", level=logging.ERROR, exc_info=sys.exc_info())
    text = _filtered(record)
    assert SECRET not in text
    assert "http://agent.example/x" in text and "InvalidURL" in text


def test_anp_and_mcp_style_records() -> None:
    # anp formats URLs into the message itself (f-strings), mcp passes them as %s arguments.
    anp = _record("anp.anp_crawler.anp_client", f"Fetching https://a.example/ad.json?sig={SECRET}")
    assert _filtered(anp) == "Fetching https://a.example/ad.json"
    mcp = _record(
        "mcp.server.lowlevel.server", "Received %s", ({"url": f"https://b/x?t={SECRET}"},)
    )
    assert SECRET not in _filtered(mcp)
    mapping = _record("mcp.server", "%(url)s done", ({"url": f"https://c/y?t={SECRET}"},))
    assert _filtered(mapping) == "https://c/y done"


def test_a_record_that_cannot_be_formatted_is_left_to_the_handler() -> None:
    record = _record("httpx", "%s %s", (f"https://d/z?t={SECRET}",))  # one argument short
    assert URLRedactionFilter().filter(record)  # no exception from the logging call
    assert SECRET not in repr(record.args)


def test_anp_root_logger_warnings_are_redacted_and_chatter_dropped(collected: _Collect) -> None:
    import anp

    tame_anp_logging()
    anp_file = os.path.join(os.path.dirname(os.path.abspath(anp.__file__)), "x.py")
    root = logging.getLogger()
    root.handle(_record("root", f"created https://e/doc?k={SECRET}", pathname=anp_file))
    root.handle(
        _record(
            "root",
            f"fetch failed https://e/doc?k={SECRET}",
            level=logging.WARNING,
            pathname=anp_file,
        )
    )
    assert collected.lines == ["WARNING root fetch failed https://e/doc"]


def test_anp_module_level_logging_goes_to_the_anp_logger(collected: _Collect) -> None:
    """anp's own ``logging.info(...)`` calls build no record for the root logger to drop, and
    log nothing below WARNING whatever the ``anp`` logger's level; its warnings reach the ``anp``
    logger, keep anp's calling line and lose URL secrets."""
    import anp.authentication.did_wba_authenticator as anp_module

    tame_anp_logging()
    logging.getLogger("anp").setLevel(logging.DEBUG)  # even so: anp's DEBUG lines hold secrets
    module_logging: Any = anp_module.logging
    assert module_logging is not logging
    assert module_logging.getLogger is logging.getLogger  # the rest is the real module's
    module_logging.info("Generated HTTP signature headers for %s", f"https://e/?k={SECRET}")
    module_logging.debug("Generated Authorization header: %s", f"DIDWba signature={SECRET}")
    module_logging.log(logging.INFO, "Token %s", SECRET)
    module_logging.warning("fetch failed %s", f"https://e/doc?k={SECRET}")
    module_logging.log(logging.ERROR, "gave up on %s", f"https://e/doc?k={SECRET}")
    assert collected.lines == [
        "WARNING anp fetch failed https://e/doc",
        "ERROR anp gave up on https://e/doc",
    ]
    assert {r.filename for r in collected.records} == {os.path.basename(__file__)}


# ---------------------------------------------------------------------------------------------
# Where and how it is installed
# ---------------------------------------------------------------------------------------------


def test_importing_the_package_installs_it_on_every_library_logger() -> None:
    # A fresh interpreter, so that no other test has created or configured loggers first.
    script = (
        "import logging, mcp2anp_middleware\n"
        "from mcp2anp_middleware.log_redaction import REDACTED_LOGGERS, URLRedactionFilter\n"
        "names = [n for n, lg in logging.Logger.manager.loggerDict.items()\n"
        "         if isinstance(lg, logging.Logger) and n.split('.')[0] in REDACTED_LOGGERS]\n"
        "bare = [n for n in names if not any(isinstance(f, URLRedactionFilter)\n"
        "                                    for f in logging.getLogger(n).filters)]\n"
        "print(len(names), bare)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    count, bare = result.stdout.split(" ", 1)
    assert int(count) > 20  # httpx, httpcore.*, aiohttp.*, anp.*, mcp.* all seen
    assert bare.strip() == "[]"


def test_middleware_construction_covers_loggers_created_since() -> None:
    late = logging.getLogger("mcp.late_imported_module.child")
    late.filters.clear()
    try:
        ANPMiddleware(Starlette(), authenticator=StaticConfigAuthenticator())
        record = _record(late.name, f"GET https://f/x?k={SECRET}")
        assert late.filter(record)
        assert record.getMessage() == "GET https://f/x"
    finally:
        late.filters.clear()


def test_installation_is_idempotent_and_leaves_host_loggers_alone(collected: _Collect) -> None:
    redact_library_logs()
    redact_library_logs()
    tame_anp_logging()
    for name in ("httpx", "httpcore.http11", "aiohttp.client", "mcp.server.lowlevel.server"):
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, URLRedactionFilter) for f in filters) == 1, name
    logging.getLogger("host_app.client").info("GET https://mine.example/x?debug=1")
    assert collected.lines == ["INFO host_app.client GET https://mine.example/x?debug=1"]


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.anyio
async def test_uvicorns_access_log_keeps_the_path_and_drops_the_query(tmp_path: Any) -> None:
    """A real uvicorn with its own logging config and the access log on: a token in a query
    string (on a host route, outside the MCP prefix) never reaches the access log."""
    import asyncio

    import uvicorn

    from .servers import free_port

    async def callback(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    host = Starlette(routes=[Route("/cb", callback)])
    app = ANPMiddleware(host, data_dir=tmp_path)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, access_log=True, log_level="info")
    server = uvicorn.Server(config)  # its logging config is applied by now
    kept = _Kept()
    access = logging.getLogger("uvicorn.access")
    access.addHandler(kept)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn's own flag)
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://127.0.0.1:{port}/cb?code=s3cr3t&state=x")
        assert answer.status_code == 200
    finally:
        server.should_exit = True
        await task
        access.removeHandler(kept)
    lines = [line for line in kept.lines if "/cb" in line]
    assert lines and all("/cb?…" in line and "s3cr3t" not in line for line in lines), kept.lines


def test_redaction_takes_each_run_of_scheme_characters_once() -> None:
    """Any scheme may come before ``://``: a long run of characters that could begin one is
    read once, not once per position in it (which took minutes on text of this size)."""
    text = "a." * 50_000 + " ://h/p?t=SECRET"
    assert redact_urls(text) == "a." * 50_000 + " ://h/p"


def test_the_tools_log_fields_keep_the_method_and_cut_the_url() -> None:
    fields = {"url": "http://h/rpc?key=SECRET", "method": "echo"}
    assert _redacted(fields) == {"url": "http://h/rpc", "method": "echo"}
    assert _redacted({"method": "see http://h/?k=SECRET"}) == {"method": "see http://h/"}
