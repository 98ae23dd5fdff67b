"""Serve the DID documents of the identities this server signs with, where did:wba looks for them.

An agent that receives a DID WBA signature resolves the caller's DID over HTTP before it checks
the signature. Without a document at the address the DID names, every signed call fails with 401
("Failed to resolve DID document"), so the identities this package holds (the development DID,
and the DIDs of statically configured credentials) are published from the host app itself.

did:wba names its document's URL (the method spec, and anp's ``resolve_did_wba_document``):

* ``did:wba:example.com`` -> ``https://example.com/.well-known/did.json``
* ``did:wba:example.com%3A8443:users:alice`` -> ``https://example.com:8443/users/alice/did.json``

The domain part is percent-decoded (``%3A`` is the port's colon); the path segments are joined
with ``/`` as they are. :func:`did_wba_location` does that mapping; :class:`DidDocumentApp` is the
small pure-ASGI app that answers those paths. It holds parsed public documents only: it never
reads a private key, and it refuses a document that carries private key material, because a DID
document is world-readable by design.

Documents are served by path, whatever the request's ``Host``: resolution derives the path from
the DID, a reverse proxy may rewrite ``Host``, ``localhost`` and ``127.0.0.1`` name the same
loopback server, and the document is public anyway. Only when two held DIDs map to the same path
(same path, different hosts) does ``Host`` pick between them; a ``Host`` matching neither gets 404.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

import structlog
from starlette.types import Receive, Scope, Send

from mcp2anp_middleware.sessions.state import SessionConfig

logger = structlog.get_logger("mcp2anp_middleware.anp_tools.did_hosting")

WELL_KNOWN_PATH: Final = "/.well-known/did.json"
"""Where a did:wba without path segments (``did:wba:example.com``) keeps its document."""
_DID_WBA_PREFIX: Final = "did:wba:"
_FORBIDDEN_IN_DOMAIN: Final = frozenset("/?#@\\ \t\r\n")
_ALLOWED_METHODS: Final = ("GET", "HEAD")


@dataclass(frozen=True, slots=True)
class DidLocation:
    """Where a did:wba DID's document lives: ``authority`` (``host[:port]``, decoded) and the
    decoded request ``path`` an ASGI server puts in ``scope["path"]``."""

    did: str
    authority: str
    path: str
    raw_path: str
    """The path as resolvers put it on the wire: the DID's segments joined as they are."""

    def url(self, scheme: str = "https") -> str:
        """The document's URL; did:wba resolution is HTTPS, ``http`` is for loopback tests."""
        return f"{scheme}://{self.authority}{self.raw_path}"


def did_wba_location(did: str) -> DidLocation:
    """Map ``did`` to its document's location; ``ValueError`` if it is not a usable did:wba.

    Splits like anp's resolver (``did.split(":", 3)``), so a DID served here is looked up at the
    very path this returns. Refused: other DID methods, DID URLs (``#``, ``?``), an empty or
    odd domain, and path segments that are empty, ``.``/``..`` or decode to contain ``/``
    (clients would normalise or split them, and the document would be unreachable).
    """
    if not did.startswith(_DID_WBA_PREFIX):
        raise ValueError(f"not a did:wba DID: {did!r}")
    if "#" in did or "?" in did:
        raise ValueError(f"a DID URL, not a DID: {did!r}")
    parts = did.split(":", 3)
    domain = unquote(parts[2])
    if not domain or _FORBIDDEN_IN_DOMAIN.intersection(domain):
        raise ValueError(f"did:wba DID with an unusable domain: {did!r}")
    if len(parts) == 3:
        return DidLocation(did, domain, WELL_KNOWN_PATH, WELL_KNOWN_PATH)
    segments = parts[3].split(":")
    decoded = [unquote(segment) for segment in segments]
    for segment in decoded:
        if segment in ("", ".", "..") or "/" in segment:
            raise ValueError(f"did:wba DID with an unusable path segment: {did!r}")
    return DidLocation(
        did,
        domain,
        "/" + "/".join(decoded) + "/did.json",
        "/" + "/".join(segments) + "/did.json",
    )


def _is_private_jwk(value: Mapping[str, Any]) -> bool:
    # "d" is the private part of EC, OKP and RSA keys; "k" is a symmetric key's secret.
    return "kty" in value and ("d" in value or "k" in value)


