"""mcp2anp-middleware: host the ANP tools for MCP clients inside any ASGI app."""

from .authentication import (
    AuthenticationError,
    Authenticator,
    Credentials,
    StaticConfigAuthenticator,
)
from .clock import Clock, ManualClock, system_clock
from .middleware import SESSION_SCOPE_KEY, MCPSessionMiddleware
from .session_ids import MAX_SESSION_ID_LENGTH, new_session_id
from .session_registry import SessionRegistry
from .session_state import ANONYMOUS_PRINCIPAL, SessionConfig, SessionState

__all__ = [
    "ANONYMOUS_PRINCIPAL",
    "MAX_SESSION_ID_LENGTH",
    "SESSION_SCOPE_KEY",
    "AuthenticationError",
    "Authenticator",
    "Clock",
    "Credentials",
    "MCPSessionMiddleware",
    "ManualClock",
    "SessionConfig",
    "SessionRegistry",
    "SessionState",
    "StaticConfigAuthenticator",
    "new_session_id",
    "system_clock",
]
