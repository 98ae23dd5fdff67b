"""DID resolvers for the demo agent: local tables, and real did:wba resolution on loopback.

A resolver is any async callable ``(did: str) -> dict | None``. It returns the DID document whose
``id`` is exactly ``did`` or ``None`` when it does not know the DID. The verifier wrapper
(:mod:`example_app.demo_agent.verifier`) re-checks the ``id`` and anp re-checks the DID binding
(e1/k1 fingerprints) and the signature, so a resolver only has to find the document.

:class:`StaticDidResolver` and :class:`DirectoryDidResolver` never touch the network.
:class:`LoopbackHttpDidResolver` fetches the document from the address the DID names, as any
agent on the Internet would, but only from loopback (the demo and the tests never leave it).
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias

import anyio.to_thread
import httpx

__all__ = [
    "DidDocument",
    "DidResolver",
    "DirectoryDidResolver",
    "LoopbackHttpDidResolver",
    "StaticDidResolver",
    "did_wba_document_url",
    "is_loopback_did",
]

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


# -- did:wba over HTTP, loopback only ------------------------------------------------------------

_LOOPBACK_NAMES: Final = ("localhost",)


@dataclass(frozen=True)
class _Target:
    host: str  # decoded host name or IP literal, without brackets
    port: int
    authority: str  # host[:port] as the DID names it: the Host header
    path: str  # the document's path, as anp's resolver builds it


def _target(did: str, scheme: str) -> _Target:
    """Where ``did``'s document is, built the way anp 1.0.7's ``resolve_did_wba_document`` does.

    Written out here rather than imported from the middleware package: the agent is the other
    side of the protocol, and sharing the mapping would hide a bug in it from the tests.
    """
    if not did.startswith("did:wba:") or "#" in did or "?" in did:
        raise ValueError(f"not a did:wba DID: {did!r}")
    parts = did.split(":", 3)
    authority = urllib.parse.unquote(parts[2])
    path = "/" + "/".join(parts[3].split(":")) + "/did.json" if len(parts) > 3 else ""
    split = urllib.parse.urlsplit(f"{scheme}://{authority}")
    if split.hostname is None or split.username is not None or split.path or split.query:
        raise ValueError(f"did:wba DID with an unusable domain: {did!r}")
    port = split.port if split.port is not None else (443 if scheme == "https" else 80)
    return _Target(split.hostname, port, authority, path or "/.well-known/did.json")


def did_wba_document_url(did: str, scheme: str = "http") -> str:
    """The URL a did:wba DID's document is fetched from (``ValueError`` if not a did:wba)."""
    target = _target(did, scheme)
    return f"{scheme}://{target.authority}{target.path}"


def _loopback_literal(host: str) -> bool | None:
    """True/False for an IP literal, None for a name."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return None


def is_loopback_did(did: str) -> bool:
    """Whether ``did`` names a loopback host (an IP literal, or ``localhost``/``*.localhost``).

    Syntactic only: a name is not looked up here. :class:`LoopbackHttpDidResolver` also checks
    every address ``localhost`` resolves to before it connects.
    """
    try:
        host = _target(did, "http").host.lower().rstrip(".")
    except ValueError:
        return False
    literal = _loopback_literal(host)
    if literal is not None:
        return literal
    return host in _LOOPBACK_NAMES or host.endswith(".localhost")


class LoopbackHttpDidResolver:
    """Resolve did:wba DIDs over plain HTTP from loopback hosts: the real lookup, kept local.

    anp's resolver fetches ``https://<domain>/<path>/did.json`` (``/.well-known/did.json``
    without a path) and cannot be pointed elsewhere; a server on loopback has no certificate, so
    this fetches the same path with ``scheme`` (``http``). The answer must be ``200`` with a JSON
    content type (anp's ``response.json()`` insists on it), at most ``max_bytes``, a JSON object
    whose ``id`` is the DID. Redirects are not followed.

    Nothing but loopback is ever contacted: a DID whose host is not a loopback IP or a
    ``localhost`` name is refused before any lookup, a name is resolved first and refused unless
    every address is loopback, and the connection goes to those checked addresses (the DID's
    authority is sent as ``Host``), so a later DNS answer cannot redirect it.
    """

    def __init__(
        self,
        *,
        scheme: str = "http",
        timeout: float = 5.0,
        max_bytes: int = 64 * 1024,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError("scheme must be http or https")
        self.scheme = scheme
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._transport = transport

    async def _loopback_addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to; empty (refused) unless ``host`` is loopback only."""
        literal = _loopback_literal(host)
        if literal is not None:
            return [host] if literal else []
        name = host.lower().rstrip(".")
        if name not in _LOOPBACK_NAMES and not name.endswith(".localhost"):
            return []
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                name, port, type=socket.SOCK_STREAM
            )
        except OSError:
            return []
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses or not all(_loopback_literal(a) for a in addresses):
            return []
        return addresses

    async def __call__(self, did: str) -> DidDocument | None:
        try:
            target = _target(did, self.scheme)
        except ValueError:
            logger.info("not resolving %s: not a did:wba DID", did)
            return None
        addresses = await self._loopback_addresses(target.host, target.port)
        if not addresses:
            logger.warning("refused to resolve %s: its host is not loopback", did)
            return None
        async with httpx.AsyncClient(
            timeout=self.timeout, follow_redirects=False, transport=self._transport
        ) as client:
            for address in addresses:
                host = f"[{address}]" if ":" in address else address
                url = f"{self.scheme}://{host}:{target.port}{target.path}"
                try:
                    return await self._fetch(client, url, target, did)
                except httpx.ConnectError:
                    continue  # e.g. ::1 first while the server listens on 127.0.0.1 only
                except httpx.HTTPError as exc:
                    logger.warning("DID document of %s not fetched: %s", did, type(exc).__name__)
                    return None
        logger.warning("DID document of %s not fetched: nothing listens there", did)
        return None

    async def _fetch(
        self, client: httpx.AsyncClient, url: str, target: _Target, did: str
    ) -> DidDocument | None:
        headers = {"Host": target.authority, "Accept": "application/json"}
        async with client.stream("GET", url, headers=headers) as response:
            content_type = response.headers.get("content-type", "").split(";")[0].strip()
            if response.status_code != 200 or not (
                content_type == "application/json" or content_type.endswith("+json")
            ):
                logger.warning(
                    "DID document of %s not resolved: HTTP %s, %s",
                    did,
                    response.status_code,
                    content_type or "no content type",
                )
                return None
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_bytes:
                    logger.warning("DID document of %s larger than %d bytes", did, self.max_bytes)
                    return None
        try:
            document = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError):
            logger.warning("DID document of %s is not JSON", did)
            return None
        if not isinstance(document, dict) or document.get("id") != did:
            logger.warning("DID document fetched for %s has another id", did)
            return None
        return document
