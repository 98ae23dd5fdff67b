"""A stand-in for ``uvicorn.run``, for tests of the launcher's ``main()`` that must not serve."""

from __future__ import annotations

from typing import Any

import pytest
import uvicorn

import example_app.__main__ as launcher_main

LAUNCHER_ENV = (
    "MCP2ANP_SHUTDOWN_GRACE",
    "MCP2ANP_ALLOW_PRIVATE",
    "MCP2ANP_SESSION_TIMEOUT",
    "MCP2ANP_CLEANUP_INTERVAL",
    "MCP2ANP_LOG_FORMAT",
)


class FakeUvicorn:
    """Records what the launcher would serve with."""

    def __init__(self) -> None:
        self.app: Any = None
        self.options: dict[str, Any] = {}

    def __call__(self, app: Any, **options: Any) -> None:
        self.app, self.options = app, options


@pytest.fixture
def fake_uvicorn(monkeypatch: pytest.MonkeyPatch) -> FakeUvicorn:
    fake = FakeUvicorn()
    monkeypatch.setattr(uvicorn, "run", fake)
    # main() configures process-wide logging (structlog, levels); keep it out of other tests.
    monkeypatch.setattr(launcher_main, "configure_logging", lambda settings: None)
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    return fake
