"""DID WBA credentials: loaded and checked once, before any ANP request is signed with them.

anp builds crawlers from paths that may not exist and then sends UNAUTHENTICATED requests with only
a log line. Here a credential is parsed when its session is created: the DID document must be JSON
with an ``id`` and an ``authentication`` method, the private key must load, and a test signature
made with the key must verify against that method (using anp's own verification code). The parsed
key is cached per credential, so it is not re-read and re-parsed on every signature.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anp.authentication.verification_methods import create_verification_method
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from mcp2anp_middleware.authentication.base import AuthenticationError
from mcp2anp_middleware.sessions.state import SessionConfig

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class CredentialError(AuthenticationError):
    """The session's DID document or private key is unusable (answered 401, never ignored)."""


@dataclass(frozen=True, slots=True, repr=False)
class DidCredential:
    """A DID document with the private key of its first authentication method."""

    did: str
    document: dict[str, Any]
    private_key: SigningKey
    key_id: str

    def sign(self, content: bytes) -> bytes:
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            return self.private_key.sign(content, ec.ECDSA(hashes.SHA256()))
        return self.private_key.sign(content)

    def __repr__(self) -> str:
        return f"DidCredential(did={self.did!r}, key_id={self.key_id!r})"


def _read_text(path: Path | None, inline: str | None, what: str) -> str:
    if inline is not None:
        return inline
    if path is None:
        raise CredentialError(f"no {what} configured for this credential")
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CredentialError(f"{what} cannot be read ({reason})") from None
    except UnicodeDecodeError:  # a DER key, say: PEM and JSON are text
        raise CredentialError(f"{what} is not UTF-8 text") from None


def _authentication_method(document: dict[str, Any]) -> dict[str, Any]:
    auth = document.get("authentication")
    if not isinstance(auth, list) or not auth:
        raise CredentialError("DID document has no authentication method")
    first = auth[0]
    if isinstance(first, dict):
        return first
    for method in document.get("verificationMethod") or []:
        if isinstance(method, dict) and method.get("id") == first:
            return method
    raise CredentialError("DID document's authentication method is not in verificationMethod")


def load_credential(config: SessionConfig) -> DidCredential:
    """Parse and check ``config``'s DID document and key; raise :class:`CredentialError`."""
    text = _read_text(config.did_document_path, config.did_document, "DID document")
    try:
        document = json.loads(text)
    except ValueError:
        raise CredentialError("DID document is not valid JSON") from None
    if not isinstance(document, dict) or not str(document.get("id", "")).startswith("did:"):
        raise CredentialError("DID document has no DID 'id'")
    method = _authentication_method(document)
    pem = _read_text(config.private_key_path, config.private_key_pem, "private key")
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise CredentialError("private key is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise CredentialError(f"unsupported private key type {type(key).__name__}")
    credential = DidCredential(
        did=document["id"], document=document, private_key=key, key_id=str(method.get("id", ""))
    )
    try:
        verifier = create_verification_method(method)
        probe = b"mcp2anp-middleware credential check"
        ok = verifier.verify_signature(probe, verifier.encode_signature(credential.sign(probe)))
    except Exception as exc:  # anp raises plain ValueError/TypeError for odd documents
        raise CredentialError(f"DID authentication method is unusable ({exc})") from None
    if not ok:
        raise CredentialError("private key does not match the DID document's authentication key")
    return credential


class CredentialCache:
    """Loads each distinct :class:`SessionConfig` once per process (thread-safe, bounded)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: dict[SessionConfig, DidCredential] = {}
        self._lock = threading.Lock()

    def get(self, config: SessionConfig) -> DidCredential:
        credential = self._entries.get(config)
        if credential is not None:
            return credential
        credential = load_credential(config)
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[config] = credential
        return credential

    def peek(self, config: SessionConfig) -> DidCredential | None:
        """The credential if already loaded (no I/O)."""
        return self._entries.get(config)
