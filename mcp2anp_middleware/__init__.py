"""mcp2anp-middleware: host the ANP tools for MCP clients inside any ASGI app.

The package has three layers (see docs/architecture.md):

- :mod:`mcp2anp_middleware.sessions`: the generic MCP session layer (middleware, registry, stores,
  events, admin and statistics apps);
- :mod:`mcp2anp_middleware.authentication`: from a request's credential to a session's identity;
- :mod:`mcp2anp_middleware.anp_tools`: the two ANP tools and what they use to reach agents;

and :class:`ANPMiddleware`, which wires them together for a host app. The names below are the
public API; everything else is importable from its module. Optional extras keep their own
modules: ``mcp2anp_middleware.sessions.stores.redis.RedisSessionStore`` (extra ``redis``) and
``mcp2anp_middleware.sessions.metrics.SessionMetricsCollector`` (extra ``prometheus``).
"""

from mcp2anp_middleware.anp_tools.dev_identity import ensure_dev_identity
from mcp2anp_middleware.anp_tools.toolkit import ANPToolkit
from mcp2anp_middleware.anp_tools.url_policy import URLPolicy
from mcp2anp_middleware.authentication import (
    AuthenticationError,
    Authenticator,
    CachingAuthenticator,
    Credentials,
    RemoteVerifierAuthenticator,
    StaticKeyAuthenticator,
)
from mcp2anp_middleware.hosting import ANPMiddleware
from mcp2anp_middleware.log_redaction import redact_library_logs
from mcp2anp_middleware.sessions.events import SessionEvent, SessionEventKind
from mcp2anp_middleware.sessions.middleware import MCPSessionMiddleware
from mcp2anp_middleware.sessions.policy import RequestLimits, SessionPolicy
from mcp2anp_middleware.sessions.request_helpers import current_session, session_from_request
from mcp2anp_middleware.sessions.state import SessionConfig, SessionState
from mcp2anp_middleware.startup_heap import frozen_startup_heap
from mcp2anp_middleware.version import __version__

# Every library logger the package drives exists now: keep their URLs to host and path.
redact_library_logs()


__all__ = [
    "ANPMiddleware",
    "ANPToolkit",
    "AuthenticationError",
    "Authenticator",
    "CachingAuthenticator",
    "Credentials",
    "MCPSessionMiddleware",
    "RemoteVerifierAuthenticator",
    "RequestLimits",
    "SessionConfig",
    "SessionEvent",
    "SessionEventKind",
    "SessionPolicy",
    "SessionState",
    "StaticKeyAuthenticator",
    "URLPolicy",
    "__version__",
    "current_session",
    "ensure_dev_identity",
    "frozen_startup_heap",
    "session_from_request",
]
