"""Small value types the per-request path leans on: a session's config (hashed once, compared by
identity first) and the encoded MCP handshake (made once per kind of client)."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from mcp.server.connection import Connection
from mcp_types import InitializeRequestParams

from mcp2anp_middleware import SessionConfig
from mcp2anp_middleware.mcp_hosting import handshake as handshake_module
from mcp2anp_middleware.mcp_hosting.handshake import Handshake, decoded


def test_config_equality_and_hash_follow_every_field() -> None:
    one = SessionConfig(principal="alice", did_document_path=Path("/keys/did.json"))
    same = SessionConfig(principal="alice", did_document_path=Path("/keys/did.json"))
    assert one == same and hash(one) == hash(same)
    assert {one: "found"}[same] == "found"
    for changed in (
        replace(one, principal="bob"),
        replace(one, did_document_path=Path("/keys/other.json")),
        replace(one, private_key_path=Path("/keys/key.pem")),
        replace(one, did_document="{}"),
        replace(one, private_key_pem="PEM"),
    ):
        assert changed != one
        assert changed not in {one}
    assert one != "alice"


def test_config_survives_pickle_and_copy_with_a_fresh_hash() -> None:
    config = SessionConfig(principal="carol", private_key_pem="PEM", did_document="{}")
    for again in (pickle.loads(pickle.dumps(config)), copy.copy(config), copy.deepcopy(config)):
        assert again == config and hash(again) == hash(config)
    # The hash travels as the fields, never as a number: another process hashes strings
    # differently, and a carried-over hash would make the config unfindable there.
    assert str(hash(config)).encode() not in pickle.dumps(config)


def _connection(info: Mapping[str, object], capabilities: Mapping[str, object]) -> Connection:
    params = InitializeRequestParams.model_validate(
        {"protocolVersion": "2025-11-25", "capabilities": capabilities, "clientInfo": info}
    )
    return Connection(_NoOutbound(), protocol_version="2025-11-25", client_params=params)


class _NoOutbound:
    async def send_raw_request(self, *args: object, **kwargs: object) -> dict[str, object]:
        raise AssertionError("nothing is sent")

    async def notify(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("nothing is sent")


def test_handshake_from_a_connection_round_trips_and_is_shared_per_kind_of_client() -> None:
    info = {"name": "agent", "version": "1.0"}
    capabilities = {"sampling": {}, "roots": {"listChanged": True}}
    first = Handshake.from_connection(_connection(info, capabilities))
    again = Handshake.from_connection(_connection(dict(info), dict(capabilities)))
    assert first is not None and again is first  # one object for one kind of client
    assert first.client_info == info and first.capabilities == capabilities
    text = first.encode()
    assert json.loads(text) == {"v": "2025-11-25", "i": info, "c": capabilities}
    assert Handshake.decode(text) == first and decoded(text) == first
    # The log level changes the text; the cached encoding is not carried over.
    leveled = first.with_log_level("warning")
    assert json.loads(leveled.encode())["l"] == "warning"
    assert Handshake.decode(leveled.encode()) == leveled
    other = Handshake.from_connection(_connection({"name": "other", "version": "2"}, {}))
    assert other is not None and other != first and other.encode() != text


def test_a_large_handshake_is_served_but_not_kept_in_the_caches() -> None:
    big = {"name": "agent", "version": "1.0", "title": "x" * 10_000}
    cached_before = handshake_module._from_json.cache_info().currsize
    made = Handshake.from_connection(_connection(big, {}))
    assert made is not None and made.client_info == big
    assert handshake_module._from_json.cache_info().currsize == cached_before
    decoded_before = handshake_module._decoded.cache_info().currsize
    assert decoded(made.encode()) == made
    assert handshake_module._decoded.cache_info().currsize == decoded_before
