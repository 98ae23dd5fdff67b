"""Keeping libraries' logging from leaking documents, payloads, tokens and key paths.

anp logs whole documents and request details at INFO, some of it straight on the root logger
(``logging.info(...)`` inside ``anp``). httpcore's DEBUG trace logs response headers, which carry
the bearer tokens ANP agents issue. :func:`tame_anp_logging` raises the ``anp`` logger to WARNING,
drops INFO/DEBUG records that anp code emits through the root logger, and keeps ``httpcore`` at
INFO unless the host configured it explicitly.
"""

from __future__ import annotations

import logging
import os

import anp

_ANP_DIR = os.path.dirname(os.path.abspath(anp.__file__))


class _DropAnpRootChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(_ANP_DIR)


_FILTER = _DropAnpRootChatter()


def tame_anp_logging(level: int = logging.WARNING) -> None:
    """Idempotent; safe to call at import time of a host app."""
    anp_logger = logging.getLogger("anp")
    if anp_logger.level == logging.NOTSET or anp_logger.level < level:
        anp_logger.setLevel(level)
    root = logging.getLogger()
    if _FILTER not in root.filters:
        root.addFilter(_FILTER)
    httpcore = logging.getLogger("httpcore")
    if httpcore.level == logging.NOTSET:
        httpcore.setLevel(logging.INFO)
