"""What the ANP tools may fetch: schemes, hosts, address ranges, sizes and time.

The tools fetch URLs chosen by an LLM, so by default they refuse non-http(s) schemes and hosts that
resolve to private, loopback, link-local or otherwise non-public addresses (SSRF). Deployments that
talk to agents on a private network (and the offline demo) set ``allow_private=True``. Every
redirect hop is checked again. The check resolves the host itself; a host that changes its answer
between this check and the connection (DNS rebinding) is not caught, so pair ``allow_private=False``
with a network-level egress policy where that matters.

The check also decides the exact URL that goes on the wire: the HTTP client sends it as given
(nothing re-encodes it), so whitespace and control characters, which would split or extend the
request line (``GET /a X-Injected: 1 HTTP/1.1``), are refused here, and the few other characters a
request target may not carry raw (non-ASCII, ``"<>\\^`{|}[]``) are percent-encoded. The URL that
:meth:`URLPolicy.check` returns is the one signed and sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

from mcp2anp_middleware.anp_tools.errors import ANPToolError


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
    private_origins: Sequence[str] = field(default_factory=tuple)
    """Exact origins (``http://127.0.0.1:9880``: scheme, host and port), optionally with a path
    prefix (``http://127.0.0.1:9880/agent/``), that may be reached even though they resolve to
    private addresses, without opening every private range: an agent of your own on loopback or
    the LAN, next to ``allow_private=False``."""

    async def check(self, url: str) -> str:
        """Return the URL to send for ``url``, or raise :class:`ANPToolError` (URL_REFUSED,
        UNREACHABLE) if it may not be fetched.

        The returned URL is ``url`` itself unless some character had to be percent-encoded; callers
        must sign and send the returned URL, not the one they passed in.
        """
        if len(url) > self.max_url_length:
            raise ANPToolError("URL_REFUSED", f"URL longer than {self.max_url_length} characters")
        _refuse_unsafe_characters(url)
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
        _refuse_malformed_host(host)
        target = _encode_target(url, parts)
        if len(target) > self.max_url_length:
            raise ANPToolError(
                "URL_REFUSED",
                f"URL longer than {self.max_url_length} characters once percent-encoded",
            )
        denied_names, denied_nets = _split(self.denied_hosts)
        if any(_host_matches(host, pattern) for pattern in denied_names):
            raise ANPToolError("URL_REFUSED", f"host {host} is on the deny list")
        allowed_names, allowed_nets = _split(self.allowed_hosts or ())
        name_allowed = any(_host_matches(host, pattern) for pattern in allowed_names)
        if self.allowed_hosts is not None and not name_allowed and not allowed_nets:
            raise ANPToolError("URL_REFUSED", f"host {host} is not on the allow list")
        allow_private = self.allow_private or _origin_listed(parts, self.private_origins)
        if allow_private and not denied_nets and (self.allowed_hosts is None or name_allowed):
            return target  # nothing left that depends on the address
        resolved = await _resolve(host, port or (443 if scheme == "https" else 80))
        views = [(address, _embedded_ipv4s(address)) for address in resolved]
        if any(
            _in_any(view, denied_nets)
            for address, embedded in views
            for view in (address, *embedded)
        ):
            raise ANPToolError("URL_REFUSED", f"host {host} is on the deny list")
        in_allowed_nets = bool(allowed_nets) and all(
            _in_any(address, allowed_nets)
            or (bool(embedded) and all(_in_any(view, allowed_nets) for view in embedded))
            for address, embedded in views
        )
        if self.allowed_hosts is not None and not (name_allowed or in_allowed_nets):
            raise ANPToolError("URL_REFUSED", f"host {host} is not on the allow list")
        if not allow_private and not all(_is_public(a, e) for a, e in views):
            raise ANPToolError(
                "URL_REFUSED",
                f"host {host} resolves to a non-public address; private ranges are not allowed",
            )
        return target


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_listed(url: SplitResult, origins: Sequence[str]) -> bool:
    """True when ``url`` is at one of ``origins``: same scheme, host and port (default ports filled
    in) and, for an entry with a path, under that path with no dot segments to climb out of it."""
    if not origins:
        return False
    wanted = _origin_of(url)
    for origin in origins:
        try:
            listed = urlsplit(origin)
            if _origin_of(listed) != wanted:
                continue
        except ValueError:
            continue
        prefix = listed.path
        if prefix in ("", "/"):
            return True
        segments = unquote(url.path).split("/")
        if url.path.startswith(prefix) and "." not in segments and ".." not in segments:
            return True
    return False


def _origin_of(url: SplitResult) -> tuple[str, str, int | None]:
    scheme = url.scheme.lower()
    host = (url.hostname or "").lower().rstrip(".")
    return scheme, host, url.port or _DEFAULT_PORTS.get(scheme)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 ranges whose addresses carry an IPv4 address in their low 32 bits.
_LOW_32_FORMS = (
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, RFC 2765)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated; includes :: and ::1)
)
# Local-use NAT64 (RFC 8215): never global, and the IPv4 address may sit where any RFC 6052 prefix
# length inside it puts it.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")

# Characters a URL may contain raw in its path, query and fragment (RFC 3986 pchar, "/", "?", and
# "%" so that existing escapes stay as they are); everything else is percent-encoded.
_TARGET_SAFE = "!$&'()*+,;=:@/?%"
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_ASCII_UNSAFE = re.compile(r"[\x00-\x20\x7f]")
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})


def _refuse_unsafe_characters(url: str) -> None:
    """Refuse whitespace and control characters anywhere in ``url``.

    Raw, they would end up in the request line (a space ends the target and starts what the server
    takes for the protocol; CR/LF start new headers), and ``urlsplit`` silently drops some of them
    (tab, CR, LF, leading spaces), so the URL checked would not be the URL sent. Unicode separators,
    format characters and lone surrogates are refused too: they are invisible or cannot be encoded.
    """
    match = _ASCII_UNSAFE.search(url)
    bad = match.group() if match else None
    if bad is None and not url.isascii():
        bad = next(
            (ch for ch in url if unicodedata.category(ch) in _UNSAFE_CATEGORIES and ord(ch) > 127),
            None,
        )
    if bad is not None:
        raise ANPToolError(
            "URL_REFUSED",
            f"URL contains whitespace or control characters (U+{ord(bad):04X} at position "
            f"{url.index(bad)}); percent-encode them",
        )


def _refuse_malformed_host(host: str) -> None:
    """Refuse hosts that are neither an IP address nor a plain ASCII DNS name.

    Anything else (``\\``, ``%``, quotes, non-ASCII) is read differently by different URL parsers
    and resolvers, so the host checked here might not be the host connected to.
    """
    if not host.isascii():
        raise ANPToolError(
            "URL_REFUSED",
            "host name is not ASCII; give an internationalised name in its IDNA (xn--) form",
        )
    if _HOST_NAME.fullmatch(host):
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ANPToolError("URL_REFUSED", f"host {host!r} is not a valid host name") from None


def _encode_target(url: str, parts: SplitResult) -> str:
    """``url`` with the characters its path, query and fragment may not carry raw (non-ASCII as
    UTF-8, ``"<>\\^`{|}[]``, a second ``#``) percent-encoded; ``url`` itself when there are none."""
    path, query, fragment = (
        quote(component, safe=_TARGET_SAFE)
        for component in (parts.path, parts.query, parts.fragment)
    )
    if (path, query, fragment) == (parts.path, parts.query, parts.fragment):
        return url
    return urlunsplit(parts._replace(path=path, query=query, fragment=fragment))


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


def _embedded_ipv4s(address: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries, so that ``[::ffff:127.0.0.1]`` and friends are
    judged as the IPv4 address they reach.

    IPv4-mapped, IPv4-compatible, SIIT and NAT64 (RFC 6052 well-known prefix) carry it in the low 32
    bits; 6to4 in bits 16-47; Teredo carries two (the server, and the client inverted), and both
    are reachable through it. Local-use NAT64 (RFC 8215) may use any RFC 6052 prefix length, so
    every position it allows is returned. Empty for addresses that embed nothing.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    value = int(address)
    if any(address in network for network in _LOW_32_FORMS):
        return (ipaddress.IPv4Address(value & 0xFFFFFFFF),)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo
    if address in _LOCAL_NAT64:
        candidates = (
            ((value >> 64) & 0xFFFF) << 16 | (value >> 40) & 0xFFFF,  # /48
            ((value >> 64) & 0xFF) << 24 | (value >> 32) & 0xFFFFFF,  # /56
            (value >> 24) & 0xFFFFFFFF,  # /64
            value & 0xFFFFFFFF,  # /96
        )
        return tuple(ipaddress.IPv4Address(c) for c in dict.fromkeys(candidates))
    return ()


def _is_public(address: IPAddress, embedded: tuple[ipaddress.IPv4Address, ...]) -> bool:
    """Whether ``address`` may be fetched without ``allow_private``.

    An address that embeds IPv4 is judged by what it embeds (Python's tables for the IPv6 forms
    themselves differ between versions and say nothing about the destination); local-use NAT64 is
    not global by definition.
    """
    if address in _LOCAL_NAT64:
        return False
    if embedded:
        return all(view.is_global for view in embedded)
    return address.is_global


def _in_any(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in networks)


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
    except UnicodeError:  # (the IDNA codec: an empty label, or one longer than 63 characters)
        raise ANPToolError("URL_REFUSED", "malformed host name") from None
    except OSError:
        raise ANPToolError("UNREACHABLE", f"cannot resolve host {host}") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
