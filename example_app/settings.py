"""Launcher settings: command-line flags, each also readable from an environment variable."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
AUTH_MODES = ("dev", "static", "remote")


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
    args = parser.parse_args(argv)
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
    return Settings(
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
