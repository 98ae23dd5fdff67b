"""Launcher settings: command-line flags, each also readable from an environment variable."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
AUTH_MODES = ("dev", "static", "remote")
CAP_POLICIES = ("reject", "evict_oldest")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 9880
    session_timeout: float = 1800.0
    cleanup_interval: float = 300.0
    log_level: str = "INFO"
    data_dir: Path = Path(".mcp2anp-data")
    auth_mode: str = "dev"
    api_keys_file: Path | None = None
    auth_url: str | None = None
    entry_url: str | None = None
    allow_private: bool = True
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

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        if ":" in host:  # IPv6 literal
            host = f"[{host.strip('[]')}]"
        return f"http://{host}:{self.port}"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535: {text!r}")
    return value


def _optional_positive_float(text: str) -> float | None:
    return None if text.strip().lower() in ("", "none", "0") else _positive_float(text)


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
    if text == "memory://" or text.startswith(("redis://", "rediss://", "unix://")):
        return text
    raise argparse.ArgumentTypeError(f"store URL must be memory:// or redis://...: {text!r}")


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


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Flags win over environment variables (``MCP2ANP_<FLAG>``), which win over defaults."""
    defaults = Settings()
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m example_app",
        description="Serve the mcp2anp-middleware demo (MCP endpoint and demo ANP agent).",
    )
    parser.add_argument("--host", default=env.get("MCP2ANP_HOST", defaults.host))
    parser.add_argument("--port", type=_port, default=env.get("MCP2ANP_PORT", str(defaults.port)))
    parser.add_argument(
        "--session-timeout",
        type=_positive_float,
        default=env.get("MCP2ANP_SESSION_TIMEOUT", str(defaults.session_timeout)),
        help="idle seconds before a session is removed (default 1800)",
    )
    parser.add_argument(
        "--cleanup-interval",
        type=_positive_float,
        default=env.get("MCP2ANP_CLEANUP_INTERVAL", str(defaults.cleanup_interval)),
        help="seconds between cleanup sweeps (default 300)",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=env.get("MCP2ANP_LOG_LEVEL", defaults.log_level),
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=env.get("MCP2ANP_DATA_DIR", str(defaults.data_dir)),
        help="where the development DID is generated (default .mcp2anp-data)",
    )
    parser.add_argument(
        "--auth-mode",
        choices=AUTH_MODES,
        default=env.get("MCP2ANP_AUTH_MODE", defaults.auth_mode),
        help="dev: no authentication, local DID (default); static: API keys file; "
        "remote: verifier URL",
    )
    parser.add_argument(
        "--api-keys-file",
        type=Path,
        default=env.get("MCP2ANP_API_KEYS_FILE"),
        help="JSON file mapping API keys to DID credentials (auth mode static)",
    )
    parser.add_argument(
        "--auth-url",
        default=env.get("MCP2ANP_AUTH_URL"),
        help="URL of the remote credential verifier (auth mode remote)",
    )
    parser.add_argument(
        "--entry-url",
        default=env.get("MCP2ANP_ENTRY_URL"),
        help="ANP URL the server instructions point agents to (default: the demo agent)",
    )
    parser.add_argument(
        "--allow-private",
        type=_boolean,
        default=env.get("MCP2ANP_ALLOW_PRIVATE", "true"),
        help="let the tools fetch private/loopback addresses (default true: the demo is local)",
    )
    parser.add_argument(
        "--store-url",
        type=_store_url,
        default=env.get("MCP2ANP_STORE_URL", defaults.store_url),
        help="memory:// (default) or redis://host:port/db to share sessions between processes",
    )
    parser.add_argument(
        "--touch-interval",
        type=_optional_positive_float,
        default=env.get("MCP2ANP_TOUCH_INTERVAL", "none"),
        help="Redis store: seconds between writes of a busy session's last use (default 30)",
    )
    parser.add_argument(
        "--max-session-age",
        type=_optional_positive_float,
        default=env.get("MCP2ANP_MAX_SESSION_AGE", "none"),
        help="absolute session lifetime in seconds (default none)",
    )
    parser.add_argument(
        "--per-principal-cap",
        type=_optional_cap,
        default=env.get("MCP2ANP_PER_PRINCIPAL_CAP", "none"),
        help="most sessions one credential may hold (default none)",
    )
    parser.add_argument(
        "--global-cap",
        type=_optional_cap,
        default=env.get("MCP2ANP_GLOBAL_CAP", "none"),
        help="most sessions in total (default none)",
    )
    parser.add_argument(
        "--cap-policy",
        default=env.get("MCP2ANP_CAP_POLICY", defaults.cap_policy),
        help="reject (429, default) or evict_oldest when a credential is at its cap",
    )
    parser.add_argument(
        "--stats-path",
        default=env.get("MCP2ANP_STATS_PATH"),
        help="serve read-only session statistics (JSON) at this path (default off)",
    )
    parser.add_argument(
        "--stats-token",
        default=env.get("MCP2ANP_STATS_TOKEN"),
        help="bearer token required by the statistics endpoint",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        default=env.get("MCP2ANP_STATE_FILE"),
        help="with the memory store: save sessions here on shutdown, restore them on start",
    )
    parser.add_argument(
        "--allowed-origins",
        default=env.get("MCP2ANP_ALLOWED_ORIGINS"),
        help="comma-separated browser origins allowed on /mcp (default: loopback; * = any)",
    )
    args = parser.parse_args(argv)
    if args.cap_policy not in CAP_POLICIES:
        parser.error(f"--cap-policy must be one of {', '.join(CAP_POLICIES)}")
    if args.stats_path is not None and not args.stats_path.startswith("/"):
        parser.error("--stats-path must start with '/'")
    # argparse does not apply ``choices`` to defaults taken from the environment.
    if args.auth_mode not in AUTH_MODES:
        parser.error(f"--auth-mode must be one of {', '.join(AUTH_MODES)} (got {args.auth_mode!r})")
    if args.auth_mode == "static" and args.api_keys_file is None:
        parser.error("--auth-mode static needs --api-keys-file")
    if args.auth_mode == "static" and not args.api_keys_file.is_file():
        parser.error(f"--api-keys-file {args.api_keys_file} does not exist")
    if args.auth_mode == "remote" and not args.auth_url:
        parser.error("--auth-mode remote needs --auth-url")
    if args.auth_mode == "dev" and args.host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        parser.error("--auth-mode dev (no authentication) only binds to loopback hosts")
    origins = None
    if args.allowed_origins:
        origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    return Settings(
        store_url=args.store_url,
        touch_interval=args.touch_interval,
        max_session_age=args.max_session_age,
        per_principal_cap=args.per_principal_cap,
        global_cap=args.global_cap,
        cap_policy=args.cap_policy,
        stats_path=args.stats_path,
        stats_token=args.stats_token,
        state_file=args.state_file,
        allowed_origins=origins,
        data_dir=args.data_dir,
        auth_mode=args.auth_mode,
        api_keys_file=args.api_keys_file,
        auth_url=args.auth_url,
        entry_url=args.entry_url,
        allow_private=args.allow_private,
        host=args.host,
        port=args.port,
        session_timeout=args.session_timeout,
        cleanup_interval=args.cleanup_interval,
        log_level=args.log_level,
    )
