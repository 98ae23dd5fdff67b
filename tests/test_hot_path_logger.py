"""The logger of the per-request lines follows a reconfiguration of structlog, except where
structlog's own loggers do not either (``cache_logger_on_first_use``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import LogCapture

from mcp2anp_middleware.logging_setup import HotPathLogger


@pytest.fixture
def restored_config() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("restored_config")
def test_a_reconfiguration_reaches_the_logger_unless_loggers_are_cached() -> None:
    logger = HotPathLogger("hot")
    first, second, third = LogCapture(), LogCapture(), LogCapture()
    structlog.configure(processors=[first], cache_logger_on_first_use=False)
    logger.info("one")
    structlog.configure(processors=[second], cache_logger_on_first_use=True)
    logger.info("two")  # bound anew under this configuration, and kept from now on
    structlog.configure(processors=[third], cache_logger_on_first_use=False)
    logger.info("three")
    assert [e["event"] for e in first.entries] == ["one"]
    assert [e["event"] for e in second.entries] == ["two", "three"]
    assert third.entries == []
