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
  the negotiated protocol version as it validates every result. Its text blocks come as instances
  of that version's own ``TextContent`` (validated when made): the sieve's content union takes an
  instance of one of its members as it is, where a plain dict is tried against every member.
  That, not the block, was most of the sieve's validation (about 15,000 instructions per call);
  the wire form is the same, since the sieve dumps the instance as it dumps a dict. Blocks are
  typed only when the sieve is the next to see the result, at the version they were typed for:
  while the route is still the handler (nothing wrapping it reads the result first) and the
  server's middleware is only the SDK's own (none rewrote the request's context, its version
  included). Otherwise the result goes as plain data, as it did before.

The route is taken only for a tool this toolkit registered and that is still the one the server
holds under that name; any other tool, or one the host replaced, goes to :class:`MCPServer`. It
is installed only while ``tools/call`` is :class:`MCPServer`'s own handler and nothing on its way
to a tool is overridden (a subclass's ``call_tool``, a tool manager's, a tool class's ``run``): a
host auditing or limiting tool calls there, or an extension intercepting them, sees every call.
A failure the tool does not turn into a tool error itself is answered as :class:`MCPServer`
answers it: ``Error executing tool <name>``, the details in the log only.
"""

from __future__ import annotations

import functools
import logging
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver import server as mcpserver_module
from mcp.server.mcpserver.tools.base import Tool
from mcp.server.mcpserver.tools.tool_manager import ToolManager
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolRequestParams
from mcp_types.methods import SERVER_RESULTS
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from mcp2anp_middleware.mcp_hosting.tracing import only_sdk_middleware

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
    direct: dict[str, tuple[Tool, Run, _Arguments]] = {}
    for name, run in runs.items():
        tool = manager.get_tool(name)
        if tool is not None and type(tool).run is Tool.run:
            direct[name] = (tool, run, _Arguments(tool))

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> Any:
        found = direct.get(params.name)
        if found is None or manager.get_tool(params.name) is not found[0]:
            return await ordinary(ctx, params)
        _, run, validated = found
        try:
            arguments = validated(params.arguments or {})
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
            result = await run(ctx, arguments)
        except MCPError:
            raise
        except Exception:  # nothing of it reaches the client, as on MCPServer's route
            logger.exception("Tool %r raised an unexpected exception", params.name)
            return _tool_error(f"Error executing tool {params.name}")
        if _sieved_next(lowlevel, call_tool):
            return _typed_text(result, ctx.protocol_version)
        return result

    lowlevel.add_request_handler("tools/call", CallToolRequestParams, call_tool)
    return True


def _sieved_next(lowlevel: Any, route: Any) -> bool:
    """Whether the kernel's result sieve is the next to see what ``route`` returns, at the
    version of the request's context: the route is still the ``tools/call`` handler (nothing
    wrapping it reads the result first, or hands it another context), and the server's
    middleware is only the SDK's own (none rewrote the context, its version included, on the
    way in). Otherwise the result goes as plain data."""
    entry = lowlevel.get_request_handler("tools/call")
    if entry is None or entry.handler is not route:
        return False
    return only_sdk_middleware(lowlevel.middleware)


def _typed_text(result: dict[str, Any], version: str) -> dict[str, Any]:
    """``result`` with its text blocks made instances of the ``TextContent`` class the kernel's
    result sieve validates them against at ``version`` (see the module's docstring); as it came
    when any block is something else, or the surface is not shaped as expected."""
    model = _text_block_model(version)
    content = result.get("content")
    if model is None or type(content) is not list:
        return result
    blocks: list[Any] = []
    for block in content:
        if type(block) is not dict or block.keys() != _TEXT_KEYS or block["type"] != "text":
            return result
        try:
            blocks.append(model(type="text", text=block["text"]))
        except ValidationError:  # the sieve judges it, as it would have
            return result
    return {**result, "content": blocks}


_TEXT_KEYS = frozenset({"type", "text"})


@functools.lru_cache(maxsize=16)
def _text_block_model(version: str) -> type[BaseModel] | None:
    """The text block member of the content union of the ``tools/call`` result surface at
    ``version`` (per protocol version, the one the kernel's sieve validates with)."""
    surface = SERVER_RESULTS.get(("tools/call", version))
    for result_model in typing.get_args(surface) or (surface,):
        fields = getattr(result_model, "model_fields", None)
        content = fields.get("content") if isinstance(fields, dict) else None
        items = typing.get_args(content.annotation) if content is not None else ()
        for member in typing.get_args(items[0]) if len(items) == 1 else ():
            if not (isinstance(member, type) and issubclass(member, BaseModel)):
                continue
            kind = member.model_fields.get("type")
            if kind is not None and _only_text(kind.annotation):
                return member
    return None


def _only_text(annotation: Any) -> bool:
    """Whether a field's annotation is ``Literal["text"]``."""
    return typing.get_origin(annotation) is Literal and typing.get_args(annotation) == ("text",)


def _tool_error(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True, "resultType": "complete"}


_SDK_VALIDATE = FuncMetadata.validate_arguments
_SDK_PRE_PARSE = FuncMetadata.pre_parse_json
_SDK_DUMP = ArgModelBase.model_dump_one_level
_PYDANTIC_VALIDATE = BaseModel.model_validate.__func__  # type: ignore[attr-defined]
"""The steps of ``validate_arguments`` as the SDK and pydantic define them (taken at import: a
later patch of any of them, or an override in a subclass, sends calls the SDK's own way)."""


class _Arguments:
    """``FuncMetadata.validate_arguments`` of one tool, its steps unchanged, with what depends only
    on the tool's argument model worked out once instead of for every call.

    The SDK's steps: pre-parse JSON-in-a-string values of fields that are not ``str``, validate
    with the argument model, dump one level. The pre-parsing walks the model's fields for every
    call to find which keys it applies to; here that set is kept (worked out again when the
    tool's metadata or its model is replaced, since the SDK reads both live), and the SDK's own
    ``pre_parse_json`` runs whenever an argument could be pre-parsed, so what it does is never
    re-implemented. Metadata, a model or a validator that changes any step (an override, a
    patch, a model of another class out of validation) gets the SDK's own method."""

    __slots__ = ("_dump", "_fast", "_json_keys", "_metadata", "_model", "_tool")

    def __init__(self, tool: Tool) -> None:
        self._tool = tool
        self._metadata: FuncMetadata | None = None
        self._model: type[ArgModelBase] | None = None
        self._fast = False
        self._json_keys: frozenset[str] = frozenset()
        self._dump: tuple[tuple[str, str], ...] = ()

    def __call__(self, arguments: dict[str, Any]) -> dict[str, Any]:
        metadata = self._tool.fn_metadata
        model = metadata.arg_model
        if metadata is not self._metadata or model is not self._model:
            self._learn(metadata, model)
        if not self._fast:
            return metadata.validate_arguments(arguments)
        json_keys = self._json_keys
        for key, value in arguments.items():
            if key in json_keys and isinstance(value, str):
                arguments = metadata.pre_parse_json(arguments)
                break
        parsed = model.__pydantic_validator__.validate_python(arguments)
        if type(parsed) is not model:  # a validator made another model: dumped as it says
            return parsed.model_dump_one_level()  # type: ignore[no-any-return]
        return {output: getattr(parsed, field) for field, output in self._dump}

    def _learn(self, metadata: FuncMetadata, model: type[ArgModelBase]) -> None:
        self._metadata = metadata
        self._model = model
        kind = type(metadata)
        self._fast = (
            kind.validate_arguments is _SDK_VALIDATE
            and kind.pre_parse_json is _SDK_PRE_PARSE
            and getattr(model.model_validate, "__func__", None) is _PYDANTIC_VALIDATE
            and model.model_dump_one_level is _SDK_DUMP
        )
        if not self._fast:
            return
        fields: dict[str, FieldInfo] = {}  # as pre_parse_json maps keys (aliases after names)
        for name, info in model.model_fields.items():
            fields[name] = info
            if info.alias:
                fields[info.alias] = info
        self._json_keys = frozenset(
            key for key, info in fields.items() if info.annotation is not str
        )
        self._dump = tuple(
            (name, info.alias if info.alias else name) for name, info in model.model_fields.items()
        )
