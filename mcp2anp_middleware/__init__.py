"""mcp2anp-middleware: host the ANP tools for MCP clients inside any ASGI app."""

from .anp_errors import ANPToolError
from .anp_tools import ANPToolHandler, ANPToolkit, SessionCrawler
from .authentication import (
    AuthenticationError,
    Authenticator,
    Credentials,
    StaticConfigAuthenticator,
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
    "Authenticator",
    "Clock",
    "CredentialCache",
    "CredentialError",
    "Credentials",
    "DidCredential",
    "MCPEndpoint",
    "MCPSessionMiddleware",
    "ManualClock",
    "SessionConfig",
    "SessionCrawler",
    "SessionRegistry",
    "SessionState",
    "StaticConfigAuthenticator",
    "URLPolicy",
    "ensure_dev_identity",
    "load_credential",
    "new_session_id",
    "session_from_request",
    "session_from_scope",
    "system_clock",
    "tame_anp_logging",
]
