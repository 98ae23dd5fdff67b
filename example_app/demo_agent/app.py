"""The demo ANP agent: a pure Starlette ASGI app with DID WBA-protected JSON-RPC."""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .resolvers import DidResolver
from .rpc import (
    AUTH_REQUIRED,
    HOTELS,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHODS,
    PARSE_ERROR,
    CallContext,
    RpcError,
    build_openrpc_document,
    call_method,
)
from .verifier import AuthenticationFailed, JwtKeys, LocalDidWbaVerifier, VerifiedCaller

__all__ = ["DEFAULT_AGENT_NAME", "MAX_BODY_BYTES", "create_demo_agent", "quiet_anp_logging"]

logger = logging.getLogger("example_app.demo_agent")

DEFAULT_AGENT_NAME: Final = "Demo Hotel Agent"
MAX_BODY_BYTES: Final = 1024 * 1024
_AD_CONTEXT: Final = {
    "@vocab": "https://schema.org/",
    "ad": "https://agent-network-protocol.com/ad#",
    "did": "https://w3id.org/did#",
}


def quiet_anp_logging() -> None:
    """Raise the ``anp`` package logger to WARNING unless the application configured it.

    anp logs documents, payloads and request details at INFO (module loggers under ``anp.*``;
    some helpers log on the root logger, which we leave alone). The verifier path used by this
    agent logs nothing secret: no tokens, keys or signature values, only DIDs and error texts.
    """
    anp_logger = logging.getLogger("anp")
    if anp_logger.level == logging.NOTSET:
        anp_logger.setLevel(logging.WARNING)


def _normalise_base_url(base_url: str) -> str:
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must be an absolute http(s) URL, got {base_url!r}")
    if parts.query or parts.fragment:
        raise ValueError("base_url must not have a query or a fragment")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _did_from_base_url(base_url: str) -> str:
    parts = urllib.parse.urlsplit(base_url)
    segments = [urllib.parse.quote(s, safe="") for s in parts.path.split("/") if s]
    return ":".join(["did:wba", urllib.parse.quote(parts.netloc, safe=""), *segments])


def _signed_target_uri(request: Request) -> str:
    """The URL as the client addressed it (RFC 9421 ``@target-uri``), mount prefix included."""
    url = request.url
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) and raw_path else url.path
    return urllib.parse.urlunsplit((url.scheme, url.netloc, path, url.query, ""))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def _best_effort_id(body: bytes) -> Any:
    try:
        message = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(message, dict) and _valid_id(message.get("id")):
        return message.get("id")
    return None


def _rpc_error_response(
    request_id: Any,
    error: RpcError,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"jsonrpc": "2.0", "id": request_id, "error": error.to_error_object()}
    return JSONResponse(body, status_code=error.http_status, headers=headers)


