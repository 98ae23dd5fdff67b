"""Offline demo ANP agent: a pure Starlette app that checks DID WBA signatures for real.

Public API
==========
``create_demo_agent(*, base_url, did_resolver, jwt_private_key_pem=None, jwt_public_key_pem=None,
agent_did=None, name=..., tame_anp_logging=True) -> Starlette``

    ``base_url`` is where the app is served, mount prefix included (``"http://127.0.0.1:9880/agent"``);
    every document link is built from it. Routes, relative to the app:

    * ``GET /ad.json`` - agent description (``@type: ad:AgentDescription``, ``did``, one
      ``ad:StructuredInterface`` pointing at ``/api/openrpc.json``, ``informations`` links to
      ``/info.json`` and ``/hotels.json``).
    * ``GET /api/openrpc.json`` - OpenRPC 1.3.2, ``servers[0].url == base_url + "/rpc"``.
    * ``GET /info.json``, ``GET /hotels.json`` - small public documents.
    * ``POST /rpc`` - JSON-RPC 2.0; needs a DID WBA signature (RFC 9421 or legacy ``DIDWba``) or
      the bearer token the agent issued. Failure: HTTP 401 + ``{"error": {"code": -32001, ...}}``
      + ``WWW-Authenticate`` (anp's challenge when it produced one). Documents need no auth.

    Methods: ``echo(message)`` -> ``{message, caller_did}``; ``whoami()`` -> ``{did,
    auth_scheme}``; ``add(a, b)`` -> number; ``search_hotels(city, max_price?)`` -> ``{city,
    max_price, count, hotels}``; ``fail(code, message, http_status=400)`` -> that error with
    ``data`` on HTTP ``http_status``. Params by name or position. Errors: -32700 (HTTP 400),
    -32600 incl. batches (HTTP 400), -32601 / -32602 with ``data`` (HTTP 200, so anp's client,
    which drops bodies of non-200 answers, can read them), notifications -> 204.

``DidResolver`` = ``async (did) -> dict | None``; ``StaticDidResolver(mapping)`` (+ ``add(doc)``),
``DirectoryDidResolver(directory)`` (``*.json`` and ``**/did.json``, matched by ``id``), and
``LoopbackHttpDidResolver()``: real did:wba resolution (``did:wba:localhost%3A9880:users:alice``
-> ``GET http://localhost:9880/users/alice/did.json``, ``/.well-known/did.json`` without a path)
that refuses any non-loopback host before connecting; the host examples and the launcher use it,
so the caller's DID document comes from the host app (``ANPMiddleware`` serves it).
``create_demo_identity(directory, name, port=...)`` writes a test identity;
``LocalDidWbaVerifier`` / ``JwtKeys`` are the building blocks.

anp 1.0.7 facts this relies on (checked by reading the source and by tests/test_demo_agent.py)
=============================================================================================
Server side, ``DidWbaVerifier(DidWbaVerifierConfig(jwt_private_key=, jwt_public_key=,
jwt_algorithm="RS256"))``; ``await verify_request(method, url, headers, body)``:

* ``Authorization: Bearer <jwt>`` -> checks the JWT (``sub`` = DID, ``iat``, ``exp``) with the
  public key; result ``{"did", "auth_scheme": "bearer", "response_headers": {}}``.
* ``Signature-Input`` / ``Signature`` present -> RFC 9421: ``keyid`` = ``<did>#key-1``, resolve DID,
  id match, e1/k1 binding, key must be in ``authentication``, signature over ``@method``,
  ``@target-uri`` (the exact URL string), ``@authority``, ``content-digest`` (checked against the
  body), ``created``/``expires`` within 5 min, nonce required and single-use per verifier instance.
* otherwise ``Authorization: DIDWba v="1.1", did=, nonce=, timestamp=, verification_method=,
  signature=`` (legacy): signs only ``{nonce, timestamp, aud: <hostname>, did}``, not the method,
  path or body.
* success after a signature -> a JWT and ``response_headers`` = ``Authentication-Info:
  access_token="...", token_type="Bearer", expires_in=3600`` and ``Authorization: Bearer ...``;
  this app copies them onto the response. Errors raise ``DidWbaVerifierError(status_code,
  headers)`` with a ``WWW-Authenticate: DIDWba realm=..., error=...`` challenge and
  ``Accept-Signature``; anp uses 403 for a few cases, this app always answers 401.
* Resolution: the two handlers call module globals ``resolve_did_wba_document`` (did:wba, https
  ``/<path>/did.json`` or ``/.well-known/did.json``) and ``resolve_did_document`` (did:web). No hook
  exists; see :mod:`.verifier` for the per-instance redirection used here (no global patch).

Client side, ``DIDWbaAuthHeader(did_document_path, private_key_path,
auth_mode="http_signatures" | "legacy_didwba" | "auto")``:

* ``get_auth_header(server_url, force_new=False, method="GET", headers=None, body=None) -> dict``
  returns ``{"Authorization": "Bearer ..."}`` when a token is cached for the URL's host, else
  ``Signature-Input`` + ``Signature`` (+ ``Content-Digest`` when there is a body; sign the exact
  bytes you send and the exact URL). Legacy mode returns ``{"Authorization": "DIDWba ..."}``.
* ``update_token(server_url, response_headers)`` stores the token from ``Authentication-Info`` (or
  ``Authorization: Bearer``) under ``urlparse(url).netloc.split(":")[0]``: the PORT IS IGNORED, so
  two agents on one host share one cached token (a foreign token gets 401).
* ``clear_token(url)``, ``should_retry_after_401(headers)``, ``get_challenge_auth_header(url,
  response_headers, method, headers, body)`` (signs again using the server's ``Accept-Signature``
  and nonce, if any). The private key PEM is re-read on every signature; the DID document is
  cached after the first read. The keyid is the first entry of ``authentication`` (``#key-1``).

``create_did_wba_document(hostname="localhost", port=9880, path_segments=["agents", "alice"])``
returns ``(did_document, keys)`` with ``keys = {"key-1": (private_pem, public_pem), "key-2": ...,
"key-3": ...}`` (bytes; key-1 = Ed25519 authentication key in the default "e1" profile, key-2/3 =
E2EE keys). The DID is ``did:wba:localhost%3A9880:agents:alice:e1_<multikey fingerprint>`` (port
percent-encoded, fingerprint segment appended, which the verifier checks). IP hostnames raise
``ValueError``.

``ANPCrawler(did_document_path, private_key_path)`` -> ``ANPClient`` -> ``DIDWbaAuthHeader`` in the
default ``http_signatures`` mode: every request (GETs of documents too) is signed with the exact
URL, method and the compact JSON body (``separators=(",", ":")``) it sends; 200 answers feed
``update_token``; on 401 it drops a bearer token (or honours a DID challenge) and retries once with
a fresh signature. ``execute_json_rpc`` therefore works against this agent unchanged.

Logging: anp logs at INFO through ``anp.*`` module loggers and through the root logger
(``DIDWbaAuthHeader``, ``create_did_wba_document``; legacy ``generate_auth_header`` logs the whole
Authorization header at DEBUG). ``create_demo_agent`` raises the ``anp`` logger to WARNING if the
application left it unset; the agent itself logs caller DIDs and method names, never tokens, keys,
signatures or bodies. Note that httpcore's DEBUG trace logs response headers, bearer tokens
included, on the client side.
"""

from .app import DEFAULT_AGENT_NAME, create_demo_agent, quiet_anp_logging
from .identity import DemoIdentity, create_demo_identity
from .resolvers import (
    DidDocument,
    DidResolver,
    DirectoryDidResolver,
    LoopbackHttpDidResolver,
    StaticDidResolver,
    did_wba_document_url,
    is_loopback_did,
)
from .verifier import AuthenticationFailed, JwtKeys, LocalDidWbaVerifier, VerifiedCaller

__all__ = [
    "DEFAULT_AGENT_NAME",
    "AuthenticationFailed",
    "DemoIdentity",
    "DidDocument",
    "DidResolver",
    "DirectoryDidResolver",
    "JwtKeys",
    "LocalDidWbaVerifier",
    "LoopbackHttpDidResolver",
    "StaticDidResolver",
    "VerifiedCaller",
    "create_demo_agent",
    "create_demo_identity",
    "did_wba_document_url",
    "is_loopback_did",
    "quiet_anp_logging",
]
