"""A session's MCP handshake, kept compactly in its store record so any process can serve it.

The handshake era (2025-11-25 and earlier) negotiates once per session: protocol version, client
info, client capabilities, and later the log level the client asked for. The SDK keeps these on a
:class:`~mcp.server.connection.Connection` that lives as long as its process holds the session.
Here the connection is rebuilt from this record on whichever worker a request reaches, already
initialized, so a tool sees the same client on every worker.

The encoding is compact JSON with one-letter keys (``v`` version, ``i`` client info, ``c``
capabilities, ``l`` log level); the registry interns it, so the sessions of one kind of client
share one string in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Generic, TypeVar

from mcp.server.connection import Connection
from mcp.shared.dispatcher import Outbound
from mcp_types import ClientCapabilities, Implementation, InitializeRequestParams

LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
"""RFC 5424 severities in ascending order, as MCP's ``logging/setLevel`` names them."""

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Handshake:
    protocol_version: str
    client_info: dict[str, Any] = field(hash=False)
    capabilities: dict[str, Any] = field(hash=False)
    log_level: str | None = None
    text: str | None = field(default=None, compare=False, repr=False)
    """The encoding, when made already (:meth:`encode` returns it)."""

    @classmethod
    def from_connection(cls, connection: Connection) -> Handshake | None:
        """What a completed ``initialize`` left on ``connection`` (None if it left nothing).

        Built from the models' JSON (two serializer calls) through a cache: most sessions of
        a worker come from a few kinds of client, whose handshakes are the same."""
        params = connection.client_params
        if params is None:
            return None
        info, capabilities = params.client_info, params.capabilities
        version = connection.protocol_version
        info_json = info.__pydantic_serializer__.to_json(info, by_alias=True, exclude_none=True)
        capabilities_json = capabilities.__pydantic_serializer__.to_json(
            capabilities, by_alias=True, exclude_none=True
        )
        return _from_json(version, info_json, capabilities_json)

    @classmethod
    def decode(cls, text: str) -> Handshake | None:
        """The handshake in ``text``; None for anything damaged (the session then serves as
        uninitialized, and the client's requests are refused by the SDK's own gate)."""
        try:
            raw = json.loads(text)
            level = raw.get("l")
            return cls(
                protocol_version=str(raw["v"]),
                client_info=dict(raw["i"]),
                capabilities=dict(raw["c"]),
                log_level=level if level in LOG_LEVELS else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def encode(self) -> str:
        if self.text is not None:
            return self.text
        raw: dict[str, Any] = {"v": self.protocol_version, "i": self.client_info}
        raw["c"] = self.capabilities
        if self.log_level is not None:
            raw["l"] = self.log_level
        return json.dumps(raw, separators=(",", ":"), sort_keys=True)

    def with_log_level(self, level: str) -> Handshake:
        return replace(self, log_level=level, text=None)

    def connection(self, outbound: Outbound, session_id: str) -> Connection:
        """A born-ready connection for this handshake: ``initialize`` and ``initialized`` are
        behind it, as they are for the process that served them."""
        params = _params(self.encode())
        connection = Connection(
            outbound,
            protocol_version=self.protocol_version,
            session_id=session_id,
            client_params=params,
        )
        connection.initialized.set()
        return connection


def below_level(params: Any, level: str | None) -> bool:
    """True when a ``notifications/message`` with ``params`` is below the session's log level
    (the spec asks servers to send only that level and above)."""
    if level is None or not isinstance(params, dict):
        return False
    sent = params.get("level")
    return sent in LOG_LEVELS and LOG_LEVELS.index(sent) < LOG_LEVELS.index(level)


class _SmallCache(Generic[R]):
    """``function`` of text parts, remembered for the last 256 calls whose parts are small: a
    worker serves many sessions of few kinds of client, whose handshakes are the same text, and
    a client cannot make the cache hold large ones (those are computed every time)."""

    def __init__(self, function: Callable[..., R]) -> None:
        self._function = function
        self._cached = lru_cache(maxsize=256)(function)
        self.cache_info = self._cached.cache_info

    def __call__(self, *parts: str | bytes) -> R:
        if sum(map(len, parts)) > _CACHED_SIZE:
            return self._function(*parts)
        return self._cached(*parts)


_CACHED_SIZE = 4096
"""Handshakes larger than this (as JSON) are not cached."""


def _handshake_from_json(version: str, info: bytes, capabilities: bytes) -> Handshake:
    handshake = Handshake(
        protocol_version=version,
        client_info=json.loads(info),
        capabilities=json.loads(capabilities),
    )
    return replace(handshake, text=handshake.encode())


def _initialize_params(text: str) -> InitializeRequestParams:
    handshake = Handshake.decode(text)
    assert handshake is not None
    return InitializeRequestParams(
        protocol_version=handshake.protocol_version,
        capabilities=ClientCapabilities.model_validate(handshake.capabilities, by_name=False),
        client_info=Implementation.model_validate(handshake.client_info, by_name=False),
    )


_from_json = _SmallCache(_handshake_from_json)
"""A handshake from its parts as JSON, encoded once (sessions of one kind of client share it)."""
_decoded = _SmallCache(Handshake.decode)
_params = _SmallCache(_initialize_params)


def decoded(text: str) -> Handshake | None:
    """:meth:`Handshake.decode`, remembered (see :class:`_SmallCache`)."""
    return _decoded(text)
