"""The generic MCP session layer: ``Mcp-Session-Id`` ownership, lifetimes, stores and events.

It knows ASGI and MCP, nothing of ANP: per-session machinery hangs on
:attr:`~mcp2anp_middleware.sessions.state.SessionState.attachments` and is released by its owner
when a :class:`~mcp2anp_middleware.sessions.events.SessionEvent` says the session ended.
"""
