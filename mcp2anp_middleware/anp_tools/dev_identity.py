"""A local DID for development mode, generated on first run into a data directory.

The directory (default ``.mcp2anp-data``) holds a private key: it is created with mode 0700, the
key file with 0600, and it must never be committed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from anp.authentication import create_did_wba_document

from mcp2anp_middleware.logging_setup import tame_anp_logging
from mcp2anp_middleware.sessions.state import SessionConfig

DEFAULT_DATA_DIR = Path(".mcp2anp-data")


def ensure_dev_identity(
    data_dir: Path | str = DEFAULT_DATA_DIR,
    *,
    name: str = "dev",
    hostname: str = "localhost",
    port: int | None = None,
    principal: str = "dev",
) -> SessionConfig:
    """Return the dev identity's :class:`SessionConfig`, creating its files if missing."""
    directory = Path(data_dir) / name
    document_path = directory / "did.json"
    key_path = directory / "key-1_private.pem"
    if not (document_path.is_file() and key_path.is_file()):
        tame_anp_logging()  # anp logs document creation on the root logger
        Path(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.mkdir(exist_ok=True, mode=0o700)
        document, keys = create_did_wba_document(
            hostname=hostname, port=port, path_segments=["users", name]
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as key_file:
            key_file.write(keys["key-1"][0])
        document_path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return SessionConfig(
        principal=principal,
        did_document_path=document_path.resolve(),
        private_key_path=key_path.resolve(),
    )
