"""The answer to ``initialize``, worked out once for as long as the server stays the same.

Every new session begins with ``initialize``, and the SDK's kernel answered each one from
scratch: it made the server's options (``server.create_initialization_options()``: half a dozen
pydantic models from the server's identity and handlers, about 60,000 instructions), built an
``InitializeResult`` from them, dumped it, and had its result sieve validate and dump it again
(about 95,000 more). For one server and one negotiated protocol version that answer is always
the same. So:

- :class:`InitOptionsCache` makes the options again only when what they are made from changed (a
  handler added or removed, the identity or extensions edited), and every session's kernel is
  handed them. Sharing one object is safe: the kernel turns the result built from it into plain
  JSON before any middleware sees it. A server whose class makes its own options (an override of
  ``create_initialization_options`` or ``get_capabilities``) makes them every time, as before.
- :class:`InitializeAnswers` keeps the SDK's own answer per negotiated version (and options),
  and hands a fresh copy of it to a later ``initialize``, from the span link every request
  passes (:class:`~.tracing.SpansWhenTraced`). What the kernel checks still runs first, with its
  own functions and errors: the request's surface validation and the parameters' validation
  that picks the version. The kernel itself still makes the request's context, runs the chain
  and commits the handshake. It answers so only while the chain is the SDK's own (a host's
  middleware sees the kernel's ``initialize`` as always) and untraced (a span covers the whole).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pydantic_core
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.models import InitializationOptions
from mcp.server.runner import ServerRunner
from mcp.shared.exceptions import MCPError
from mcp_types import METHOD_NOT_FOUND
from mcp_types.methods import validate_client_request

from mcp2anp_middleware.mcp_hosting.tracing import SpansWhenTraced, only_sdk_middleware


class InitOptionsCache:
    """``server.create_initialization_options()``, made again only when its inputs change."""

    def __init__(self, server: Server[Any]) -> None:
        self.server = server
        cls = type(server)
        self._cacheable = (
            cls.create_initialization_options is Server.create_initialization_options
            and cls.get_capabilities is Server.get_capabilities
        )
        self._key: tuple[Any, ...] | None = None
        self._options: InitializationOptions | None = None

    def current(self) -> InitializationOptions | None:
        """The options the SDK would make now, or None: let the kernel make them itself."""
        if not self._cacheable:
            return None
        key = self._inputs()
        if key is None:
            return None
        if key != self._key or self._options is None:
            self._options = self.server.create_initialization_options()
            # Copies of the mutable inputs: an edit made in place later must not match.
            self._key = copy.deepcopy(key)
        return self._options

    def _inputs(self) -> tuple[Any, ...] | None:
        """Everything ``create_initialization_options()`` reads (with no arguments): the
        server's identity, its extensions and which request methods it serves. None when the
        server does not keep its handlers where the SDK's own class does."""
        server = self.server
        handlers = getattr(server, "_request_handlers", None)
        if type(handlers) is not dict:
            return None
        return (
            tuple(handlers),
            server.name,
            server.version,
            server.title,
            server.description,
            server.instructions,
            server.website_url,
            server.icons,
            server.extensions,
        )


@dataclass(frozen=True, slots=True)
class _Answer:
    options: InitializationOptions
    hint: object
    wire: bytes
    """The SDK's answer, as JSON: each use parses a fresh copy (nothing shares its parts)."""


class InitializeAnswers:
    """Serves ``initialize`` (see the module's docstring): a server middleware's call."""

    def __init__(self, server: Server[Any], options: InitOptionsCache) -> None:
        self.server = server
        self.options = options
        self._answers: dict[str, _Answer] = {}
        """By negotiated version (a handful at most: the versions the SDK negotiates)."""

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        server = self.server
        options = self.options.current()
        if options is None or not only_sdk_middleware(server.middleware):
            return await call_next(ctx)
        # The kernel's own checks, in its order and with its errors.
        try:
            validate_client_request("initialize", ctx.protocol_version, ctx.params)
        except KeyError:
            raise MCPError(
                code=METHOD_NOT_FOUND, message="Method not found", data=ctx.method
            ) from None
        _, negotiated = ServerRunner._negotiate_initialize(ctx.params)
        hint = server.cache_hints.get("initialize")
        kept = self._answers.get(negotiated)
        if kept is not None and kept.options is options and kept.hint is hint:
            return pydantic_core.from_json(kept.wire)  # type: ignore[no-any-return]
        result = await call_next(ctx)
        if type(result) is dict:  # (the kernel's wire form, as every answer it makes)
            self._answers[negotiated] = _Answer(options, hint, pydantic_core.to_json(result))
        return result


def initialize_answers(server: Server[Any]) -> InitializeAnswers:
    """The server's :class:`InitializeAnswers`, one per server however many endpoints host it:
    installed on its span link, when it has one (else its options are still made once)."""
    for entry in server.middleware:
        if type(entry) is SpansWhenTraced:
            if not isinstance(entry.initialize, InitializeAnswers):
                entry.initialize = InitializeAnswers(server, InitOptionsCache(server))
            return entry.initialize
    return InitializeAnswers(server, InitOptionsCache(server))
