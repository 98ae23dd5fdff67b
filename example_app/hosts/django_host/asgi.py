"""ASGI entry point of the example Django project, wrapped in ANPMiddleware.

Run::

    MCP2ANP_PORT=8000 MCP2ANP_DATA_DIR=.mcp2anp-data \
        uvicorn example_app.hosts.django_host.asgi:application --port 8000
"""

# Django raises on ASGI lifespan; ANPMiddleware then answers lifespan itself, so its cleanup
# loop still starts and stops with the server. ``application`` is built lazily, on first access,
# so importing this module has no side effects (no settings, no DID generated).

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from mcp2anp_middleware import ANPMiddleware, URLPolicy

from ..common import base_url_for, data_dir_from_env, demo_agent, host_mcp_server, port_from_env
from . import settings as project_settings

SETTINGS_MODULE = "example_app.hosts.django_host.settings"


def configure_django() -> None:
    """Apply this project's settings once per process, unless Django is configured already."""
    from django.conf import settings  # type: ignore[import-untyped]

    if settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"):
        return
    names = [name for name in dir(project_settings) if name.isupper()]
    settings.configure(**{name: getattr(project_settings, name) for name in names})


def with_mount(app: ASGIApp, prefix: str, mounted: ASGIApp) -> ASGIApp:
    """Route HTTP requests under ``prefix`` to ``mounted`` (like Starlette's ``Mount``), the rest
    to ``app``; lifespan goes to ``app`` alone."""

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and (path == prefix or path.startswith(prefix + "/")):
            root_path = scope.get("root_path", "") + prefix
            await mounted({**scope, "root_path": root_path}, receive, send)
            return
        await app(scope, receive, send)

    return dispatch


def create_application(
    *, data_dir: Path | str | None = None, port: int | None = None
) -> ANPMiddleware:
    """``uvicorn --factory`` entry point; arguments default to ``$MCP2ANP_DATA_DIR``/``_PORT``."""
    configure_django()
    from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]

    directory = data_dir_from_env(data_dir)
    base_url = base_url_for(port_from_env(port))
    django_app = with_mount(get_asgi_application(), "/agent", demo_agent(base_url))
    application = ANPMiddleware(
        django_app,
        server=host_mcp_server("django-host"),
        data_dir=directory,
        public_url=base_url,  # the dev DID names this address, and the app serves its document
        url_policy=URLPolicy(
            private_origins=(f"{base_url}/agent/",)
        ),  # the demo agent, and only it
        entry_url=f"{base_url}/agent/ad.json",
    )
    return application


_application: ANPMiddleware | None = None


def __getattr__(name: str) -> Any:
    """``asgi.application``, Django's conventional name, built from the environment on first use."""
    global _application
    if name != "application":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _application is None:
        _application = create_application()
    return _application
