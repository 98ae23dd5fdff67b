"""The endpoint's check of a client request accepts and reads exactly what ``JSONRPCRequest``
accepts and reads."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from mcp_types import JSONRPCNotification, JSONRPCRequest
from pydantic import ValidationError

from mcp2anp_middleware.mcp_hosting.endpoint import CheckedRequest, _jsonrpc_message

_ANY = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4)
_MEMBERS = {
    "jsonrpc": st.sampled_from(["2.0"] * 8 + ["1.0", "", "2.0 "]) | _ANY,
    "id": _ANY | st.lists(st.integers(), max_size=2),
    "method": st.sampled_from(["tools/call", "ping"]) | _ANY,
    "params": st.dictionaries(st.text(max_size=3), _ANY, max_size=3)
    | st.lists(_ANY, max_size=2)
    | _ANY,
    "extra": _ANY,
}


@st.composite
def _requests(draw: st.DrawFn) -> dict[str, Any]:
    message = {"method": draw(_MEMBERS["method"]), "id": draw(_MEMBERS["id"])}
    if draw(st.integers(0, 9)):  # mostly there
        message["jsonrpc"] = draw(_MEMBERS["jsonrpc"])
    for name in ("params", "extra"):
        if draw(st.booleans()):
            message[name] = draw(_MEMBERS[name])
    return message


def _outcome(check: Any, message: dict[str, Any]) -> Any:
    try:
        request = check(message)
    except ValidationError:
        return "rejected"
    return (type(request.id), request.id, request.method, request.params)


_USUAL = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


@given(message=_requests())
@settings(max_examples=500, deadline=None)
@example(message={**_USUAL, "id": True})
@example(message={**_USUAL, "id": 1.0})
@example(message={**_USUAL, "id": None})
@example(message={**_USUAL, "method": 3})
@example(message={**_USUAL, "params": [1]})
@example(message={**_USUAL, "params": None, "extra": 1})
@example(message={"id": 1, "method": "ping"})
@example(message={**_USUAL, "jsonrpc": 2.0})
def test_a_request_is_checked_as_the_model_checks_it(message: dict[str, Any]) -> None:
    assert _outcome(_jsonrpc_message, message) == _outcome(
        lambda m: JSONRPCRequest.model_validate(m, by_name=False), message
    )


def test_the_usual_request_and_a_notification() -> None:
    params = {"name": "t", "arguments": {}}
    message = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}
    assert _jsonrpc_message(message) == CheckedRequest(7, "tools/call", params)
    note = _jsonrpc_message({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert isinstance(note, JSONRPCNotification)
