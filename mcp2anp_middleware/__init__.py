"""mcp2anp-middleware: host the ANP tools for MCP clients inside any ASGI app.

Optional extras keep their own modules: ``mcp2anp_middleware.stores.redis.RedisSessionStore``
(extra ``redis``) and ``mcp2anp_middleware.metrics.SessionMetricsCollector`` (extra
``prometheus``).
"""

from .anp_errors import ANPToolError
from .anp_tools import ANPToolHandler, ANPToolkit, SessionCrawler
from .authentication import (
    AuthenticationError,
    Authenticator,
    Credentials,
    StaticConfigAuthenticator,
)
from .authenticators import (
    AuthenticationUnavailable,
    CachingAuthenticator,
    NoAuthAuthenticator,
    RemoteVerifierAuthenticator,
    StaticKeyAuthenticator,
    SyncAuthenticator,
    require_credentials,
)
from .clock import Clock, ManualClock, system_clock
from .dev_identity import ensure_dev_identity
from .did_credentials import CredentialCache, CredentialError, DidCredential, load_credential
from .hosting import ANPMiddleware
from .logging_setup import tame_anp_logging
from .mcp_endpoint import MCPEndpoint
from .middleware import SESSION_SCOPE_KEY, MCPSessionMiddleware
from .request_helpers import session_from_request, session_from_scope
from .session_ids import MAX_SESSION_ID_LENGTH, new_session_id
from .session_registry import SessionRegistry
from .session_state import ANONYMOUS_PRINCIPAL, SessionConfig, SessionState
from .stores import CapExceeded, InMemorySessionStore, SessionStore, StoreUnavailable
from .url_policy import URLPolicy

__all__ = [
    "ANONYMOUS_PRINCIPAL",
    "MAX_SESSION_ID_LENGTH",
    "SESSION_SCOPE_KEY",
    "ANPMiddleware",
    "ANPToolError",
    "ANPToolHandler",
    "ANPToolkit",
    "AuthenticationError",
    "AuthenticationUnavailable",
    "Authenticator",
    "CachingAuthenticator",
    "CapExceeded",
    "Clock",
    "CredentialCache",
    "CredentialError",
    "Credentials",
    "DidCredential",
    "InMemorySessionStore",
    "MCPEndpoint",
    "MCPSessionMiddleware",
    "ManualClock",
    "NoAuthAuthenticator",
    "RemoteVerifierAuthenticator",
    "SessionConfig",
    "SessionCrawler",
    "SessionRegistry",
    "SessionState",
    "SessionStore",
    "StaticConfigAuthenticator",
    "StaticKeyAuthenticator",
    "StoreUnavailable",
    "SyncAuthenticator",
    "URLPolicy",
    "ensure_dev_identity",
    "load_credential",
    "new_session_id",
    "require_credentials",
    "session_from_request",
    "session_from_scope",
    "system_clock",
    "tame_anp_logging",
]
