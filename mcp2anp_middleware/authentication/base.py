"""How a request's credential becomes a :class:`SessionConfig`.

The middleware extracts the credential (``X-API-Key`` or ``Authorization: Bearer``) and hands it to
an async authenticator, which returns the :class:`SessionConfig` to sign ANP requests with or
raises :class:`AuthenticationError`. It runs on every request, before any session is looked up or
created, so sessions are never a substitute for authentication.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mcp2anp_middleware.sessions.state import SessionConfig


class AuthenticationError(Exception):
    """The credential was missing, unknown or revoked; answered with HTTP ``status`` (401)."""

    status: int = 401


@dataclass(frozen=True, slots=True)
class Credentials:
    """The credential a request carried. Either field may be None; never logged whole."""

    api_key: str | None = field(default=None, repr=False)
    bearer_token: str | None = field(default=None, repr=False)

    @property
    def present(self) -> bool:
        return self.api_key is not None or self.bearer_token is not None


Authenticator = Callable[[Credentials], Awaitable[SessionConfig]]


class StaticConfigAuthenticator:
    """Gives every request the same :class:`SessionConfig`: development and single-user setups."""

    def __init__(self, config: SessionConfig | None = None) -> None:
        self.config = config if config is not None else SessionConfig()

    async def __call__(self, credentials: Credentials) -> SessionConfig:
        return self.config


NO_CREDENTIALS = Credentials()
"""What a request without ``X-API-Key`` and ``Authorization`` carries."""


def credentials_from_headers(headers: list[tuple[bytes, bytes]]) -> Credentials:
    """Pull ``X-API-Key`` and a bearer token out of raw ASGI headers."""
    api_key: str | None = None
    bearer: str | None = None
    for name, value in headers:
        if name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
        elif name == b"authorization":
            bearer = _bearer(value)
    return Credentials(api_key=api_key or None, bearer_token=bearer)


def credentials_from_header(name: bytes, value: bytes) -> Credentials:
    """The credential of a request whose only credential header is ``name: value``
    (``x-api-key`` or ``authorization``, lower case as ASGI gives them)."""
    if name == b"x-api-key":
        return Credentials(api_key=value.decode("latin-1").strip() or None)
    return Credentials(bearer_token=_bearer(value))


def _bearer(value: bytes) -> str | None:
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None
