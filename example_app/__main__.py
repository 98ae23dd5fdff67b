"""``python -m example_app``: serve the demo with uvicorn on its embedded defaults.

Start-up either serves or ends with one line and an exit status, never a traceback and never a
banner for a server that is not going to answer. Everything the launcher can check before
serving, it checks first, in this order: the settings (:mod:`.settings`), the optional extras
they need, the session store (pinged), the port (bound, then let go), and the app itself (the
data directory is written here). The banner follows, then uvicorn. Exit statuses:

- **2**: the command or the installation is wrong (a flag's value, a file or directory it names,
  a missing optional extra, credentials the store refuses). Running it again cannot help.
- **1**: something the settings point to is not available now (the store does not answer, the
  port is taken). The same command may work later, so a process manager may retry it.

Logging is set up here, for the whole process: the standard library's root logger gets a single
handler whose structlog ``ProcessorFormatter`` renders every record, whether it comes from
structlog (the package), the SDK (``mcp.*``), uvicorn or the libraries, in one shape, console or
JSON (``--log-format``).
"""

from __future__ import annotations

import errno
import importlib
import logging
import math
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any, Final, TextIO
from urllib.parse import unquote, urlsplit

import structlog
from structlog.typing import Processor

from mcp2anp_middleware import ANPMiddleware
from mcp2anp_middleware.log_redaction import redact_urls, use_redacted_exception_text

from .app import create_app
from .settings import FETCH_DEADLINE, PROG, Settings, parse_settings, startup_warnings

EXIT_SETTINGS: Final = 2
"""The command or the installation must change: a bad value, file, directory or missing extra."""
EXIT_UNAVAILABLE: Final = 1
"""Something the command points to is not available now: the store, the port."""
STORE_TIMEOUT: Final = 2.0
"""Seconds the start-up ping waits for the store: the socket timeout the launcher's store uses."""
_REDIS_DEFAULT_PORT: Final = 6379

_log = structlog.get_logger("example_app")


class StartupError(Exception):
    """A reason not to serve: one line, and the exit status the launcher ends with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# -- logging ---------------------------------------------------------------------------------------


class _LauncherHandler(logging.StreamHandler[TextIO]):
    """The launcher's root handler: a class of its own, so configuring again replaces only it."""


def _shared_processors() -> list[Processor]:
    """What every event gets, structlog's and the standard library's alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def log_formatter(log_format: str) -> structlog.stdlib.ProcessorFormatter:
    """The formatter of the launcher's handler: console lines or one JSON object per line.

    Records of the standard library pass :func:`use_redacted_exception_text` first: a traceback
    that ``log_redaction`` had to cut is printed cut, not formatted again from ``exc_info``.
    """
    rendering: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if log_format == "json":
        rendering += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        colors = sys.stderr.isatty() and "NO_COLOR" not in os.environ
        rendering.append(
            structlog.dev.ConsoleRenderer(
                colors=colors, exception_formatter=structlog.dev.plain_traceback
            )
        )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), use_redacted_exception_text],
        processors=rendering,
    )


def configure_logging(settings: Settings) -> None:
    """Route every logger of the process through one structlog renderer on stderr.

    structlog's own events are handed to the standard library (``LoggerFactory`` and
    ``wrap_for_formatter``) instead of being printed separately, so that they and the records of
    the SDK, uvicorn (run with ``log_config=None``: no handlers of its own, its loggers
    propagate), httpx, aiohttp and anp meet in one handler and get the same keys: ``timestamp``
    (ISO 8601, UTC), ``level``, ``logger`` and ``event``. The handler is installed before the app
    is built, so the SDK's ``logging.basicConfig`` call (made when its server is constructed)
    finds it and does nothing. Python warnings are logged too (``py.warnings``), or they would be
    the one non-JSON line on stderr.
    """
    level = getattr(logging, settings.log_level)
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = _LauncherHandler(sys.stderr)
    handler.setFormatter(log_formatter(settings.log_format))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LauncherHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    # Traces of outgoing HTTP include agents' response headers (bearer tokens) at DEBUG.
    logging.getLogger("httpcore").setLevel(max(level, logging.INFO))


def _say(settings: Settings, kind: str, text: str) -> None:
    """A warning or error of the launcher itself: a ``prog: kind: text`` line on the console, a
    ``launcher.<kind>`` event (the text as ``detail``) with ``--log-format json``, so that a log
    collector reading stderr gets nothing but JSON."""
    if settings.log_format == "json":
        log = _log.error if kind == "error" else _log.warning
        log(f"launcher.{kind}", detail=text)
    else:
        print(f"{PROG}: {kind}: {text}", file=sys.stderr, flush=True)


# -- checks before serving -------------------------------------------------------------------------


def _require_extra(module: str, extra: str, needed_by: str) -> None:
    """Import ``module``, or say which extra of the package brings it."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module:
            raise StartupError(
                f"{needed_by}: cannot import {module}: {exc}", EXIT_SETTINGS
            ) from None
        raise StartupError(
            f'{needed_by} needs the optional extra "{extra}", which is not installed: '
            f'pip install "mcp2anp-middleware[{extra}]"',
            EXIT_SETTINGS,
        ) from None
    except ImportError as exc:
        raise StartupError(f"{needed_by}: cannot import {module}: {exc}", EXIT_SETTINGS) from None


