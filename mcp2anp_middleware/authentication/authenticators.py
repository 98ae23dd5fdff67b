"""Ready-made authenticators: static keys, a remote verifier, caching, sync adapters, dev mode.

Each is an :data:`~mcp2anp_middleware.authentication.Authenticator`: an async callable taking
:class:`Credentials` and returning the :class:`SessionConfig` to sign with, or raising
:class:`AuthenticationError`. The middleware calls it on every request, so they are built to be
cheap on the hot path (compose with :class:`CachingAuthenticator` when verification is remote).

Secrets are never logged, put in exception messages or kept as dictionary keys; logs carry at most
:func:`credential_fingerprint`, a 12-hex-digit sha256 prefix that identifies a key to its owner
without revealing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import httpx
import structlog
from asgiref.sync import sync_to_async

from mcp2anp_middleware.authentication.base import AuthenticationError, Authenticator, Credentials
from mcp2anp_middleware.sessions.clock import Clock, system_clock
from mcp2anp_middleware.sessions.state import SessionConfig

__all__ = [
    "MISSING_CREDENTIAL",
    "AuthenticationUnavailable",
    "CachingAuthenticator",
    "NoAuthAuthenticator",
    "RemoteVerifierAuthenticator",
    "StaticKeyAuthenticator",
    "SyncAuthenticator",
    "credential_fingerprint",
    "require_credentials",
]

logger = structlog.get_logger("mcp2anp_middleware.auth")

MISSING_CREDENTIAL: Final = "missing credential: send X-API-Key or Authorization: Bearer"
CREDENTIAL_REFUSED: Final = "credential refused"

CredentialKind = Literal["api_key", "bearer_token"]


class AuthenticationUnavailable(AuthenticationError):
    """The credential could not be checked (verifier down or misbehaving), not that it is bad.

    Subclasses :class:`AuthenticationError` so the request is still refused, but callers can tell
    "try again later" (HTTP 503) from "wrong key", and caches must not remember it.
    """

    status = 503


def credential_fingerprint(secret: str) -> str:
    """A short sha256 prefix of ``secret``: safe to log, enough to tell keys apart."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _pick_credential(credentials: Credentials) -> tuple[CredentialKind, str] | None:
    """The one credential to check; ``X-API-Key`` wins when a request sends both."""
    if credentials.api_key:
        return "api_key", credentials.api_key
    if credentials.bearer_token:
        return "bearer_token", credentials.bearer_token
    return None


def _check_key(key: str) -> None:
    """Refuse a plaintext key that could never match what a request carries."""
    if not key:
        raise ValueError("API keys must be non-empty strings")
    if max(key) > "\xff" or not key.isprintable() or key != key.strip():
        # A header carries bytes, read as Latin-1 and stripped: such a key never arrives as
        # written, so it could never match.
        raise ValueError(
            "API keys must be printable Latin-1 text without surrounding spaces (the key with "
            f"fingerprint {credential_fingerprint(key)} is not)"
        )


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


# ---------------------------------------------------------------------------------------------
# Static keys
# ---------------------------------------------------------------------------------------------

_ENTRY_FIELDS: Final = frozenset(
    {"api_key", "api_key_sha256", "principal", "did_document_path", "private_key_path"}
)


