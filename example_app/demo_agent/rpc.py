"""JSON-RPC 2.0 methods of the demo agent and their OpenRPC description.

Everything here is deterministic and free of I/O. Methods take their params by name (object) or
by position (array, in the documented order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "AUTH_REQUIRED",
    "HOTELS",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHODS",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "CallContext",
    "RpcError",
    "RpcMethod",
    "bind_params",
    "build_openrpc_document",
]

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
AUTH_REQUIRED: Final = -32001  # implementation-defined server error: DID WBA auth failed


class RpcError(Exception):
    """A JSON-RPC error; ``http_status`` is the status of the HTTP response carrying it."""

    def __init__(
        self, code: int, message: str, data: Any = None, *, http_status: int = 200
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.http_status = http_status

    def to_error_object(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclass(frozen=True)
class CallContext:
    """Who is calling: filled from the verified DID WBA signature or bearer token."""

    caller_did: str
    auth_scheme: str


@dataclass(frozen=True)
class Param:
    name: str
    schema: Mapping[str, Any]
    description: str
    required: bool = True


Handler = Callable[[CallContext, dict[str, Any]], Any]


@dataclass(frozen=True)
class RpcMethod:
    name: str
    summary: str
    description: str
    params: tuple[Param, ...]
    result_name: str
    result_schema: Mapping[str, Any]
    handler: Handler


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _matches(schema: Mapping[str, Any], value: Any) -> bool:
    expected = schema.get("type")
    if expected == "string":
        ok = isinstance(value, str)
    elif expected == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    else:
        ok = True
    if ok and isinstance(value, str) and "minLength" in schema:
        ok = len(value) >= int(schema["minLength"])
    if ok and isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema:
            ok = value >= schema["minimum"]
        if ok and "maximum" in schema:
            ok = value <= schema["maximum"]
    return ok


def _invalid(method: RpcMethod, reason: str, **details: Any) -> RpcError:
    data: dict[str, Any] = {"method": method.name, "reason": reason, **details}
    data["expected"] = [
        {"name": p.name, "schema": dict(p.schema), "required": p.required} for p in method.params
    ]
    return RpcError(INVALID_PARAMS, "Invalid params", data)


def bind_params(method: RpcMethod, params: Any) -> dict[str, Any]:
    """Map object/array params onto the method's declared params; raise -32602 on mismatch."""
    names = [p.name for p in method.params]
    if params is None:
        given: dict[str, Any] = {}
    elif isinstance(params, list):
        if len(params) > len(names):
            raise _invalid(
                method, "too many positional params", given=len(params), allowed=len(names)
            )
        given = dict(zip(names, params, strict=False))
    elif isinstance(params, dict):
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise _invalid(method, "unknown params", unknown=unknown)
        given = dict(params)
    else:  # the request validator refuses this first; kept for direct callers
        raise _invalid(method, "params must be an object or an array")

    bound: dict[str, Any] = {}
    missing = []
    for param in method.params:
        value = given.get(param.name)
        if value is None:
            if param.required:
                missing.append(param.name)
            continue
        if not _matches(param.schema, value):
            raise _invalid(
                method,
                "wrong type or value",
                param=param.name,
                got=_json_type(value),
            )
        bound[param.name] = value
    if missing:
        raise _invalid(method, "missing required params", missing=missing)
    return bound


# --------------------------------------------------------------------------- methods

HOTELS: Final[tuple[Mapping[str, Any], ...]] = (
    {"id": "bj-001", "name": "Hutong Courtyard Inn", "city": "Beijing", "price": 88, "stars": 3},
    {"id": "bj-002", "name": "Forbidden View Hotel", "city": "Beijing", "price": 145, "stars": 4},
    {"id": "bj-003", "name": "Chaoyang Grand", "city": "Beijing", "price": 260, "stars": 5},
    {"id": "sh-001", "name": "Bund Riverside Suites", "city": "Shanghai", "price": 210, "stars": 5},
    {"id": "sh-002", "name": "Jing'an Budget Stay", "city": "Shanghai", "price": 65, "stars": 2},
    {"id": "pa-001", "name": "Hotel du Canal", "city": "Paris", "price": 140, "stars": 3},
    {"id": "pa-002", "name": "Montmartre Loft", "city": "Paris", "price": 95, "stars": 3},
)

_HOTEL_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "city": {"type": "string"},
        "price": {"type": "number", "description": "Price per night in USD"},
        "stars": {"type": "integer"},
    },
    "required": ["id", "name", "city", "price", "stars"],
}


def _echo(ctx: CallContext, params: dict[str, Any]) -> Any:
    return {"message": params["message"], "caller_did": ctx.caller_did}


def _whoami(ctx: CallContext, params: dict[str, Any]) -> Any:
    return {"did": ctx.caller_did, "auth_scheme": ctx.auth_scheme}


def _add(ctx: CallContext, params: dict[str, Any]) -> Any:
    return params["a"] + params["b"]