class _DemoAgent:
    def __init__(
        self,
        *,
        base_url: str,
        verifier: LocalDidWbaVerifier,
        agent_did: str,
        name: str,
    ) -> None:
        self.base_url = base_url
        self.verifier = verifier
        self.agent_did = agent_did
        self.name = name
        self.description = (
            "Offline demo ANP agent. Documents are public; JSON-RPC calls at "
            f"{base_url}/rpc need a DID WBA signature (RFC 9421 or legacy DIDWba) or the bearer "
            "token it returns."
        )

    # ------------------------------------------------------------------ documents

    def agent_description(self) -> dict[str, Any]:
        return {
            "@context": _AD_CONTEXT,
            "@type": "ad:AgentDescription",
            "@id": f"{self.base_url}/ad.json",
            "protocolType": "ANP",
            "protocolVersion": "1.0.0",
            "name": self.name,
            "did": self.agent_did,
            "description": self.description,
            "securityDefinitions": {
                "didwba_sc": {"scheme": "didwba", "in": "header", "name": "Authorization"}
            },
            "security": "didwba_sc",
            "interfaces": [
                {
                    "@type": "ad:StructuredInterface",
                    "protocol": "openrpc",
                    "url": f"{self.base_url}/api/openrpc.json",
                    "description": "JSON-RPC 2.0 methods: " + ", ".join(METHODS) + ".",
                }
            ],
            "informations": [
                {
                    "@type": "ad:Information",
                    "url": f"{self.base_url}/info.json",
                    "description": "Agent facts: endpoints, authentication, methods.",
                },
                {
                    "@type": "ad:Information",
                    "url": f"{self.base_url}/hotels.json",
                    "description": "Public hotel catalogue searched by search_hotels.",
                },
            ],
        }

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "did": self.agent_did,
            "agent_description": f"{self.base_url}/ad.json",
            "openrpc": f"{self.base_url}/api/openrpc.json",
            "rpc_endpoint": f"{self.base_url}/rpc",
            "methods": list(METHODS),
            "authentication": {
                "required_for": ["POST /rpc"],
                "accepted": ["http_signatures", "legacy_didwba", "bearer"],
                "bearer_token_algorithm": self.verifier.jwt_algorithm,
            },
        }

    async def get_ad(self, request: Request) -> Response:
        return JSONResponse(self.agent_description())

    async def get_openrpc(self, request: Request) -> Response:
        return JSONResponse(
            build_openrpc_document(
                title=self.name, description=self.description, rpc_url=f"{self.base_url}/rpc"
            )
        )

    async def get_info(self, request: Request) -> Response:
        return JSONResponse(self.info())

    async def get_hotels(self, request: Request) -> Response:
        return JSONResponse({"hotels": [dict(hotel) for hotel in HOTELS]})

    # ------------------------------------------------------------------ JSON-RPC

    async def post_rpc(self, request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _rpc_error_response(
                None, RpcError(INVALID_REQUEST, "Request body too large", http_status=413)
            )
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _rpc_error_response(
                None, RpcError(INVALID_REQUEST, "Request body too large", http_status=413)
            )

        try:
            caller = await self.verifier.verify_request(
                method=request.method,
                url=_signed_target_uri(request),
                headers=request.headers,
                body=body,
            )
        except AuthenticationFailed as exc:
            return self._auth_failure(request, body, exc)

        try:
            response = self._handle_message(body, caller)
        except Exception:  # a bug in a demo method must not leak a traceback to the client
            logger.exception("demo agent method crashed")
            response = _rpc_error_response(
                _best_effort_id(body), RpcError(INTERNAL_ERROR, "Internal error", http_status=500)
            )
        # A fresh bearer token (Authentication-Info + Authorization) after a signature check.
        response.headers.update(caller.response_headers)
        return response

    def _auth_failure(self, request: Request, body: bytes, exc: AuthenticationFailed) -> Response:
        logger.info("rejected unauthenticated JSON-RPC call: %s", exc.message)
        headers = dict(exc.headers)
        if not any(key.lower() == "www-authenticate" for key in headers):
            realm = re.sub(r"[^A-Za-z0-9.:\[\]-]", "", request.url.hostname or "") or "agent"
            headers["WWW-Authenticate"] = f'DIDWba realm="{realm}"'
        data = {"reason": exc.message, "accepted": ["http_signatures", "legacy_didwba", "bearer"]}
        error = RpcError(AUTH_REQUIRED, "Authentication required", data, http_status=401)
        return _rpc_error_response(_best_effort_id(body), error, headers)

    def _handle_message(self, body: bytes, caller: VerifiedCaller) -> Response:
        try:
            message = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            error = RpcError(PARSE_ERROR, "Parse error", {"detail": str(exc)}, http_status=400)
            return _rpc_error_response(None, error)

        if isinstance(message, list):
            error = RpcError(
                INVALID_REQUEST, "Batch requests are not supported", None, http_status=400
            )
            return _rpc_error_response(None, error)
        if not isinstance(message, dict):
            error = RpcError(
                INVALID_REQUEST, "Invalid Request", {"detail": "not an object"}, http_status=400
            )
            return _rpc_error_response(None, error)

        request_id = message.get("id")
        problem = None
        if message.get("jsonrpc") != "2.0":
            problem = 'jsonrpc must be "2.0"'
        elif not isinstance(message.get("method"), str):
            problem = "method must be a string"
        elif not isinstance(message.get("params", []), list | dict):
            problem = "params must be an object or an array"
        elif not _valid_id(request_id):
            problem = "id must be a string, a number or null"
            request_id = None
        if problem is not None:
            error = RpcError(
                INVALID_REQUEST, "Invalid Request", {"detail": problem}, http_status=400
            )
            return _rpc_error_response(request_id, error)

        method_name = message["method"]
        context = CallContext(caller_did=caller.did, auth_scheme=caller.auth_scheme)
        is_notification = "id" not in message
        logger.info("JSON-RPC %s from %s (%s)", method_name, caller.did, caller.auth_scheme)
        try:
            result = call_method(method_name, message.get("params"), context)
        except RpcError as error:
            if is_notification:
                return Response(status_code=204)
            return _rpc_error_response(request_id, error)
        if is_notification:
            return Response(status_code=204)
        return JSONResponse({"jsonrpc": "2.0", "id": request_id, "result": result})


def create_demo_agent(
    *,
    base_url: str,
    did_resolver: DidResolver,
    jwt_private_key_pem: str | None = None,
    jwt_public_key_pem: str | None = None,
    agent_did: str | None = None,
    name: str = DEFAULT_AGENT_NAME,
    tame_anp_logging: bool = True,
) -> Starlette:
    """Build the demo agent ASGI app.

    ``base_url`` is the absolute URL the app is served at (mount prefix included, e.g.
    ``"http://127.0.0.1:9880/agent"``); every link in the documents is built from it. Callers'
    DIDs are resolved only through ``did_resolver``: a local table, or a
    :class:`~example_app.demo_agent.resolvers.LoopbackHttpDidResolver` to fetch each caller's DID
    document from the address the DID names, as a real agent would. Without JWT keys an EC
    P-256 pair is made (tokens then die with the app); with only a private key the public half
    is derived.
    ``agent_did`` defaults to a did:wba derived from ``base_url`` (informational only).
    """
    normalised = _normalise_base_url(base_url)
    if tame_anp_logging:
        quiet_anp_logging()
    verifier = LocalDidWbaVerifier(
        did_resolver, jwt_keys=JwtKeys.from_pems(jwt_private_key_pem, jwt_public_key_pem)
    )
    agent = _DemoAgent(
        base_url=normalised,
        verifier=verifier,
        agent_did=agent_did or _did_from_base_url(normalised),
        name=name,
    )
    app = Starlette(
        routes=[
            Route("/ad.json", agent.get_ad, methods=["GET"]),
            Route("/api/openrpc.json", agent.get_openrpc, methods=["GET"]),
            Route("/info.json", agent.get_info, methods=["GET"]),
            Route("/hotels.json", agent.get_hotels, methods=["GET"]),
            Route("/rpc", agent.post_rpc, methods=["POST"]),
        ]
    )
    app.state.demo_agent_base_url = normalised
    app.state.demo_agent_did = agent.agent_did
    app.state.demo_agent_verifier = verifier
    return app