def require_extras(settings: Settings) -> None:
    """The optional extras the settings need (the store's client library); uvicorn itself comes
    with the SDK, and the launcher uses no other extra."""
    if settings.store_url != "memory://":
        scheme = urlsplit(settings.store_url).scheme
        _require_extra("redis", "redis", f"--store-url {scheme}://")


def store_address(url: str) -> str:
    """Where a store URL points, for messages and the banner: ``host:port`` (``unix:path``),
    never the userinfo or the query, which may hold the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    if parts.scheme in ("redis+sentinel", "redis+cluster"):
        from mcp2anp_middleware.sessions.stores.redis_connect import parse_ha_url

        try:
            _, hosts, details = parse_ha_url(url)
        except ValueError as exc:
            raise StartupError(f"--store-url {parts.scheme}://: {exc}", EXIT_SETTINGS) from None
        where = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts)
        return f"{where}/{details['service']}" if "service" in details else where
    host = parts.hostname or "localhost"
    try:
        port = parts.port or _REDIS_DEFAULT_PORT
    except ValueError:
        raise StartupError(
            f"--store-url {parts.scheme}://{host}: the port is not a number", EXIT_SETTINGS
        ) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cause(exc: BaseException, url: str) -> str:
    """An exception's text on one line, without the URL's password should a library echo it."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    password = urlsplit(url).password or ""
    for secret in (password, unquote(password)):
        if secret:
            text = text.replace(secret, "***")
    return redact_urls(text)


def _sync_client(url: str) -> Any:
    """A synchronous client for ``url``: one Redis, the master Sentinel names, or a cluster
    (whose first command discovers the nodes), so the startup ping checks the real path."""
    import redis

    options: dict[str, Any] = {
        "socket_timeout": STORE_TIMEOUT,
        "socket_connect_timeout": STORE_TIMEOUT,
    }
    scheme = urlsplit(url).scheme
    if scheme not in ("redis+sentinel", "redis+cluster"):
        return redis.Redis.from_url(url, **options)
    from mcp2anp_middleware.sessions.stores.redis_connect import parse_ha_url

    _, hosts, details = parse_ha_url(url)
    credentials = {"username": details["username"], "password": details["password"]}
    if scheme == "redis+cluster":
        from redis.cluster import RedisCluster

        host, port = hosts[0]
        return RedisCluster(host=host, port=port, **credentials, **options)
    from redis.sentinel import Sentinel

    sentinel_options = {**options, "password": details["sentinel_password"]}
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    master = sentinel.master_for  # redis-py leaves Sentinel untyped
    return master(details["service"], db=details["db"], **credentials, **options)  # type: ignore[no-untyped-call]