def _search_hotels(ctx: CallContext, params: dict[str, Any]) -> Any:
    city = params["city"].strip().casefold()
    max_price = params.get("max_price")
    hotels = [
        dict(hotel)
        for hotel in HOTELS
        if hotel["city"].casefold() == city and (max_price is None or hotel["price"] <= max_price)
    ]
    hotels.sort(key=lambda hotel: (hotel["price"], hotel["id"]))
    return {"city": params["city"], "max_price": max_price, "count": len(hotels), "hotels": hotels}


def _fail(ctx: CallContext, params: dict[str, Any]) -> Any:
    raise RpcError(
        params["code"],
        params["message"],
        {"requested_by": ctx.caller_did, "reason": "fail() was called on purpose"},
        http_status=params.get("http_status", 400),
    )


METHODS: Final[Mapping[str, RpcMethod]] = {
    method.name: method
    for method in (
        RpcMethod(
            name="echo",
            summary="Echo a message back",
            description="Returns the message together with the DID of the verified caller.",
            params=(Param("message", {"type": "string"}, "Text to echo back"),),
            result_name="echo",
            result_schema={
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "caller_did": {"type": "string"},
                },
                "required": ["message", "caller_did"],
            },
            handler=_echo,
        ),
        RpcMethod(
            name="whoami",
            summary="Tell the caller which DID the agent authenticated",
            description="Returns the caller DID and how it was authenticated "
            "(http_signatures, legacy_didwba or bearer).",
            params=(),
            result_name="identity",
            result_schema={
                "type": "object",
                "properties": {"did": {"type": "string"}, "auth_scheme": {"type": "string"}},
                "required": ["did", "auth_scheme"],
            },
            handler=_whoami,
        ),
        RpcMethod(
            name="add",
            summary="Add two numbers",
            description="Returns a + b. Params by name {a, b} or by position [a, b].",
            params=(
                Param("a", {"type": "number"}, "First addend"),
                Param("b", {"type": "number"}, "Second addend"),
            ),
            result_name="sum",
            result_schema={"type": "number"},
            handler=_add,
        ),
        RpcMethod(
            name="search_hotels",
            summary="Search the demo hotel catalogue",
            description="Hotels in a city (case-insensitive), optionally at most max_price per "
            "night, cheapest first. Cities: Beijing, Shanghai, Paris.",
            params=(
                Param("city", {"type": "string", "minLength": 1}, "City name"),
                Param(
                    "max_price",
                    {"type": "number", "minimum": 0},
                    "Highest acceptable price per night in USD",
                    required=False,
                ),
            ),
            result_name="hotels",
            result_schema={
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "max_price": {"type": ["number", "null"]},
                    "count": {"type": "integer"},
                    "hotels": {"type": "array", "items": dict(_HOTEL_SCHEMA)},
                },
                "required": ["city", "max_price", "count", "hotels"],
            },
            handler=_search_hotels,
        ),
        RpcMethod(
            name="fail",
            summary="Always answer with the requested JSON-RPC error",
            description="Test helper: responds with error {code, message, data} and HTTP status "
            "http_status (default 400), so clients can exercise error handling on non-200.",
            params=(
                Param("code", {"type": "integer"}, "JSON-RPC error code to return"),
                Param("message", {"type": "string"}, "Error message to return"),
                Param(
                    "http_status",
                    {"type": "integer", "minimum": 400, "maximum": 599},
                    "HTTP status of the response (default 400)",
                    required=False,
                ),
            ),
            result_name="never",
            result_schema={"not": {}},
            handler=_fail,
        ),
    )
}


def build_openrpc_document(*, title: str, description: str, rpc_url: str) -> dict[str, Any]:
    """OpenRPC 1.3 document for :data:`METHODS`, served at ``<base_url>/api/openrpc.json``."""
    auth_error = {
        "code": AUTH_REQUIRED,
        "message": "DID WBA authentication required or failed (HTTP 401)",
    }
    return {
        "openrpc": "1.3.2",
        "info": {"title": title, "version": "1.0.0", "description": description},
        "servers": [{"name": "demo-agent-rpc", "url": rpc_url}],
        "methods": [
            {
                "name": method.name,
                "summary": method.summary,
                "description": method.description,
                "paramStructure": "either",
                "params": [
                    {
                        "name": param.name,
                        "description": param.description,
                        "required": param.required,
                        "schema": dict(param.schema),
                    }
                    for param in method.params
                ],
                "result": {"name": method.result_name, "schema": dict(method.result_schema)},
                "errors": [auth_error],
            }
            for method in METHODS.values()
        ],
        "components": {"schemas": {"Hotel": dict(_HOTEL_SCHEMA)}},
    }


def call_method(name: str, params: Any, context: CallContext) -> Any:
    """Run one method; raises :class:`RpcError` for unknown methods and bad params."""
    method = METHODS.get(name)
    if method is None:
        raise RpcError(METHOD_NOT_FOUND, "Method not found", {"method": name})
    return method.handler(context, bind_params(method, params))


def known_method_names() -> Sequence[str]:
    return list(METHODS)
