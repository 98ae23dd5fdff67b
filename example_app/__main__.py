"""``python -m example_app``: serve the demo with uvicorn on its embedded defaults."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import structlog
import uvicorn

from .app import create_app
from .settings import parse_settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    level = getattr(logging, settings.log_level)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    app = create_app(settings)
    print(f"MCP endpoint: {settings.base_url}/mcp", file=sys.stderr)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
