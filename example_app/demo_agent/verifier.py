"""anp's ``DidWbaVerifier`` with per-instance DID resolution (offline, or HTTP on loopback).

Why this module exists
----------------------
``anp.authentication.DidWbaVerifier`` (anp 1.0.7) has no resolver hook. Its two signature paths,
``_handle_http_signature_auth`` (RFC 9421) and ``_handle_legacy_did_auth`` (``Authorization: DIDWba
...``), call the names ``resolve_did_wba_document`` / ``resolve_did_document`` that
``anp/authentication/did_wba_verifier.py`` imported into its module globals; both fetch
``https://<host>/<path>/did.json`` with aiohttp.

How resolution is redirected (no global monkeypatch)
----------------------------------------------------
For each :class:`LocalDidWbaVerifier` we build a private copy of that module's globals in which the
two resolver names point at this instance's resolver, and we bind clones of the two handler
functions (same code objects, new globals dict) onto the wrapped ``DidWbaVerifier`` *instance*.
``DidWbaVerifier.verify_request`` finds the instance attributes first, so the whole anp
verification logic (signature base, Content-Digest, time window, nonce replay cache, DID
binding, ``authentication`` relationship, JWT issuing) runs unchanged, while the module, the
class and every other verifier in the process stay untouched. Two agents with different
resolvers therefore coexist in one process and one event loop.

Rejected alternatives: patching ``did_wba_verifier.resolve_did_wba_document`` globally (breaks
other verifiers unless dispatched through a ContextVar; a process-wide side effect), and
re-implementing the two handlers in a subclass (duplicates ~200 lines of security code).

The clone relies on anp internals; :func:`_check_anp_layout` fails loudly at construction if a
future anp version resolves DIDs from somewhere we do not redirect, instead of silently going to
the network.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anp.authentication.did_wba_verifier as _anp_verifier_module
from anp.authentication import DidWbaVerifier, DidWbaVerifierConfig, DidWbaVerifierError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .resolvers import DidDocument, DidResolver

__all__ = [
    "AuthenticationFailed",
    "JwtKeys",
    "LocalDidWbaVerifier",
    "VerifiedCaller",
]

logger = logging.getLogger(__name__)

_RESOLVER_NAMES: Final = frozenset({"resolve_did_wba_document", "resolve_did_document"})
_HOOKED_METHODS: Final = ("_handle_http_signature_auth", "_handle_legacy_did_auth")
_UNSAFE_HEADER_CHARS: Final = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class VerifiedCaller:
    """A caller whose DID WBA signature or bearer token was accepted."""

    did: str
    auth_scheme: str  # "http_signatures", "legacy_didwba" or "bearer"
    # Headers to add to the response: Authentication-Info / Authorization with a fresh bearer
    # token after a signature check; empty after a bearer check.
    response_headers: dict[str, str] = field(default_factory=dict)


class AuthenticationFailed(Exception):
    """Authentication was refused; ``headers`` carries a ``WWW-Authenticate`` challenge."""

    def __init__(self, message: str, *, status_code: int, headers: Mapping[str, str]) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.headers = dict(headers)


@dataclass(frozen=True)
class JwtKeys:
    """Key pair anp uses to sign and check the bearer tokens it hands out."""

    private_key_pem: str
    public_key_pem: str
    algorithm: str

    @classmethod
    def generate(cls) -> JwtKeys:
        """Fresh EC P-256 pair (ES256): fast to generate, valid for the life of the process."""
        private_key = ec.generate_private_key(ec.SECP256R1())
        return cls._from_private_key(private_key)

    @classmethod
    def from_pems(cls, private_key_pem: str | None, public_key_pem: str | None) -> JwtKeys:
        """Load a pair; the public half is derived when omitted, checked when given."""
        if private_key_pem is None:
            if public_key_pem is not None:
                raise ValueError("jwt_public_key_pem needs jwt_private_key_pem as well")
            return cls.generate()
        private_key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
        keys = cls._from_private_key(private_key)
        if public_key_pem is not None:
            given = serialization.load_pem_public_key(public_key_pem.encode())
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            der = serialization.Encoding.DER
            if given.public_bytes(der, spki) != private_key.public_key().public_bytes(der, spki):
                raise ValueError("jwt_public_key_pem does not match jwt_private_key_pem")
        return keys

    @classmethod
    def _from_private_key(cls, private_key: Any) -> JwtKeys:
        if isinstance(private_key, rsa.RSAPrivateKey):
            algorithm = "RS256"
        elif isinstance(private_key, ec.EllipticCurvePrivateKey):
            by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
            if private_key.curve.name not in by_curve:
                raise ValueError(f"unsupported EC curve for JWT: {private_key.curve.name}")
            algorithm = by_curve[private_key.curve.name]
        elif isinstance(private_key, ed25519.Ed25519PrivateKey):
            algorithm = "EdDSA"
        else:
            raise ValueError(f"unsupported JWT key type: {type(private_key).__name__}")
        private_pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        public_pem = (
            private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        return cls(private_key_pem=private_pem, public_key_pem=public_pem, algorithm=algorithm)

    def __repr__(self) -> str:  # never print the private key
        return f"JwtKeys(algorithm={self.algorithm!r})"


def _iter_code(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _iter_code(const)


def _uses_resolver(function: types.FunctionType) -> bool:
    return any(_RESOLVER_NAMES & set(code.co_names) for code in _iter_code(function.__code__))


def _check_anp_layout() -> None:
    """Fail loudly if anp no longer resolves DIDs where we redirect resolution."""
    for name in _HOOKED_METHODS:
        function = getattr(DidWbaVerifier, name, None)
        if not isinstance(function, types.FunctionType) or not _uses_resolver(function):
            raise RuntimeError(f"anp.DidWbaVerifier.{name} changed; cannot hook DID resolution")
    for klass in DidWbaVerifier.__mro__:
        for name, member in vars(klass).items():
            target = member.__func__ if isinstance(member, staticmethod | classmethod) else member
            if (
                isinstance(target, types.FunctionType)
                and name not in _HOOKED_METHODS
                and _uses_resolver(target)
            ):
                raise RuntimeError(
                    f"anp.DidWbaVerifier.{name} resolves DIDs itself; offline resolution would "
                    "be bypassed"
                )


def _clone_with_globals(
    function: types.FunctionType, namespace: dict[str, Any]
) -> types.FunctionType:
    clone = types.FunctionType(
        function.__code__,
        namespace,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    clone.__kwdefaults__ = copy.copy(function.__kwdefaults__)
    clone.__qualname__ = function.__qualname__
    clone.__doc__ = function.__doc__
    clone.__module__ = function.__module__
    clone.__dict__.update(function.__dict__)
    return clone


def _safe_header_value(value: str) -> str:
    return _UNSAFE_HEADER_CHARS.sub(" ", value)[:512]


class LocalDidWbaVerifier:
    """Verify DID WBA requests with anp's verifier, resolving DIDs through ``resolver``."""

    def __init__(
        self,
        resolver: DidResolver,
        *,
        jwt_keys: JwtKeys | None = None,
        config: DidWbaVerifierConfig | None = None,
    ) -> None:
        _check_anp_layout()
        self._resolver = resolver
        self._jwt_keys = jwt_keys or JwtKeys.generate()
        config = dataclasses.replace(
            config if config is not None else DidWbaVerifierConfig(),
            jwt_private_key=self._jwt_keys.private_key_pem,
            jwt_public_key=self._jwt_keys.public_key_pem,
            jwt_algorithm=self._jwt_keys.algorithm,
        )
        self._verifier: Any = DidWbaVerifier(config)

        namespace = dict(vars(_anp_verifier_module))
        namespace["resolve_did_wba_document"] = self._resolve_for_anp
        namespace["resolve_did_document"] = self._resolve_for_anp
        for name in _HOOKED_METHODS:
            clone = _clone_with_globals(getattr(DidWbaVerifier, name), namespace)
            setattr(self._verifier, name, types.MethodType(clone, self._verifier))

    @property
    def resolver(self) -> DidResolver:
        return self._resolver

    @property
    def jwt_algorithm(self) -> str:
        return self._jwt_keys.algorithm

    @property
    def anp_verifier(self) -> Any:
        """The wrapped ``anp.authentication.DidWbaVerifier`` (already hooked)."""
        return self._verifier

    async def resolve(self, did: str) -> DidDocument | None:
        """Resolve ``did`` through the local resolver; ``None`` when unknown or inconsistent."""
        try:
            document = await self._resolver(did)
        except Exception:
            logger.warning("local DID resolver failed for %s", did, exc_info=True)
            return None
        if not isinstance(document, dict):
            return None
        if document.get("id") != did:
            logger.warning("local DID resolver returned a document with another id for %s", did)
            return None
        return document

    async def _resolve_for_anp(self, did: str, *args: Any, **kwargs: Any) -> DidDocument | None:
        # Signature-compatible stand-in for anp's resolve_did_wba_document(did, verify_proof=...)
        # and resolve_did_document(did, *, verify_proof=..., ...). anp checks the binding itself.
        return await self.resolve(did)

    async def verify_request(
        self,
        *,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> VerifiedCaller:
        """Check a request's DID WBA signature or bearer token.

        ``url`` must be the exact URL the client signed (RFC 9421 ``@target-uri``), ``body`` the
        exact bytes (checked against ``Content-Digest``). Raises :class:`AuthenticationFailed`.
        """
        try:
            result = await self._verifier.verify_request(method, url, dict(headers), body)
        except DidWbaVerifierError as exc:
            challenge = {k: _safe_header_value(v) for k, v in exc.headers.items()}
            raise AuthenticationFailed(
                str(exc), status_code=exc.status_code, headers=challenge
            ) from None
        except Exception as exc:  # anp bug or malformed input: still an auth failure
            logger.warning("DID WBA verification raised %s", type(exc).__name__)
            raise AuthenticationFailed(
                "Authentication error", status_code=401, headers={}
            ) from None
        return VerifiedCaller(
            did=str(result["did"]),
            auth_scheme=str(result.get("auth_scheme", "")),
            response_headers=dict(result.get("response_headers") or {}),
        )
