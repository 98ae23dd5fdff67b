"""A local DID for development mode, generated on first run into a data directory.

The directory (default ``.mcp2anp-data``) holds a private key: it is created with mode 0700, the
key file with 0600, and it must never be committed.

A did:wba DID names the address its document is fetched from, so the identity is made for the
address the server actually answers on (:func:`dev_did_address` turns a public URL into it): an
agent resolving ``did:wba:localhost%3A9880:users:dev:...`` asks ``localhost:9880`` for
``/users/dev/.../did.json``, which :class:`~mcp2anp_middleware.hosting.ANPMiddleware` serves.

When the address is given and the identity on disk was made for another one, it is replaced
(one identity per data directory, at ``<data_dir>/<name>/``): a DID for an address nothing
serves is useless, and keeping one directory means the files are always where the docs say.
Servers on different addresses therefore need different data directories (or the same
``public_url``); a running server is not affected by a later replacement, because it keeps the
document and key it loaded at start in memory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import structlog
from anp.authentication import create_did_wba_document

from mcp2anp_middleware.anp_tools.did_hosting import did_wba_location
from mcp2anp_middleware.logging_setup import tame_anp_logging
from mcp2anp_middleware.private_files import write_private_file
from mcp2anp_middleware.sessions.state import SessionConfig

logger = structlog.get_logger("mcp2anp_middleware.anp_tools.dev_identity")

DEFAULT_DATA_DIR = Path(".mcp2anp-data")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def dev_did_address(public_url: str) -> tuple[str, int | None]:
    """The ``(hostname, port)`` a dev DID needs to resolve to ``public_url``'s server.

    ``public_url`` is the origin clients and agents reach the host app at (``http://127.0.0.1:9880``,
    ``https://agents.example.com``); a path, query, fragment or user info is refused, because
    did:wba paths are the identity's own. Loopback IPs become ``localhost`` (anp refuses IP
    hostnames in did:wba, and ``localhost`` reaches the same loopback server); any other IP is a
    ``ValueError``: publish under a DNS name. The port is dropped when it is the scheme's default.
    """
    parts = urlsplit(public_url)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"public_url must be an absolute http(s) URL, got {public_url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"public_url must be an origin (scheme, host, port): {public_url!r}")
    port = parts.port  # ValueError for a bad port
    hostname = parts.hostname.lower()
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        pass
    else:
        if not address.is_loopback:
            raise ValueError(
                f"did:wba cannot name an IP address ({hostname}): give public_url a DNS name"
            )
        hostname = "localhost"
    if port == _DEFAULT_PORTS[parts.scheme]:
        port = None
    return hostname, port


def _made_for(document_path: Path, authority: str, name: str) -> bool:
    """Whether the identity at ``document_path`` is a ``users:<name>`` DID of ``authority``."""
    try:
        document = json.loads(document_path.read_text(encoding="utf-8"))
        location = did_wba_location(str(document["id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return location.authority.lower() == authority.lower() and location.path.startswith(
        f"/users/{name}/"
    )


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise check-and-create between processes sharing ``directory`` (where flock exists),
    so two servers starting together never leave a key of one beside the document of the other."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # a read-only, pre-provisioned directory: nothing will be written anyway
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_dev_identity(
    data_dir: Path | str = DEFAULT_DATA_DIR,
    *,
    name: str = "dev",
    hostname: str | None = None,
    port: int | None = None,
    principal: str = "dev",
) -> SessionConfig:
    """Return the dev identity's :class:`SessionConfig`, creating its files if missing.

    With ``hostname`` or ``port`` the identity is pinned to that address (``hostname`` defaults
    to ``localhost``; ``port=None`` means the scheme's default): an identity on disk made for
    another address is replaced. With neither, whatever identity is on disk is reused, and a new
    one is made for ``localhost`` without a port (which resolves to nothing: give the address).
    """
    directory = Path(data_dir) / name
    document_path = directory / "did.json"
    key_path = directory / "key-1_private.pem"
    pinned = hostname is not None or port is not None
    host = hostname if hostname is not None else "localhost"
    authority = host if port is None else f"{host}:{port}"
    Path(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.mkdir(exist_ok=True, mode=0o700)
    with _locked(directory):
        present = document_path.is_file() and key_path.is_file()
        if not present or (pinned and not _made_for(document_path, authority, name)):
            tame_anp_logging()  # anp logs document creation on the root logger
            document, keys = create_did_wba_document(
                hostname=host, port=port, path_segments=["users", name]
            )
            if present:
                logger.warning(
                    "Development DID replaced: it was made for another address",
                    address=authority,
                    did=document["id"],
                )
            # Key first, then the document: whoever sees the new document also finds its key.
            write_private_file(key_path, keys["key-1"][0], mode=0o600)
            document_bytes = json.dumps(document, indent=2).encode("utf-8")
            write_private_file(document_path, document_bytes, mode=0o644)
    return SessionConfig(
        principal=principal,
        did_document_path=document_path.resolve(),
        private_key_path=key_path.resolve(),
    )
