"""From a request's credential to the :class:`~mcp2anp_middleware.sessions.state.SessionConfig`
its session signs with: the contract (:mod:`.base`) and its implementations
(:mod:`.authenticators`)."""

from mcp2anp_middleware.authentication.authenticators import (
    AuthenticationUnavailable,
    CachingAuthenticator,
    NoAuthAuthenticator,
    RemoteVerifierAuthenticator,
    StaticKeyAuthenticator,
    SyncAuthenticator,
    require_credentials,
)
from mcp2anp_middleware.authentication.base import (
    AuthenticationError,
    Authenticator,
    Credentials,
    StaticConfigAuthenticator,
    credentials_from_headers,
)

__all__ = [
    "AuthenticationError",
    "AuthenticationUnavailable",
    "Authenticator",
    "CachingAuthenticator",
    "Credentials",
    "NoAuthAuthenticator",
    "RemoteVerifierAuthenticator",
    "StaticConfigAuthenticator",
    "StaticKeyAuthenticator",
    "SyncAuthenticator",
    "credentials_from_headers",
    "require_credentials",
]
