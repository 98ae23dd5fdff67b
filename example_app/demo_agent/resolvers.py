"""Local (offline) DID resolvers for the demo agent.

A resolver is any async callable ``(did: str) -> dict | None``. It returns the DID document whose
``id`` is exactly ``did`` or ``None`` when it does not know the DID. The verifier wrapper
(:mod:`example_app.demo_agent.verifier`) re-checks the ``id`` and anp re-checks the DID binding
(e1/k1 fingerprints) and the signature, so a resolver only has to find the document.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

import anyio.to_thread

__all__ = ["DidDocument", "DidResolver", "DirectoryDidResolver", "StaticDidResolver"]

logger = logging.getLogger(__name__)

DidDocument: TypeAlias = dict[str, Any]
DidResolver: TypeAlias = Callable[[str], Awaitable[DidDocument | None]]


def _document_id(document: Mapping[str, Any]) -> str:
    did = document.get("id")
    if not isinstance(did, str) or not did.startswith("did:"):
        raise ValueError("DID document needs a string 'id' starting with 'did:'")
    return did


class StaticDidResolver:
    """Resolve DIDs from an in-memory mapping ``{did: did_document}``.

    Documents are deep-copied on the way in and on the way out, so callers cannot mutate the
    stored copy through a returned document.
    """

    def __init__(self, mapping: Mapping[str, DidDocument] | None = None) -> None:
        self._documents: dict[str, DidDocument] = {}
        for did, document in (mapping or {}).items():
            if _document_id(document) != did:
                raise ValueError(f"mapping key {did!r} does not match the document id")
            self._documents[did] = copy.deepcopy(document)

    def add(self, document: Mapping[str, Any]) -> str:
        """Register (or replace) a DID document; returns its DID."""
        did = _document_id(document)
        self._documents[did] = copy.deepcopy(dict(document))
        return did

    def remove(self, did: str) -> None:
        """Forget a DID (no error when unknown)."""
        self._documents.pop(did, None)

    @property
    def dids(self) -> frozenset[str]:
        return frozenset(self._documents)

    def __contains__(self, did: object) -> bool:
        return did in self._documents

    def __len__(self) -> int:
        return len(self._documents)

    async def __call__(self, did: str) -> DidDocument | None:
        document = self._documents.get(did)
        return copy.deepcopy(document) if document is not None else None


class DirectoryDidResolver:
    """Resolve DIDs from JSON files in a directory.

    Looks at ``<directory>/*.json`` and ``<directory>/**/did.json`` (the layout written by
    :func:`example_app.demo_agent.create_demo_identity`) and returns the first document whose
    ``id`` equals the requested DID. The directory is scanned on every call (in a worker thread),
    so identities written after the agent started are found; unreadable or non-DID files are
    skipped. Meant for demos and tests with a handful of files, not for large directories.
    """

    def __init__(self, directory: Path | str) -> None:
        self._directory = Path(directory)

    @property
    def directory(self) -> Path:
        return self._directory

    def _candidate_files(self) -> Iterable[Path]:
        if not self._directory.is_dir():
            return []
        files = set(self._directory.glob("*.json")) | set(self._directory.glob("**/did.json"))
        return sorted(files)

    def _lookup(self, did: str) -> DidDocument | None:
        for path in self._candidate_files():
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                logger.debug("skipping unreadable DID document file %s", path)
                continue
            if isinstance(document, dict) and document.get("id") == did:
                return document
        return None

    async def __call__(self, did: str) -> DidDocument | None:
        return await anyio.to_thread.run_sync(self._lookup, did)
