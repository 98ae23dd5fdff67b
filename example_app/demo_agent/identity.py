"""Throw-away DID WBA identities for demos and tests (files on disk, no network)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anp.authentication import create_did_wba_document

__all__ = ["DemoIdentity", "create_demo_identity"]


@dataclass(frozen=True)
class DemoIdentity:
    """A DID document and its authentication key, written as files anp's clients can load."""

    did: str
    did_document: dict[str, Any]
    did_document_path: Path
    private_key_path: Path


def create_demo_identity(
    directory: Path | str,
    name: str,
    *,
    hostname: str = "localhost",
    port: int | None = None,
    path_segments: Sequence[str] | None = None,
) -> DemoIdentity:
    """Create an e1 (Ed25519) did:wba identity under ``<directory>/<name>/``.

    Writes ``did.json`` and ``key-1_private.pem`` (mode 0600), the pair that
    ``DIDWbaAuthHeader(did_document_path, private_key_path)`` and
    ``ANPCrawler(did_document_path, private_key_path)`` take. ``hostname`` must be a name, not
    an IP (anp refuses IPs). With ``port=9880`` and the default path the DID looks like
    ``did:wba:localhost%3A9880:agents:<name>:e1_<fingerprint>``; ``DirectoryDidResolver(directory)``
    finds it.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError("name must be a single path segment")
    target = Path(directory) / name
    target.mkdir(parents=True, exist_ok=True)
    segments = list(path_segments) if path_segments is not None else ["agents", name]
    document, keys = create_did_wba_document(hostname=hostname, port=port, path_segments=segments)
    private_pem: bytes = keys["key-1"][0]

    did_document_path = target / "did.json"
    did_document_path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    private_key_path = target / "key-1_private.pem"
    fd = os.open(private_key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key_file:
        key_file.write(private_pem)
    return DemoIdentity(
        did=str(document["id"]),
        did_document=document,
        did_document_path=did_document_path,
        private_key_path=private_key_path,
    )
