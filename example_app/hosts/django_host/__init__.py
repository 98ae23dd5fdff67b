"""A minimal Django project (no database) served under ASGI and wrapped in ANPMiddleware.

Run::

    MCP2ANP_PORT=8000 MCP2ANP_DATA_DIR=.mcp2anp-data \
        uvicorn example_app.hosts.django_host.asgi:application --port 8000

(or ``uvicorn --factory example_app.hosts.django_host.asgi:create_application``). Then:
``GET /``, ``GET /whoami``, the MCP endpoint at ``/mcp`` and the demo agent at ``/agent``.
"""
