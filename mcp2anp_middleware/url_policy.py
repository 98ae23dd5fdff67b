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
        denied_names, denied_nets = _split(self.denied_hosts)
        if any(_host_matches(host, pattern) for pattern in denied_names):
            raise ANPToolError("URL_REFUSED", f"host {host} is on the deny list")
        allowed_names, allowed_nets = _split(self.allowed_hosts or ())
        name_allowed = any(_host_matches(host, pattern) for pattern in allowed_names)
        if self.allowed_hosts is not None and not name_allowed and not allowed_nets:
            raise ANPToolError("URL_REFUSED", f"host {host} is not on the allow list")
        if self.allow_private and not denied_nets and (self.allowed_hosts is None or name_allowed):
            return  # nothing left that depends on the address
        addresses = [
            _embedded_ipv4(a) or a
            for a in await _resolve(host, port or (443 if scheme == "https" else 80))
        ]
        if any(a in net for a in addresses for net in denied_nets):
            raise ANPToolError("URL_REFUSED", f"host {host} is on the deny list")
        in_allowed_nets = bool(allowed_nets) and all(
            any(a in net for net in allowed_nets) for a in addresses
        )
        if self.allowed_hosts is not None and not (name_allowed or in_allowed_nets):
            raise ANPToolError("URL_REFUSED", f"host {host} is not on the allow list")
        if not self.allow_private and not all(a.is_global for a in addresses):
            raise ANPToolError(
                "URL_REFUSED",
                f"host {host} resolves to a non-public address; private ranges are not allowed",
            )


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _split(entries: Sequence[str]) -> tuple[list[str], list[IPNetwork]]:
    """Host-list entries: names (``example.com``, ``.example.com``) and IP addresses/networks."""
    names: list[str] = []
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.append(entry)
    return names, networks


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, v4-compatible), so that
    ``[::ffff:127.0.0.1]`` and friends are judged as the IPv4 address they reach."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _V4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _host_matches(host: str, pattern: str) -> bool:
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("."):
        return host.endswith(pattern) or host == pattern[1:]
    return host == pattern


async def _resolve(host: str, port: int) -> list[IPAddress]:
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