def check_store(settings: Settings) -> None:
    """Ping a Redis store once, with a client of its own, before anything else is built.

    Without this the launcher would print its banner, serve, and answer every request 503. A
    synchronous client is used because the server's asyncio client belongs to the event loop
    uvicorn has yet to create.
    """
    if settings.store_url == "memory://":
        return
    import redis
    from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError

    where = store_address(settings.store_url)
    try:
        client = _sync_client(settings.store_url)
    except ValueError as exc:
        cause = _cause(exc, settings.store_url)
        raise StartupError(f"--store-url for {where}: {cause}", EXIT_SETTINGS) from None
    except (redis.RedisError, OSError) as exc:  # a cluster client asks its seed node at once
        cause = _cause(exc, settings.store_url)
        raise StartupError(
            f"session store {where} does not answer: {cause}", EXIT_UNAVAILABLE
        ) from None
    try:
        client.ping()
    except (AuthenticationError, AuthorizationError, NoPermissionError) as exc:
        cause = _cause(exc, settings.store_url)
        raise StartupError(
            f"session store {where} refuses the credentials of --store-url: {cause}",
            EXIT_SETTINGS,
        ) from None
    except (redis.RedisError, OSError) as exc:
        cause = _cause(exc, settings.store_url)
        raise StartupError(
            f"session store {where} does not answer: {cause}", EXIT_UNAVAILABLE
        ) from None
    finally:
        client.close()


def _inside(path: str | bytes, directory: os.PathLike[str]) -> bool:
    absolute = os.path.abspath(os.fsdecode(path))
    base = os.path.abspath(directory)
    return absolute == base or absolute.startswith(base.rstrip(os.sep) + os.sep)


def build_app(settings: Settings) -> ANPMiddleware:
    """The app, or a :class:`StartupError`: the library refuses what it cannot run (a bad keys
    file, an option out of range) with ``ValueError``/``OSError``; a file error inside the data
    directory is said to be about ``--data-dir``, the flag to change."""
    try:
        return create_app(settings)
    except OSError as exc:
        if exc.filename is not None and _inside(exc.filename, settings.data_dir):
            raise StartupError(
                f"--data-dir {settings.data_dir}: cannot write the development identity there: "
                f"{exc.strerror or exc} ({os.fsdecode(exc.filename)})",
                EXIT_SETTINGS,
            ) from None
        raise StartupError(str(exc), EXIT_SETTINGS) from None
    except ValueError as exc:
        raise StartupError(str(exc), EXIT_SETTINGS) from None


def bind_host(host: str) -> str:
    """The host as a socket takes it: ``[::1]`` (accepted, as in URLs) is ``::1``."""
    return host.strip("[]")


