"""The server's ``initialize`` payload, made once for as long as the server stays the same.

The SDK's kernel answers ``initialize`` with ``server.create_initialization_options()`` unless it
is handed options, and making them builds half a dozen pydantic models from the server's
identity and the handlers it has: about 60,000 instructions, as much as the rest of a new
session's kernel. The payload changes only when the server does, so it is made again only when
what it is made from changed (a handler added or removed, the identity or extensions edited).

Sharing one object between sessions is safe: the kernel turns the ``InitializeResult`` built
from it into plain JSON before any server middleware sees it, so nothing a request does can
reach the shared models. A server whose class makes its own options (an override of
``create_initialization_options`` or ``get_capabilities``) is left to make them every time.
"""

from __future__ import annotations

import copy
from typing import Any

from mcp.server.lowlevel.server import Server
from mcp.server.models import InitializationOptions


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
