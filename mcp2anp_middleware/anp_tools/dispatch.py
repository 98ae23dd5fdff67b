"""A direct ``tools/call`` route to the ANP tools, beside :class:`MCPServer`'s own.

Why: for every ``tools/call``, :class:`MCPServer` builds its pydantic ``Context`` (private
attributes and a wrap validator), walks ``ToolManager`` → ``Tool.run`` → ``FuncMetadata.call_fn``,
and has the tool build a ``CallToolResult`` model that the kernel dumps to a dict before its
result sieve validates and dumps it once more. None of that is needed to run the ANP tools, and
together it was about an eighth of what hosting a call costs (docs/performance.md).

What stays, so nothing a hosted server relies on is skipped:

- the kernel validates the request (``CallToolRequestParams``) and owns cancellation (the
  request's task scope) and progress (``_meta.progressToken`` through ``ctx.session``);
- the arguments are validated by the tool's own ``FuncMetadata``, the very model ``tools/list``
  advertises and :class:`MCPServer` uses (JSON-in-a-string pre-parsing included), and a
  rejection is answered as :class:`MCPServer` answers it: a tool error naming the tool;
- the result is the wire dict of a ``CallToolResult``, which the kernel's sieve validates against
  the negotiated protocol version as it validates every result.

The route is taken only for a tool this toolkit registered and that is still the one the server
holds under that name; any other tool, or one the host replaced, goes to :class:`MCPServer`. It
is installed only while ``tools/call`` is :class:`MCPServer`'s own handler and nothing on its way
to a tool is overridden (a subclass's ``call_tool``, a tool manager's, a tool class's ``run``): a
host auditing or limiting tool calls there, or an extension intercepting them, sees every call.
A failure the tool does not turn into a tool error itself is answered as :class:`MCPServer`
answers it: ``Error executing tool <name>``, the details in the log only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver import server as mcpserver_module
from mcp.server.mcpserver.tools.base import Tool
from mcp.server.mcpserver.tools.tool_manager import ToolManager
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolRequestParams
from pydantic import ValidationError

logger = logging.getLogger(mcpserver_module.__name__)
""":class:`MCPServer`'s own logger: the lines that mirror its lines obey the same settings."""

Run = Callable[[ServerRequestContext[Any, Any], dict[str, Any]], Awaitable[dict[str, Any]]]
"""A tool's direct body: the request context and validated arguments in, the wire result out."""


def install_direct_route(server: MCPServer, runs: Mapping[str, Run]) -> bool:
    """Route ``tools/call`` for the tools named in ``runs`` straight to them, on ``server``.

    Returns whether the route was installed (not when an extension owns ``tools/call``).
    """
    lowlevel = server._lowlevel_server
    entry = lowlevel.get_request_handler("tools/call")
    manager = server._tool_manager
    if (
        entry is None
        or entry.handler != server._handle_call_tool
        or type(server)._handle_call_tool is not MCPServer._handle_call_tool
        or type(server).call_tool is not MCPServer.call_tool
        or type(manager).call_tool is not ToolManager.call_tool
    ):
        return False
    ordinary = entry.handler
    direct: dict[str, tuple[Tool, Run]] = {}
    for name, run in runs.items():
        tool = manager.get_tool(name)
        if tool is not None and type(tool).run is Tool.run:
            direct[name] = (tool, run)

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> Any:
        found = direct.get(params.name)
        if found is None or manager.get_tool(params.name) is not found[0]:
            return await ordinary(ctx, params)
        tool, run = found
        try:
            arguments = tool.fn_metadata.validate_arguments(params.arguments or {})
        except ValidationError as exc:
            # Field names only, as MCPServer logs them: the rejected values are the caller's.
            fields = sorted({".".join(str(part) for part in err["loc"]) for err in exc.errors()})
            logger.info("Tool %r rejected arguments: %r", params.name, fields)
            return _tool_error(f"Error executing tool {params.name}: {exc}")
        except MCPError:
            raise
        except Exception:
            logger.exception("Tool %r raised an unexpected exception", params.name)
            return _tool_error(f"Error executing tool {params.name}")
        try:
            return await run(ctx, arguments)
        except MCPError:
            raise
        except Exception:  # nothing of it reaches the client, as on MCPServer's route
            logger.exception("Tool %r raised an unexpected exception", params.name)
            return _tool_error(f"Error executing tool {params.name}")

    lowlevel.add_request_handler("tools/call", CallToolRequestParams, call_tool)
    return True


def _tool_error(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True, "resultType": "complete"}
