"""DID WBA request signing with a key parsed once per credential.

anp's ``DIDWbaAuthHeader`` re-reads and re-parses the PEM on every signature and keys its bearer
token cache by host name alone (two agents on one host, different ports, overwrite each other's
tokens). :class:`SessionSigner` keeps anp's header generation (RFC 9421 HTTP message signatures and
the agent-issued bearer tokens) but signs with the already-parsed key of a :class:`DidCredential`
and keys tokens by ``host:port``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from anp.authentication import DIDWbaAuthHeader

from mcp2anp_middleware.anp_tools.credentials import DidCredential


class SessionSigner(DIDWbaAuthHeader):  # type: ignore[misc]
    def __init__(self, credential: DidCredential) -> None:
        super().__init__(did_document_path="", private_key_path="")
        self.credential = credential
        self.did_document = credential.document

    @property
    def did(self) -> str:
        return self.credential.did

    def _load_did_document(self) -> dict[str, Any]:
        return self.credential.document

    def _load_private_key(self) -> Any:
        return self.credential.private_key

    def _sign_callback(self, content: bytes, method_fragment: str) -> bytes:
        return self.credential.sign(content)

    def _get_domain(self, server_url: str) -> str:
        return urlsplit(server_url).netloc.lower()

    def headers_for(
        self, url: str, method: str, body: bytes | None, *, fresh: bool
    ) -> dict[str, str]:
        headers: dict[str, str] = {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        auth: dict[str, str] = self.get_auth_header(
            url, force_new=fresh, method=method, headers=dict(headers), body=body
        )
        headers.update(auth)
        return headers
