"""What the ANP tools may fetch: schemes, hosts, address ranges, sizes and time.

The tools fetch URLs chosen by an LLM, so by default they refuse non-http(s) schemes and hosts that
resolve to private, loopback, link-local or otherwise non-public addresses (SSRF). Deployments that
talk to agents on a private network (and the offline demo) set ``allow_private=True``. Every
redirect hop is checked again. The check resolves the host itself; a host that changes its answer
between this check and the connection (DNS rebinding) is not caught, so pair ``allow_private=False``
with a network-level egress policy where that matters.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .anp_errors import ANPToolError


@dataclass(frozen=True, slots=True)
class URLPolicy:
    allowed_schemes: frozenset[str] = frozenset({"http", "https"})
    allow_private: bool = False
    allowed_hosts: Sequence[str] | None = None
    denied_hosts: Sequence[str] = field(default_factory=tuple)
    max_response_bytes: int = 2 * 1024 * 1024
    connect_timeout: float = 5.0
    timeout: float = 20.0
    max_redirects: int = 3
    max_url_length: int = 2048

    async def check(self, url: str) -> None:
        """Raise :class:`ANPToolError` (URL_REFUSED, UNREACHABLE) unless ``url`` may be fetched."""
        if len(url) > self.max_url_length:
            raise ANPToolError("URL_REFUSED", f"URL longer than {self.max_url_length} characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ANPToolError("URL_REFUSED", "URL cannot be parsed") from None
        scheme = parts.scheme.lower()
        if scheme not in self.allowed_schemes:
            allowed = ", ".join(sorted(self.allowed_schemes))
            raise ANPToolError(
                "URL_REFUSED", f"scheme {scheme or '(none)'!r} not allowed; use {allowed}"
            )
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise ANPToolError("URL_REFUSED", "URL has no host")
        if parts.username or parts.password:
            raise ANPToolError("URL_REFUSED", "URLs with embedded credentials are not allowed")
        if any(_host_matches(host, pattern) for pattern in self.denied_hosts):
            raise ANPToolError("URL_REFUSED", f"host {host} is on the deny list")
        if self.allowed_hosts is not None and not any(
            _host_matches(host, pattern) for pattern in self.allowed_hosts
        ):
            raise ANPToolError("URL_REFUSED", f"host {host} is not on the allow list")
        if self.allow_private:
            return
        for address in await _resolve(host, port or (443 if scheme == "https" else 80)):
            if not address.is_global:
                raise ANPToolError(
                    "URL_REFUSED",
                    f"host {host} resolves to a non-public address; private ranges are not allowed",
                )


def _host_matches(host: str, pattern: str) -> bool:
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("."):
        return host.endswith(pattern) or host == pattern[1:]
    return host == pattern


async def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise ANPToolError("UNREACHABLE", f"cannot resolve host {host}") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