def check_port(host: str, port: int) -> None:
    """Bind every address uvicorn is about to bind, as it will (``SO_REUSEADDR``), and let go.

    uvicorn binds only after the lifespan has started, and reports a taken port with a log line
    after whatever was printed before; so the launcher finds out first, and prints its banner
    only when the bind works. The port is released again for uvicorn (it cannot be handed over:
    ``uvicorn.run`` takes no socket, and its ``fd`` option assumes a Unix socket), which leaves a
    short window in which another process could take it; uvicorn's own error line and exit
    status 1 cover that case.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"--host {host}: {exc.strerror}", EXIT_SETTINGS) from None
    unavailable: list[str] = []
    bound = 0
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        where = f"[{address[0]}]:{port}" if family == socket.AF_INET6 else f"{address[0]}:{port}"
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine lacks: asyncio skips it as well
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"cannot listen on {where}: the port is already in use "
                        "(another server? choose one with --port)",
                        EXIT_UNAVAILABLE,
                    ) from None
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise StartupError(
                        f"cannot listen on {where}: {exc.strerror or exc}", EXIT_SETTINGS
                    ) from None
                # asyncio (3.13+) skips an address of a disabled family (IPv6 off, ``localhost``
                # still resolving to ::1); refuse only when no address is left.
                unavailable.append(f"cannot listen on {where}: {exc.strerror or exc}")
                continue
        bound += 1
    if unavailable and not bound:
        raise StartupError(unavailable[0], EXIT_SETTINGS)


# -- serving ---------------------------------------------------------------------------------------


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def server_implementations() -> tuple[str, str]:
    """The event loop and HTTP parser uvicorn runs: uvloop and httptools when importable (the
    ``example`` extra installs them), else asyncio and h11.

    This is uvicorn's own ``"auto"`` rule, applied here and passed on explicitly so that the
    banner names what actually runs rather than a guess at what ``auto`` picked.
    """
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    http = "httptools" if _importable("httptools") else "h11"
    return loop, http


def display_store(url: str) -> str:
    if url == "memory://":
        return url
    return f"{urlsplit(url).scheme}://{store_address(url)}"


def banner(settings: Settings, loop: str = "asyncio", http: str = "h11") -> str:
    base = settings.base_url
    lines = [
        "mcp2anp-middleware demo",
        f"  MCP endpoint:    {base}/mcp",
        f"  demo ANP agent:  {base}/agent/ad.json",
        f"  auth mode:       {settings.auth_mode}",
        f"  session store:   {display_store(settings.store_url)}",
        f"  sessions:        idle timeout {settings.session_timeout:g}s, "
        f"sweep every {settings.cleanup_interval:g}s",
        f"  shutdown grace:  {settings.shutdown_grace:g}s "
        f"(tool fetch deadline {FETCH_DEADLINE:g}s)",
        "  tools may reach: " + _egress(settings),
        f"  server:          uvicorn, {loop} event loop, {http} HTTP parser",
        "Connect an MCP client (streamable HTTP) to the endpoint, or run the demo client:",
        f"  python -m example_app.client {base}/mcp",
    ]
    return "\n".join(lines)


def _egress(settings: Settings) -> str:
    if settings.allow_private:
        return "any address, private ranges included"
    return "public addresses and the demo agent"


def announce(settings: Settings, loop: str, http: str) -> None:
    """The banner on the console; one ``launcher.serving`` event with the same facts in JSON."""
    if settings.log_format != "json":
        print(banner(settings, loop, http), file=sys.stderr, flush=True)
        return
    _log.info(
        "launcher.serving",
        mcp_endpoint=f"{settings.base_url}/mcp",
        demo_agent=f"{settings.base_url}/agent/ad.json",
        auth_mode=settings.auth_mode,
        session_store=display_store(settings.store_url),
        session_timeout=settings.session_timeout,
        cleanup_interval=settings.cleanup_interval,
        shutdown_grace=settings.shutdown_grace,
        tools_may_reach=_egress(settings),
        loop=loop,
        http=http,
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings)
    for warning in startup_warnings(settings):
        _say(settings, "warning", warning)
    try:
        require_extras(settings)
        check_store(settings)
        check_port(bind_host(settings.host), settings.port)
        app = build_app(settings)  # last: it writes the data directory and logs
    except StartupError as exc:
        _say(settings, "error", str(exc))
        return exc.status
    loop, http = server_implementations()
    announce(settings, loop, http)
    import uvicorn  # a dependency of the SDK: always there

    options: dict[str, Any] = {
        "host": bind_host(settings.host),
        "port": settings.port,
        "loop": loop,
        "http": http,
        "log_config": None,  # uvicorn's records go to the root handler of configure_logging
        "log_level": settings.log_level.lower(),
        "lifespan": "on",
        # The same grace as the middleware's drain (uvicorn takes whole seconds): both outlast
        # the tools' fetch deadline unless the operator chose otherwise.
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace),
    }
    try:
        uvicorn.run(app, **options)
    except SystemExit as exc:
        # uvicorn exits with 3 when its own start fails after the checks above (the lifespan
        # failed, or the port was taken in the meantime); its log line says why.
        return 0 if exc.code in (0, None) else EXIT_UNAVAILABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
