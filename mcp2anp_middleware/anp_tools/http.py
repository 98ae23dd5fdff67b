"""Outgoing ANP HTTP: one pooled client per process, signed per session, bounded by policy.

anp's crawler opens a new connection (a new aiohttp session) per request, with a fixed 30 s timeout,
no size limit and redirects followed blindly. Here all sessions share one pooled aiohttp session
(keep-alive connections are reused across calls and sessions), every request is signed with the
session's own :class:`SessionSigner`, each redirect hop is re-checked against the
:class:`URLPolicy`, and response bodies are read up to the policy's size limit.

The URL signed and sent is exactly the one the policy returned: it goes to aiohttp as an already
encoded ``yarl.URL`` (nothing re-encodes it), and a URL that yarl would read with another host or
port than the policy checked is refused. JSON bodies are parsed only through
:func:`~.anp_documents.parse_json`, and header values that reach a tool result are made valid text.
"""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_module
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from yarl import URL

from mcp2anp_middleware.anp_tools.documents import parse_json
from mcp2anp_middleware.anp_tools.errors import ANPToolError
from mcp2anp_middleware.anp_tools.signing import SessionSigner
from mcp2anp_middleware.anp_tools.url_policy import URLPolicy

_REDIRECTS = {301, 302, 303, 307, 308}

POOL_IDLE_SECONDS = 4.0
"""How long a pooled connection may sit idle and still be reused: under the 5 s after which
uvicorn and Node servers close an idle keep-alive connection themselves (aiohttp's default is
15 s). A pool that reused it later could send a call on a connection the agent is closing at
that moment, which fails (``ServerDisconnectedError``, aiohttp retries only idempotent
requests, so an ``anp_invokeOpenRPC`` POST fails ``UNREACHABLE``); under load the pool notices
the close late, so that is no rare race. This narrows it, it does not close it: servers with a
shorter keep-alive (gunicorn's default is 2 s) can still race. Opening a connection again costs
a round trip (a TLS handshake too), and only after 4 s without a call to that agent."""