class StaticKeyAuthenticator:
    """Maps API keys to :class:`SessionConfig`; for a fixed, small set of clients.

    The key may arrive as ``X-API-Key`` or ``Authorization: Bearer`` (``X-API-Key`` wins if both
    are sent). Only sha256 digests of keys are kept, and a lookup compares the candidate's digest
    against every entry with :func:`hmac.compare_digest` without stopping early, so neither the
    comparison nor the position of a match leaks through timing.
    """

    def __init__(
        self,
        entries: Mapping[str, SessionConfig],
        *,
        hashed_entries: Mapping[str, SessionConfig] | None = None,
    ) -> None:
        """``entries`` maps plaintext keys; ``hashed_entries`` maps hex sha256 digests of keys."""
        table: dict[bytes, SessionConfig] = {}
        for key, config in entries.items():
            _check_key(key)
            table[_digest(key)] = config
        for hex_digest, config in (hashed_entries or {}).items():
            table[_parse_sha256(hex_digest)] = config
        self._entries: tuple[tuple[bytes, SessionConfig], ...] = tuple(table.items())

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def configs(self) -> list[SessionConfig]:
        """The credentials the keys map to (never the keys): e.g. to publish their DIDs."""
        return [config for _, config in self._entries]

    async def __call__(self, credentials: Credentials) -> SessionConfig:
        picked = _pick_credential(credentials)
        if picked is None:
            raise AuthenticationError(MISSING_CREDENTIAL)
        kind, secret = picked
        candidate = _digest(secret)
        found: SessionConfig | None = None
        for digest, config in self._entries:
            if hmac.compare_digest(digest, candidate) and found is None:
                found = config
        if found is None:
            logger.info(
                "auth.refused", kind=kind, fingerprint=credential_fingerprint(secret), by="static"
            )
            raise AuthenticationError(CREDENTIAL_REFUSED)
        return found

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> StaticKeyAuthenticator:
        """Load keys from a JSON file (see the README for the format).

        ``{"keys": [{"api_key" | "api_key_sha256": ..., "principal"?: ..., "did_document_path"?:
        ..., "private_key_path"?: ...}]}``. Prefer ``api_key_sha256`` so the file holds no
        secrets. Relative paths are resolved against the file's directory so the file can move
        with its keys. ``principal`` defaults to ``"key:" + sha256(key)[:12]``. Unknown fields are
        rejected so a typo cannot silently drop a setting. Raises :class:`ValueError` naming the
        entry and the problem; error messages never quote key values.
        """
        file = Path(path)
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            # exc.msg/lineno only: the document itself may contain keys.
            raise ValueError(
                f"{file}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        if not isinstance(document, dict):
            raise ValueError(f"{file}: top level must be a JSON object with a 'keys' list")
        unknown = sorted(set(document) - {"keys"})
        if unknown:
            raise ValueError(f"{file}: unknown top-level field(s) {', '.join(unknown)}")
        raw_entries = document.get("keys")
        if not isinstance(raw_entries, list):
            raise ValueError(f"{file}: 'keys' must be a list of objects")

        table: dict[str, SessionConfig] = {}
        seen: dict[str, int] = {}
        for index, raw in enumerate(raw_entries):
            where = f"{file}: keys[{index}]"
            hex_digest, config = _parse_entry(raw, where, file.parent)
            if hex_digest in seen:
                raise ValueError(f"{where}: duplicate API key (same as keys[{seen[hex_digest]}])")
            seen[hex_digest] = index
            table[hex_digest] = config
        logger.info("auth.static_keys_loaded", path=str(file), count=len(table))
        return cls({}, hashed_entries=table)


def _parse_sha256(value: str) -> bytes:
    if len(value) != 64:
        raise ValueError("a sha256 digest is 64 hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError("a sha256 digest is 64 hex digits") from None


def _parse_entry(raw: object, where: str, base: Path) -> tuple[str, SessionConfig]:
    """One ``keys[]`` entry -> (lower-case hex sha256 of the key, config)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a JSON object")
    unknown = sorted(set(raw) - _ENTRY_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")

    def text(name: str) -> str | None:
        value = raw.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: '{name}' must be a non-empty string")
        return value

    api_key, hashed = text("api_key"), text("api_key_sha256")
    if (api_key is None) == (hashed is None):
        raise ValueError(f"{where}: give exactly one of 'api_key' or 'api_key_sha256'")
    if api_key is not None:
        try:
            _check_key(api_key)
        except ValueError as exc:
            raise ValueError(f"{where}: 'api_key': {exc}") from None
        hex_digest = hashlib.sha256(api_key.encode("utf-8")).hexdigest()
    else:
        assert hashed is not None
        try:
            hex_digest = _parse_sha256(hashed).hex()
        except ValueError as exc:
            raise ValueError(f"{where}: 'api_key_sha256': {exc}") from None

    def path(name: str) -> Path | None:
        value = text(name)
        return None if value is None else base / Path(value).expanduser()

    config = SessionConfig(
        principal=text("principal") or f"key:{hex_digest[:12]}",
        did_document_path=path("did_document_path"),
        private_key_path=path("private_key_path"),
    )
    return hex_digest, config


# ---------------------------------------------------------------------------------------------
# Remote verifier
# ---------------------------------------------------------------------------------------------


class RemoteVerifierAuthenticator:
    """Asks an HTTP service whether a credential is valid and which config it maps to.

    POSTs ``{"api_key": ...}`` or ``{"bearer_token": ...}`` to ``url``. A 200 with a JSON object
    (``principal`` required; ``did_document_path``, ``private_key_path``, ``did_document`` (JSON
    text or object), ``private_key_pem`` optional) is a success; 401/403 is a refusal. 5xx, 429
    and transport errors are retried ``retries`` times with exponential backoff (``backoff``,
    doubled each time; an integer ``Retry-After`` is honoured up to ``max_retry_after``) and then
    raise :class:`AuthenticationUnavailable`, as do other statuses and malformed bodies (not
    retried: they will not fix themselves). Wrap in :class:`CachingAuthenticator` so the verifier
    is not called on every request.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 0.2,
        max_retry_after: float = 10.0,
        http_client: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if backoff < 0 or max_retry_after < 0:
            raise ValueError("backoff and max_retry_after must be >= 0")
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_retry_after = max_retry_after
        self._sleep = sleep
        self._owns_client = http_client is None
        self._client = http_client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        # For logs: where we asked, without any query string that might carry a secret.
        self._target = f"{httpx.URL(url).host}{httpx.URL(url).path}"

    async def aclose(self) -> None:
        """Close the HTTP client if this authenticator created it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def __call__(self, credentials: Credentials) -> SessionConfig:
        picked = _pick_credential(credentials)
        if picked is None:
            raise AuthenticationError(MISSING_CREDENTIAL)
        kind, secret = picked
        fingerprint = credential_fingerprint(secret)
        attempts = self.retries + 1
        problem = "no attempt made"
        for attempt in range(attempts):
            retry_after: float | None = None
            try:
                response = await self._client.post(
                    self.url, json={kind: secret}, timeout=self.timeout
                )
            except httpx.HTTPError as exc:  # transport, protocol and decoding failures
                problem = type(exc).__name__
            else:
                status = response.status_code
                if status == 200:
                    return self._config_from(response, fingerprint)
                if status in (401, 403):
                    logger.info("auth.refused", kind=kind, fingerprint=fingerprint, by="remote")
                    raise AuthenticationError(CREDENTIAL_REFUSED)
                if status != 429 and status < 500:
                    logger.warning(
                        "auth.verifier_unexpected_status", verifier=self._target, status=status
                    )
                    raise AuthenticationUnavailable(
                        f"credential verifier answered unexpected HTTP {status}"
                    )
                problem = f"HTTP {status}"
                retry_after = _retry_after(response)
            if attempt + 1 < attempts:
                delay = self.backoff * (2**attempt)
                if retry_after is not None:
                    delay = min(retry_after, self.max_retry_after)
                logger.info(
                    "auth.verifier_retry",
                    verifier=self._target,
                    problem=problem,
                    attempt=attempt + 1,
                    delay=delay,
                )
                await self._sleep(delay)
        logger.warning(
            "auth.verifier_unavailable", verifier=self._target, problem=problem, attempts=attempts
        )
        raise AuthenticationUnavailable(
            f"credential verifier unavailable ({problem} after {attempts} attempts)"
        )

    def _config_from(self, response: httpx.Response, fingerprint: str) -> SessionConfig:
        try:
            try:
                body = response.json()
            except ValueError:
                raise ValueError("body is not JSON") from None
            return _parse_verifier_body(body)
        except ValueError as exc:
            # The detail names fields, never values: the body may hold key material.
            logger.warning(
                "auth.verifier_malformed",
                verifier=self._target,
                detail=str(exc),
                fingerprint=fingerprint,
            )
            raise AuthenticationUnavailable(
                f"credential verifier returned a malformed response: {exc}"
            ) from None


def _retry_after(response: httpx.Response) -> float | None:
    """An integer-seconds ``Retry-After``; HTTP-date and junk values are ignored."""
    value = response.headers.get("retry-after", "").strip()
    if value.isascii() and value.isdigit() and len(value) <= 10:  # ("²" is a digit to isdigit)
        return float(int(value))
    return None


def _parse_verifier_body(body: Any) -> SessionConfig:
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    principal = body.get("principal")
    if not isinstance(principal, str) or not principal:
        raise ValueError("'principal' must be a non-empty string")

    def optional_text(name: str) -> str | None:
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"'{name}' must be a non-empty string")
        return value

    did_document = body.get("did_document")
    if isinstance(did_document, str):
        try:
            parsed = json.loads(did_document)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("'did_document' text must be a JSON object")
    elif isinstance(did_document, dict):
        # Stored as text: SessionConfig must stay hashable.
        did_document = json.dumps(did_document, separators=(",", ":"), sort_keys=True)
    elif did_document is not None:
        raise ValueError("'did_document' must be a JSON object or its JSON text")
    doc_path = optional_text("did_document_path")
    key_path = optional_text("private_key_path")
    return SessionConfig(
        principal=principal,
        did_document_path=None if doc_path is None else Path(doc_path),
        private_key_path=None if key_path is None else Path(key_path),
        did_document=did_document,
        private_key_pem=optional_text("private_key_pem"),
    )


# ---------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one inner call produced: a config, a cacheable refusal, or an error to pass on."""

    config: SessionConfig | None = None
    refusal: str | None = None
    status: int = AuthenticationError.status
    error: BaseException | None = None

    def resolve(self) -> SessionConfig:
        if self.config is not None:
            return self.config
        if self.refusal is not None:
            # A fresh exception each time: re-raising one instance grows its traceback forever.
            refused = AuthenticationError(self.refusal)
            refused.status = self.status  # (an inner refusal's own status: 403, say)
            raise refused
        assert self.error is not None
        raise self.error


class CachingAuthenticator:
    """Remembers an inner authenticator's answers so it is not consulted on every request.

    Successes are kept for ``ttl`` seconds and refusals for ``negative_ttl`` (so a freshly issued
    key works quickly and a stream of bad keys does not hammer the verifier).
    :class:`AuthenticationUnavailable` and other errors are never cached. **A revoked credential
    keeps working for at most ``ttl`` seconds** after it was last verified; lower ``ttl`` or call
    :meth:`invalidate` if that is too long (it also keeps a check under way for that credential
    from caching what it finds). At most ``max_entries`` answers are kept; the least recently used
    is evicted first. Concurrent misses for the same credential share one inner call
    (single-flight), which runs in its own task so a caller hanging up does not cancel it for the
    others.

    Cache keys are sha256 digests of the credential kind and value; raw secrets are never stored.
    Requests without any credential bypass the cache.
    """

    def __init__(
        self,
        inner: Authenticator,
        *,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        max_entries: int = 10_000,
        clock: Clock = system_clock,
    ) -> None:
        if ttl < 0 or negative_ttl < 0:
            raise ValueError("ttl and negative_ttl must be >= 0")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.inner = inner
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, _Outcome]] = OrderedDict()
        self._pending: dict[bytes, asyncio.Task[_Outcome]] = {}
        self._forgotten: set[asyncio.Task[_Outcome]] = set()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(credentials: Credentials) -> bytes:
        hasher = hashlib.sha256()
        for kind, value in (
            ("api_key", credentials.api_key),
            ("bearer_token", credentials.bearer_token),
        ):
            if value is not None:
                encoded = value.encode("utf-8")
                hasher.update(f"{kind}:{len(encoded)}:".encode())
                hasher.update(encoded)
        return hasher.digest()

    def invalidate(self, credentials: Credentials) -> None:
        """Forget the cached answer for ``credentials`` (e.g. right after revoking it): the next
        request asks the inner authenticator, not a check already under way."""
        key = self._key(credentials)
        self._entries.pop(key, None)
        self._forget_check(self._pending.pop(key, None))

    def clear(self) -> None:
        """Forget every cached answer (and, as :meth:`invalidate`, every check under way)."""
        self._entries.clear()
        for task in self._pending.values():
            self._forget_check(task)
        self._pending.clear()

    async def __call__(self, credentials: Credentials) -> SessionConfig:
        if not credentials.present:
            return await self.inner(credentials)
        key = self._key(credentials)
        cached = self._entries.get(key)
        if cached is not None:
            expires_at, outcome = cached
            if self._clock() < expires_at:
                self._entries.move_to_end(key)  # (the least recently used goes first)
                return outcome.resolve()
            del self._entries[key]
        task = self._pending.get(key)
        if task is None:
            task = asyncio.create_task(self._verify(key, credentials))
            self._pending[key] = task
            task.add_done_callback(lambda done: self._drop_pending(key, done))
        return (await asyncio.shield(task)).resolve()

    def _forget_check(self, task: asyncio.Task[_Outcome] | None) -> None:
        """A check no longer pending (its answer will not be cached) runs on for its callers:
        held here until it ends, since its callers may all have gone."""
        if task is not None and not task.done():
            self._forgotten.add(task)
            task.add_done_callback(self._forgotten.discard)

    def _drop_pending(self, key: bytes, task: asyncio.Task[_Outcome]) -> None:
        if self._pending.get(key) is task:  # (not a later check, begun after an invalidation)
            del self._pending[key]

    async def _verify(self, key: bytes, credentials: Credentials) -> _Outcome:
        try:
            config = await self.inner(credentials)
        except AuthenticationUnavailable as exc:
            return _Outcome(error=exc)
        except AuthenticationError as exc:
            outcome = _Outcome(refusal=str(exc) or CREDENTIAL_REFUSED, status=exc.status)
            self._store(key, outcome, self.negative_ttl)
            return outcome
        except Exception as exc:
            return _Outcome(error=exc)
        outcome = _Outcome(config=config)
        self._store(key, outcome, self.ttl)
        return outcome

    def _store(self, key: bytes, outcome: _Outcome, ttl: float) -> None:
        """Remember an answer of the check running now, unless it was forgotten since it began
        (:meth:`invalidate`, :meth:`clear`: it may predate a revocation)."""
        if ttl <= 0 or self._pending.get(key) is not asyncio.current_task():
            return
        self._entries[key] = (self._clock() + ttl, outcome)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------


