"""Outgoing ANP HTTP: one pooled client per process, signed per session, bounded by policy.

anp's crawler opens a new connection (a new aiohttp session) per request, with a fixed 30 s timeout,
no size limit and redirects followed blindly. Here all sessions share one ``httpx.AsyncClient``
(keep-alive connections are reused across calls and sessions), every request is signed with the
session's own :class:`SessionSigner`, each redirect hop is re-checked against the
:class:`URLPolicy`, and response bodies are read up to the policy's size limit.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpx

from .anp_errors import ANPToolError
from .anp_signing import SessionSigner
from .url_policy import URLPolicy

_REDIRECTS = {301, 302, 303, 307, 308}


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
        return json.loads(self.body)


class ANPHttpClient:
    def __init__(
        self,
        policy: URLPolicy | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        self.policy = policy if policy is not None else URLPolicy()
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(self.policy.timeout, connect=self.policy.connect_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self, signer: SessionSigner, method: str, url: str, *, json_body: Any = None
    ) -> HttpResult:
        body = (
            None
            if json_body is None
            else json.dumps(json_body, separators=(",", ":"), ensure_ascii=False).encode()
        )
        first_url = url
        try:
            # One deadline for the whole exchange, redirects included: httpx's own timeouts
            # bound each read, so an agent dripping bytes could otherwise hold a call for long.
            async with asyncio.timeout(self.policy.timeout):
                for _ in range(self.policy.max_redirects + 1):
                    await self.policy.check(url)
                    result = await self._signed_exchange(signer, method, url, body)
                    if result.status not in _REDIRECTS:
                        return result
                    if not result.location:
                        raise ANPToolError("HTTP_ERROR", "redirect without Location", url=url)
                    url = urljoin(url, result.location)
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
            async with self._client.stream(method, url, headers=headers, content=body) as response:
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise ANPToolError(
                        "RESPONSE_TOO_LARGE", f"response larger than {limit} bytes", url=url
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise ANPToolError(
                            "RESPONSE_TOO_LARGE", f"response larger than {limit} bytes", url=url
                        )
                    chunks.append(chunk)
        except httpx.TimeoutException:
            raise ANPToolError("TIMEOUT", f"no answer from {url} in time", url=url) from None
        except httpx.HTTPError as exc:
            raise ANPToolError(
                "UNREACHABLE", f"cannot reach {url}: {type(exc).__name__}", url=url
            ) from None
        except (httpx.InvalidURL, UnicodeError, ValueError):
            raise ANPToolError("URL_REFUSED", "URL cannot be used", url=url) from None
        result = HttpResult(
            url=url,
            status=response.status_code,
            content_type=response.headers.get("content-type", ""),
            body=b"".join(chunks),
            location=response.headers.get("location", ""),
        )
        return result, dict(response.headers)
