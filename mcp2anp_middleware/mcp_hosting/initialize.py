"""The answer to ``initialize``, worked out once for as long as the server stays the same.

Every new session begins with ``initialize``, and the SDK's kernel answered each one from
scratch: it made the server's options (``server.create_initialization_options()``: half a dozen
pydantic models from the server's identity and handlers, about 60,000 instructions), built an
``InitializeResult`` from them, dumped it, and had its result sieve validate and dump it again
(about 95,000 more). For one server and one negotiated protocol version that answer is always
the same. So, for the ``initialize`` of a session this package's endpoint serves:

- :class:`InitOptionsCache` makes the options again only when what they are made from changed (a
  handler added or removed, the identity or extensions edited), and the session's kernel is
  handed them. Sharing one object is safe: the kernel turns the result built from it into plain
  JSON before any middleware sees it. A server whose class (or the object itself) makes its own
  options, by an override of ``create_initialization_options`` or ``get_capabilities``, makes
  them every time, as before.
- :class:`InitializeAnswers` keeps the kernel's own answer for each protocol version (the
  connection's, and the one it negotiates) and set of options, and later hands out fresh copies
  of it, from the span link every request passes (:class:`~.tracing.SpansWhenTraced`: a link of
  its own would cost every request a step of the chain). What the kernel checks still runs
  first, with its own functions and errors: the request's surface validation and the
  parameters' validation that picks the version. The kernel itself still makes the request's
  context, runs the chain up to that link (the one after it, the SDK's request-state boundary,
  passes an ``initialize`` on untouched) and commits the handshake. A server whose chain has no
  span link (its host removed the SDK's) gets the options made once, and no copies.

Both apply only while the server's middleware is the SDK's own: a host's middleware could change
the server on the way in, or read what the kernel makes, and then the kernel makes everything as
before. Copies are handed out only while nothing is traced (a span covers the kernel's own
work), and only to this endpoint's sessions (a task-local mark, :data:`~.tracing.
KERNEL_SHORTCUT`): the same server run by the SDK's own transports, with options of their own,
or another server sharing its middleware list, is answered by its kernel.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import pydantic_core
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.models import InitializationOptions
from mcp.server.runner import ServerRunner
from mcp.shared.dispatcher import DispatchContext
from mcp.shared.exceptions import MCPError
from mcp.shared.transport_context import TransportContext
from mcp_types import METHOD_NOT_FOUND
from mcp_types import methods as sdk_methods

from mcp2anp_middleware.mcp_hosting.tracing import KERNEL_SHORTCUT, only_sdk_middleware

_OWN_OPTIONS = ("create_initialization_options", "get_capabilities")
"""The methods that make the options: overridden anywhere, the server makes its own."""


class InitOptionsCache:
    """``server.create_initialization_options()``, made again only when its inputs change."""

    def __init__(self, server: Server[Any]) -> None:
        self.server = server
        self._class: type | None = None
        self._class_makes_its_own = True
        self._key: tuple[Any, ...] | None = None
        self._options: InitializationOptions | None = None

    def current(self) -> InitializationOptions | None:
        """The options the SDK would make now, or None: let the kernel make them itself."""
        if self._makes_its_own():
            return None
        key = self._inputs()
        if key is None:
            return None
        if key != self._key:
            self._options = self.server.create_initialization_options()
            # Copies of the mutable inputs: an edit made in place later must not match.
            self._key = copy.deepcopy(key)
        return self._options

    def _makes_its_own(self) -> bool:
        """Whether the server's class, or the server object itself, overrides how the options
        are made (the class is looked at again whenever it is another one)."""
        server = self.server
        cls = type(server)
        if cls is not self._class:
            self._class = cls
            self._class_makes_its_own = any(
                getattr(cls, name) is not getattr(Server, name) for name in _OWN_OPTIONS
            )
        return self._class_makes_its_own or not vars(server).keys().isdisjoint(_OWN_OPTIONS)

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
    """The kernel's answer, as JSON: each use parses a fresh copy (nothing shares its parts)."""


class InitializeAnswers:
    """One endpoint's ``initialize`` (see the module's docstring)."""

    def __init__(self, server: Server[Any]) -> None:
        self.server = server
        self.options = InitOptionsCache(server)
        self._answers: dict[tuple[str, str], _Answer] = {}
        """By the connection's version and the negotiated one: a handful at most."""

    async def run(
        self,
        runner: ServerRunner[Any],
        channel: DispatchContext[TransportContext],
        params: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Serve an ``initialize`` of ``runner``'s session through its kernel."""
        options = self.options.current() if only_sdk_middleware(self.server.middleware) else None
        runner.init_options = options  # (None: the kernel makes them, inside the chain)
        if options is None:
            return await runner.on_request(channel, "initialize", params)

        token = KERNEL_SHORTCUT.set(functools.partial(self._answer, options))
        try:
            return await runner.on_request(channel, "initialize", params)
        finally:
            KERNEL_SHORTCUT.reset(token)

    async def _answer(
        self,
        options: InitializationOptions,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
    ) -> HandlerResult:
        """Inside the kernel's chain: the kernel's checks, then a copy of its answer."""
        version = ctx.protocol_version
        try:
            sdk_methods.validate_client_request("initialize", version, ctx.params)
        except KeyError:
            raise MCPError(
                code=METHOD_NOT_FOUND, message="Method not found", data=ctx.method
            ) from None
        _, negotiated = ServerRunner._negotiate_initialize(ctx.params)
        key = (version, negotiated)
        # (The SDK refuses a cache hint for ``initialize`` when the server is made; one put in
        # its hints later would still shape the kernel's answer, so it is part of the key.)
        hint = self.server.cache_hints.get("initialize")
        kept = self._answers.get(key)
        if kept is not None and kept.options is options and kept.hint is hint:
            return pydantic_core.from_json(kept.wire)  # type: ignore[no-any-return]
        result = await call_next(ctx)
        if type(result) is dict:  # (the kernel's wire form, as every answer it makes)
            try:
                wire = pydantic_core.to_json(result)
            except ValueError:  # not JSON (the kernel's answer fails as it always did)
                return result
            self._answers[key] = _Answer(options, hint, wire)
        return result