@dataclass(frozen=True, slots=True)
class HttpResult:
    url: str
    status: int
    content_type: str
    body: bytes
    location: str = ""

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON: ``ValueError`` if it is not JSON, ``ANPToolError``
        (``RESPONSE_TOO_DEEP``) if it nests too deep; see :func:`parse_json`."""
        return parse_json(self.body, url=self.url)


class ANPHttpClient:
    """Signed, policy-bounded HTTP for the ANP tools, over one pooled aiohttp session.

    aiohttp rather than httpx: its per-request cost on a kept-alive connection is about a third of
    httpx's here, which is most of a tool call's HTTP time. The session is created on first use,
    on the loop that serves requests, and closed by :meth:`aclose` (the toolkit's service does it
    at shutdown).
    """

    def __init__(
        self,
        policy: URLPolicy | None = None,
        *,
        ssl: ssl_module.SSLContext | bool = True,
        max_connections: int = 100,
    ) -> None:
        self.policy = policy if policy is not None else URLPolicy()
        self._ssl = ssl
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=self._connector(),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self.policy.connect_timeout,
                    sock_read=self.policy.timeout,
                ),
                auto_decompress=False,  # bodies are requested uncompressed; never inflate them
                trust_env=False,
            )
        return self._session

    def _connector(self) -> aiohttp.TCPConnector:
        """The connection pool: kept-alive connections shared by every session's calls."""
        return aiohttp.TCPConnector(
            limit=self._max_connections,
            ssl=self._ssl,
            ttl_dns_cache=60,
            keepalive_timeout=POOL_IDLE_SECONDS,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self, signer: SessionSigner, method: str, url: str, *, json_body: Any = None
    ) -> HttpResult:
        body = None if json_body is None else _json_bytes(json_body)
        first_url = url
        try:
            # One deadline for the whole exchange, redirects included: the client's own timeouts
            # bound each read, so an agent dripping bytes could otherwise hold a call for long.
            async with asyncio.timeout(self.policy.timeout):
                for _ in range(self.policy.max_redirects + 1):
                    url = await self.policy.check(url)  # from here on, the URL as sent
                    result = await self._signed_exchange(signer, method, url, body)
                    if result.status not in _REDIRECTS:
                        return result
                    if not result.location:
                        raise ANPToolError("HTTP_ERROR", "redirect without Location", url=url)
                    try:
                        url = urljoin(url, result.location)
                    except ValueError:  # (an unbalanced IPv6 bracket)
                        raise ANPToolError(
                            "HTTP_ERROR", "redirect to a malformed Location", url=url
                        ) from None
                    if result.status == 303:
                        method, body = "GET", None
        except TimeoutError:
            raise ANPToolError("TIMEOUT", f"no answer from {url} in time", url=first_url) from None
        raise ANPToolError("HTTP_ERROR", f"more than {self.policy.max_redirects} redirects")

    async def _signed_exchange(
        self, signer: SessionSigner, method: str, url: str, body: bytes | None
    ) -> HttpResult:
        result, response_headers = await self._send(signer, method, url, body, fresh=False)
        if result.status == 401:
            # A cached bearer token may be stale or belong to another agent: sign afresh once.
            signer.clear_token(url)
            result, response_headers = await self._send(signer, method, url, body, fresh=True)
        if 200 <= result.status < 300:
            signer.update_token(url, response_headers)
        return result

    async def _send(
        self, signer: SessionSigner, method: str, url: str, body: bytes | None, *, fresh: bool
    ) -> tuple[HttpResult, dict[str, str]]:
        headers = signer.headers_for(url, method, body, fresh=fresh)
        headers.setdefault("Accept", "application/json, text/plain;q=0.9, */*;q=0.5")
        # Uncompressed, so the size limit bounds what is held in memory (no gzip bombs).
        headers["Accept-Encoding"] = "identity"
        limit = self.policy.max_response_bytes
        try:
            target = _exact_target(url)  # exactly the URL that was checked and signed
            async with self._http().request(
                method, target, headers=headers, data=body, allow_redirects=False
            ) as response:
                declared = response.content_length
                if declared is not None and declared > limit:
                    raise ANPToolError(
                        "RESPONSE_TOO_LARGE", f"response larger than {limit} bytes", url=url
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > limit:
                        raise ANPToolError(
                            "RESPONSE_TOO_LARGE", f"response larger than {limit} bytes", url=url
                        )
                    chunks.append(chunk)
                status = response.status
                response_headers = {k.lower(): v for k, v in response.headers.items()}
        except TimeoutError:
            raise ANPToolError("TIMEOUT", f"no answer from {url} in time", url=url) from None
        except (aiohttp.InvalidURL, UnicodeError, ValueError):
            raise ANPToolError("URL_REFUSED", "URL cannot be used", url=url) from None
        except aiohttp.ClientError as exc:
            raise ANPToolError(
                "UNREACHABLE", f"cannot reach {url}: {type(exc).__name__}", url=url
            ) from None
        result = HttpResult(
            url=url,
            status=status,
            content_type=_header_text(response_headers.get("content-type", "")),
            body=b"".join(chunks),
            location=_header_text(response_headers.get("location", "")),
        )
        return result, response_headers


def _json_bytes(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON; a string that is not valid Unicode (a lone surrogate) is
    the caller's bad argument, not a crash."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ANPToolError(
            "INVALID_ARGUMENT", "params hold a string that is not valid Unicode"
        ) from None


def _exact_target(url: str) -> URL:
    """``url`` as a yarl URL that aiohttp sends byte for byte (``encoded=True``: no re-encoding,
    so no character the policy refused or encoded can come back).

    yarl parses the authority itself; should it ever read another host or port than
    ``urlsplit`` (which the policy checked), the URL is refused rather than sent elsewhere.
    """
    target = URL(url, encoded=True)
    checked = urlsplit(url)
    if (target.raw_host or "").lower() != (checked.hostname or "").lower() or (
        target.explicit_port != checked.port
    ):
        raise ANPToolError("URL_REFUSED", "URL is read differently by the HTTP client", url=url)
    return target


def _header_text(value: str) -> str:
    """A response header value as valid text.

    aiohttp keeps header bytes that are not UTF-8 as lone surrogates (``surrogateescape``), which
    cannot be encoded into a tool result; they become U+FFFD like undecodable body bytes do.
    """
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
