"""``python -m example_app``: serve the demo with uvicorn on its embedded defaults."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence

import structlog
import uvicorn

from .app import create_app
from .settings import FETCH_DEADLINE, Settings, parse_settings, startup_warnings

PROG = "python -m example_app"


def configure_logging(level_name: str) -> None:
    level = getattr(logging, level_name)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    # Traces of outgoing HTTP include agents' response headers (bearer tokens) at DEBUG.
    logging.getLogger("httpcore").setLevel(max(level, logging.INFO))
    # The SDK logs "Terminating session: None" for every stateless request.
    logging.getLogger("mcp.server.streamable_http").setLevel(max(level, logging.WARNING))


def banner(settings: Settings) -> str:
    base = settings.base_url
    lines = [
        "mcp2anp-middleware demo",
        f"  MCP endpoint:    {base}/mcp",
        f"  demo ANP agent:  {base}/agent/ad.json",
        f"  auth mode:       {settings.auth_mode}",
        f"  session store:   {settings.store_url.split('@')[-1]}",
        f"  sessions:        idle timeout {settings.session_timeout:g}s, "
        f"sweep every {settings.cleanup_interval:g}s",
        f"  shutdown grace:  {settings.shutdown_grace:g}s "
        f"(tool fetch deadline {FETCH_DEADLINE:g}s)",
        "  tools may reach: "
        + (
            "any address, private ranges included"
            if settings.allow_private
            else "public addresses and the demo agent"
        ),
        "Connect an MCP client (streamable HTTP) to the endpoint, or run the demo client:",
        f"  python -m example_app.client {base}/mcp",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    for warning in startup_warnings(settings):
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    try:
        app = create_app(settings)
    except (ValueError, OSError) as exc:
        # The library refuses what it cannot run (a bad keys file, an unusable data directory,
        # an option out of range): one line, like a bad flag, not a traceback.
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(banner(settings), file=sys.stderr, flush=True)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        lifespan="on",
        # The same grace as the middleware's drain (uvicorn takes whole seconds): both outlast
        # the tools' fetch deadline unless the operator chose otherwise.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
