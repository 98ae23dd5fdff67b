"""Launcher settings: command-line flags, each also readable from an environment variable.

Every value is checked here, before anything is built: a bad one (from a flag or from its
``MCP2ANP_*`` variable) ends the launcher with exit status 2 and one line naming where it came
from, never a traceback and never a server that starts and then fails on every request.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

from mcp2anp_middleware import URLPolicy
from mcp2anp_middleware.sessions.policy import DEFAULT_BODY_TIMEOUT
from mcp2anp_middleware.version import __version__

PROG: Final = "python -m example_app"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("console", "json")
AUTH_MODES = ("dev", "static", "remote")
CAP_POLICIES = ("reject", "evict_oldest")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

FETCH_DEADLINE: Final = URLPolicy().timeout
"""The tools' deadline for one outgoing request, redirects included (``URLPolicy.timeout``).

The launcher builds its policy with this value, and the shutdown grace defaults to it plus
:data:`SHUTDOWN_MARGIN`, so a tool call in flight when the server is told to stop can finish.
"""
SHUTDOWN_MARGIN: Final = 5.0
"""Seconds on top of the fetch deadline for the rest of a call: authentication, the answer."""
MAX_SECONDS: Final = 10 * 365 * 86400.0
"""Longest duration accepted (ten years, the session registry's own bound): stores turn
durations into integer TTLs, and nothing longer is meant seriously."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 9880
    session_timeout: float = 1800.0
    cleanup_interval: float = 300.0
    log_level: str = "INFO"
    log_format: str = "console"
    data_dir: Path = Path(".mcp2anp-data")
    auth_mode: str = "dev"
    api_keys_file: Path | None = None
    auth_url: str | None = None
    entry_url: str | None = None
    allow_private: bool = False
    store_url: str = "memory://"
    touch_interval: float | None = None
    max_session_age: float | None = None
    per_principal_cap: int | None = None
    global_cap: int | None = None
    cap_policy: str = "reject"
    stats_path: str | None = None
    stats_token: str | None = None
    state_file: Path | None = None
    allowed_origins: tuple[str, ...] | None = None
    shutdown_grace: float = FETCH_DEADLINE + SHUTDOWN_MARGIN
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    admin_token: str | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        if ":" in host:  # IPv6 literal
            host = f"[{host.strip('[]')}]"
        return f"http://{host}:{self.port}"


def startup_warnings(settings: Settings) -> list[str]:
    """Settings that are allowed but probably not meant; the launcher prints them at start."""
    warnings = []
    if settings.shutdown_grace <= FETCH_DEADLINE:
        warnings.append(
            f"--shutdown-grace (MCP2ANP_SHUTDOWN_GRACE) is {settings.shutdown_grace:g}s, not more "
            f"than the tools' fetch deadline of {FETCH_DEADLINE:g}s: a tool call in flight at "
            "shutdown may be cut short"
        )
    if settings.cleanup_interval > settings.session_timeout:
        # Allowed (a lookup refuses an expired session whatever the sweep does), but the sweep
        # is also what renews the lease of a session held by a long request, and what frees the
        # memory of expired sessions: run less often than the timeout, it can do neither in time.
        warnings.append(
            f"--cleanup-interval (MCP2ANP_CLEANUP_INTERVAL) is {settings.cleanup_interval:g}s, "
            f"longer than --session-timeout (MCP2ANP_SESSION_TIMEOUT) of "
            f"{settings.session_timeout:g}s: a request running longer than the timeout may lose "
            "its session, and expired sessions stay in memory until the next sweep"
        )
    if settings.stats_path is not None and settings.stats_token is None:
        warnings.append(
            f"--stats-path (MCP2ANP_STATS_PATH) serves {settings.stats_path} to anyone: no "
            "--stats-token (MCP2ANP_STATS_TOKEN) is set (an empty variable counts as unset)"
        )
    return warnings


# -- value parsers: each raises ArgumentTypeError with a message that stands on its own ----------


def _seconds(text: str) -> float:
    """A duration: finite, above 0, at most :data:`MAX_SECONDS`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SECONDS:g} seconds: {text!r}")
    return value


def _optional_seconds(text: str) -> float | None:
    """A duration, or ``none``/``0``/empty for "not set"."""
    if text.strip().lower() in ("", "none"):
        return None
    try:
        if float(text) == 0:
            return None
        return _seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 0/none for not set)") from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535: {text!r}")
    return value


def _optional_cap(text: str) -> int | None:
    if text.strip().lower() in ("", "none", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _store_url(text: str) -> str:
    schemes = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
    if text == "memory://" or text.startswith(schemes):
        return text
    raise argparse.ArgumentTypeError(
        f"store URL must be memory://, redis://..., redis+sentinel://... or redis+cluster://...: "
        f"{text!r}"
    )


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false: {text!r}")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    return level


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    """A parser for ``choices`` that, unlike argparse's ``choices``, also checks env values."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)} (got {text!r})")
        return text

    return parse


def _stats_path(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"must start with '/': {text!r}")
    if text == "/mcp" or text.startswith("/mcp/"):
        raise argparse.ArgumentTypeError(f"must be outside the MCP endpoint /mcp: {text!r}")
    return text


def _token(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    if text != text.strip() or not text.isprintable() or max(text) > "\xff":
        # (a bearer value arrives stripped, as Latin-1: such a token could never match)
        raise argparse.ArgumentTypeError("must be printable Latin-1 without surrounding spaces")
    return text


def _origins(text: str) -> tuple[str, ...] | None:
    origins = tuple(o.strip() for o in text.split(",") if o.strip())
    return origins or None


class _Parser(argparse.ArgumentParser):
    """Errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


_UNSET: Final = object()
"""Default of every flag: tells "not on the command line" from any value a flag can take."""


@dataclass(frozen=True)
class _Option:
    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def env(self) -> str:
        return "MCP2ANP_" + self.dest.upper()


def _options(defaults: Settings) -> list[_Option]:
    d = defaults
    return [
        _Option(
            "--host",
            str,
            d.host,
            "interface to bind (default 127.0.0.1; auth mode dev accepts loopback only)",
        ),
        _Option("--port", _port, d.port, "TCP port to listen on, 1-65535 (default 9880)"),
        _Option(
            "--session-timeout",
            _seconds,
            d.session_timeout,
            "idle seconds before a session is removed (default 1800)",
        ),
        _Option(
            "--cleanup-interval",
            _seconds,
            d.cleanup_interval,
            "seconds between cleanup sweeps (default 300)",
        ),
        _Option(
            "--log-level", _log_level, d.log_level, "DEBUG, INFO, WARNING or ERROR (default INFO)"
        ),
        _Option(
            "--log-format",
            _one_of(LOG_FORMATS),
            d.log_format,
            "console: aligned human-readable lines (default); json: one JSON object per line "
            "(keys event, level, logger, timestamp), for log collectors",
        ),
        _Option(
            "--data-dir",
            Path,
            d.data_dir,
            "where the development DID is generated (default .mcp2anp-data)",
        ),
        _Option(
            "--auth-mode",
            _one_of(AUTH_MODES),
            d.auth_mode,
            "dev: no authentication, local DID (default); static: API keys file; "
            "remote: verifier URL",
        ),
        _Option(
            "--api-keys-file",
            Path,
            None,
            "JSON file mapping API keys to DID credentials (auth mode static)",
        ),
        _Option(
            "--auth-url", str, None, "URL of the remote credential verifier (auth mode remote)"
        ),
        _Option(
            "--entry-url",
            str,
            None,
            "ANP URL the server instructions point agents to (default: the demo agent)",
        ),
        _Option(
            "--allow-private",
            _boolean,
            d.allow_private,
            "let the tools fetch any private/loopback address (default false: public addresses "
            "and this launcher's own demo agent only)",
        ),
        _Option(
            "--store-url",
            _store_url,
            d.store_url,
            "memory:// (default), or to share sessions between processes redis://host:port/db, "
            "redis+sentinel://h1:p1,h2:p2/service[/db] or redis+cluster://seed-host:port",
        ),
        _Option(
            "--touch-interval",
            _optional_seconds,
            None,
            "Redis store: seconds between writes of a busy session's last use (default 30)",
        ),
        _Option(
            "--max-session-age",
            _optional_seconds,
            None,
            "absolute session lifetime in seconds (default none)",
        ),
        _Option(
            "--per-principal-cap",
            _optional_cap,
            None,
            "most sessions one credential may hold (default none)",
        ),
        _Option("--global-cap", _optional_cap, None, "most sessions in total (default none)"),
        _Option(
            "--cap-policy",
            _one_of(CAP_POLICIES),
            d.cap_policy,
            "reject (429, default) or evict_oldest when a credential is at its cap",
        ),
        _Option(
            "--stats-path",
            _stats_path,
            None,
            "serve read-only session statistics (JSON) at this path (default off)",
        ),
        _Option("--stats-token", _token, None, "bearer token required by the statistics endpoint"),
        _Option(
            "--admin-token",
            _token,
            None,
            "serve the session admin API at /mcp-admin/sessions (list, revoke) to requests "
            "bearing this token (default off)",
        ),
        _Option(
            "--state-file",
            Path,
            None,
            "with the memory store: save sessions here on shutdown, restore them on start",
        ),
        _Option(
            "--allowed-origins",
            _origins,
            None,
            "comma-separated browser origins allowed on /mcp (default: loopback; * = any)",
        ),
        _Option(
            "--shutdown-grace",
            _seconds,
            d.shutdown_grace,
            "seconds a stopping server waits for requests in flight: uvicorn's graceful "
            f"timeout and the middleware's drain (default {d.shutdown_grace:g}: the tools' "
            f"fetch deadline of {FETCH_DEADLINE:g}s plus {SHUTDOWN_MARGIN:g})",
        ),
        _Option(
            "--body-timeout",
            _seconds,
            d.body_timeout,
            f"seconds a client has to send a whole request body before it is answered 408 "
            f"(default {d.body_timeout:g})",
        ),
    ]


def _resolve(parser: _Parser, option: _Option, given: Any, env: Mapping[str, str]) -> Any:
    """The flag's value if given, else its environment variable's (empty = unset), else the
    default. A bad environment value is reported with the variable's name."""
    if given is not _UNSET:
        return given
    raw = env.get(option.env, "")
    if not raw:
        return option.default
    try:
        return option.parse(raw)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"argument {option.flag}: {exc} (from environment variable {option.env})")


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over environment variables (``MCP2ANP_<FLAG>``), which win over defaults."""
    env = os.environ if env is None else env
    options = _options(Settings())
    parser = _Parser(
        prog=PROG,
        description="Serve the mcp2anp-middleware demo (MCP endpoint and demo ANP agent). "
        "Each flag can also be set by its environment variable, MCP2ANP_<FLAG>.",
    )
    for option in options:
        parser.add_argument(
            option.flag, type=option.parse, default=_UNSET, help=f"{option.help} [{option.env}]"
        )
    parser.add_argument("--version", action="version", version=f"mcp2anp-middleware {__version__}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    values = {o.dest: _resolve(parser, o, getattr(args, o.dest), env) for o in options}
    settings = Settings(**values)
    keys_file = settings.api_keys_file
    if settings.auth_mode == "static" and keys_file is None:
        parser.error("--auth-mode static needs --api-keys-file")
    if settings.auth_mode == "static" and keys_file is not None and not keys_file.is_file():
        parser.error(f"--api-keys-file {keys_file} does not exist")
    if settings.auth_mode == "remote" and not settings.auth_url:
        parser.error("--auth-mode remote needs --auth-url")
    if settings.auth_mode == "dev" and settings.host not in _LOOPBACK_HOSTS:
        parser.error("--auth-mode dev (no authentication) only binds to loopback hosts")
    return settings
