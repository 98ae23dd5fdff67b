"""Host examples: a pre-existing Starlette, FastAPI or Django app gets the ANP tools in one line.

Each serves its own routes, the MCP endpoint at ``/mcp`` and the offline demo ANP agent at
``/agent`` (development mode: no authentication, a local DID kept in ``MCP2ANP_DATA_DIR``, made
for ``http://127.0.0.1:$MCP2ANP_PORT`` and served by the app at its did:wba path, from where the
demo agent resolves it over HTTP):

* ``starlette_host``: ``uvicorn --factory example_app.hosts.starlette_host:create_app``
* ``fastapi_host``: ``uvicorn --factory example_app.hosts.fastapi_host:create_app``
* ``django_host``: ``uvicorn example_app.hosts.django_host.asgi:application``
"""