def contains_private_key(value: Any) -> bool:
    """Whether ``value`` (a DID document, or any part of one) carries private key material.

    Looks for ``private*``/``secret*`` properties (``privateKeyMultibase``, ``privateKeyJwk``,
    ``privateKeyPem``...), private or symmetric JWKs, and PEM private key blocks anywhere.
    """
    if isinstance(value, Mapping):
        if _is_private_jwk(value):
            return True
        for key, item in value.items():
            lowered = str(key).lower()
            if lowered.startswith(("private", "secret")) or contains_private_key(item):
                return True
        return False
    if isinstance(value, list | tuple):
        return any(contains_private_key(item) for item in value)
    if isinstance(value, str):
        return "PRIVATE KEY-----" in value
    return False


def public_document(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` as a plain dict, checked to be a did:wba DID document with no private key."""
    did = document.get("id")
    if not isinstance(did, str):
        raise ValueError("DID document has no string 'id'")
    did_wba_location(did)
    if contains_private_key(document):
        raise ValueError(f"DID document of {did} carries private key material; not served")
    copied: dict[str, Any] = json.loads(json.dumps(document))
    return copied


def load_public_document(config: SessionConfig) -> dict[str, Any] | None:
    """The DID document ``config`` signs with (inline or from its file), public parts only.

    ``None`` when the config has no DID document (an anonymous config). Never touches the
    private key. Raises ``ValueError``/``OSError`` for a document that cannot be served.
    """
    if config.did_document is not None:
        text = config.did_document
    elif config.did_document_path is not None:
        text = Path(config.did_document_path).read_text(encoding="utf-8")
    else:
        return None
    document = json.loads(text)
    if not isinstance(document, dict):
        raise ValueError("DID document is not a JSON object")
    return public_document(document)


def _normal_authority(authority: str) -> str:
    return authority.strip().lower()


class DidDocumentApp:
    """Pure-ASGI app answering ``GET``/``HEAD`` of held DID documents at their did:wba paths.

    Routed to by exact path (``paths``), so it costs host requests nothing. A path it holds
    answers ``200 application/json``; other methods ``405``; a path it does not hold (or, for a
    path shared by several hosts' DIDs, a ``Host`` matching none of them) ``404``.
    """

    def __init__(self, documents: Iterable[Mapping[str, Any]] = ()) -> None:
        self._by_path: dict[str, dict[str, bytes]] = {}
        self._dids: dict[str, bytes] = {}
        for document in documents:
            self.add(document)

    def add(self, document: Mapping[str, Any]) -> DidLocation:
        """Hold ``document`` (checked by :func:`public_document`); returns where it is served.

        Adding the same document twice is harmless; a different document for a DID already
        held is a ``ValueError`` (two servers' worth of keys for one identity is a
        misconfiguration, and silently picking one would make signatures fail half the time).
        """
        public = public_document(document)
        location = did_wba_location(public["id"])
        body = json.dumps(public, ensure_ascii=False).encode("utf-8")
        held = self._dids.get(location.did)
        if held is not None and json.loads(held) != public:
            raise ValueError(f"another DID document is already served for {location.did}")
        self._dids[location.did] = body
        self._by_path.setdefault(location.path, {})[_normal_authority(location.authority)] = body
        return location

    @property
    def paths(self) -> frozenset[str]:
        """The request paths this app answers (to route it by exact path)."""
        return frozenset(self._by_path)

    @property
    def dids(self) -> frozenset[str]:
        return frozenset(self._dids)

    def _body_for(self, scope: Scope) -> bytes | None:
        by_authority = self._by_path.get(scope["path"])
        if not by_authority:
            return None
        if len(by_authority) == 1:
            return next(iter(by_authority.values()))
        for name, value in scope.get("headers", ()):
            if name == b"host":
                return by_authority.get(_normal_authority(value.decode("latin-1")))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # pragma: no cover - routed for http scopes only
            return
        method = scope["method"]
        if method not in _ALLOWED_METHODS:
            await _answer(send, 405, b"", [(b"allow", b"GET, HEAD")])
            return
        body = self._body_for(scope)
        if body is None:
            await _answer(send, 404, b"", [])
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-cache"),
            (b"access-control-allow-origin", b"*"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def served_documents(configs: Iterable[SessionConfig]) -> list[dict[str, Any]]:
    """The public DID documents of ``configs`` that can be served; the others are logged.

    A config whose document cannot be read or served is skipped rather than stopping startup:
    its sessions are still checked (and refused with a clear 401) when they are created.
    """
    documents: list[dict[str, Any]] = []
    seen: set[SessionConfig] = set()
    for config in configs:
        if config in seen:
            continue
        seen.add(config)
        try:
            document = load_public_document(config)
        except (OSError, ValueError) as exc:
            logger.warning("DID document not served", principal=config.principal, reason=str(exc))
            continue
        if document is not None:
            documents.append(document)
    return documents