class SyncAuthenticator:
    """Adapts a blocking ``(Credentials) -> SessionConfig`` function (e.g. a database lookup).

    The function runs in a worker thread so it never stalls the event loop; it may raise
    :class:`AuthenticationError`, which propagates unchanged.
    """

    def __init__(self, fn: Callable[[Credentials], SessionConfig]) -> None:
        self.fn = fn
        self._async_fn = sync_to_async(fn, thread_sensitive=False)

    async def __call__(self, credentials: Credentials) -> SessionConfig:
        return await self._async_fn(credentials)


class NoAuthAuthenticator:
    """Development mode: ignores credentials and gives everyone the same config.

    Never use in production: anyone who can reach the endpoint acts as ``config.principal``.
    """

    def __init__(self, config: SessionConfig | None = None) -> None:
        self.config = config if config is not None else SessionConfig(principal="dev")
        logger.warning("auth.disabled", principal=self.config.principal)

    async def __call__(self, credentials: Credentials) -> SessionConfig:
        return self.config


def require_credentials(inner: Authenticator) -> Authenticator:
    """Refuse requests without ``X-API-Key`` or a bearer token before ``inner`` sees them.

    Useful in front of authenticators (like :class:`SyncAuthenticator` callbacks) that would
    otherwise have to handle the missing case themselves.
    """

    async def authenticate(credentials: Credentials) -> SessionConfig:
        if not credentials.present:
            raise AuthenticationError(MISSING_CREDENTIAL)
        return await inner(credentials)

    return authenticate
