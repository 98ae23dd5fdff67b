"""Launcher settings: command-line flags, each also readable from an environment variable."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 9880
    session_timeout: float = 1800.0
    cleanup_interval: float = 300.0
    log_level: str = "INFO"

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
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
    args = parser.parse_args(argv)
    return Settings(
        host=args.host,
        port=args.port,
        session_timeout=args.session_timeout,
        cleanup_interval=args.cleanup_interval,
        log_level=args.log_level,
    )
