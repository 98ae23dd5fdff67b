"""Reading ANP documents for an agent: parsing them safely, which links to follow next and which
methods it can call, and the per-session document cache.

anp's crawler only collects interfaces from OpenRPC documents and leaves link extraction to the
caller; an agent browsing the ANP network needs both, so :func:`analyse_document` returns the
follow-up links of any JSON document (interfaces of an agent description, OpenRPC servers, other
URLs) and the methods of OpenRPC documents, standalone or embedded.

Everything an agent sends as JSON is parsed by :func:`parse_json`, the one gate between an agent's
bytes and a tool result: nesting deeper than :data:`MAX_JSON_DEPTH` is refused with the stable code
``RESPONSE_TOO_DEEP`` (the MCP SDK's serializer gives up at about 250 levels, and a client's parser
at about 200, with a protocol error instead of a tool error), and strings the agent escaped as half
a UTF-16 pair are treated as not JSON (they cannot be encoded as UTF-8 in the result).

:class:`DocumentCache` keeps the raw bodies of fetched documents, not the parsed objects: their size
is exact (a 2 MiB body of small objects takes some 45 MiB once parsed) and bounded per session, and
all caches of a process also share one :class:`CacheBudget`. A hit parses the body again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import weakref
from collections import OrderedDict
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import urljoin

from mcp2anp_middleware.anp_tools.errors import ANPToolError
from mcp2anp_middleware.sessions.clock import Clock

MAX_LINKS = 100
MAX_JSON_DEPTH = 100
"""Deepest nesting of arrays and objects accepted from an agent (``[[1]]`` is 2 deep).

Far below the 250 or so levels the MCP SDK's serializer accepts (the tool result wraps the agent's
value in up to five more levels on the wire) and the 200 a client's JSON parser may accept, and far
above what real agent descriptions, OpenRPC documents and results use."""

_SKIP_KEYS = {"@context", "$schema"}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(body: bytes, *, url: str) -> Any:
    """The JSON value of an agent's ``body``, fit to go into a tool result.

    Raises ``ValueError`` when the body is not JSON (not decodable, not well-formed, or holding a
    lone UTF-16 surrogate) and :class:`ANPToolError` ``RESPONSE_TOO_DEEP`` when it nests deeper than
    :data:`MAX_JSON_DEPTH`. Cached documents come through here again, so a hit gets the same answer.
    """
    text = body.decode(json.detect_encoding(body))  # strict: undecodable bytes are not JSON
    try:
        value = json.loads(text, parse_constant=_not_json)
    except RecursionError:  # deeper than the interpreter's stack: deeper than the limit too
        raise _too_deep(url) from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise _too_deep(url)
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise ValueError("JSON string with a lone UTF-16 surrogate")
    return value


def _not_json(constant: str) -> Any:
    """``NaN`` and the infinities are not JSON (a result holding one could not be written as
    JSON): such a body is not JSON, as the SDK's own parser says too."""
    raise ValueError(f"{constant} is not JSON")


def _too_deep(url: str) -> ANPToolError:
    return ANPToolError(
        "RESPONSE_TOO_DEEP",
        f"the agent's JSON nests deeper than {MAX_JSON_DEPTH} levels",
        url=url,
        limit=MAX_JSON_DEPTH,
    )


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` arrays/objects; level by level, no recursion."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for container in level:
            for item in container.values() if type(container) is dict else container:
                if type(item) is dict or type(item) is list:
                    below.append(item)
        level = below
    return False


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in ``value`` holds a surrogate code point. Paired
    escapes were already combined by the parser, so any left is a lone one."""
    pending = [value]
    while pending:
        node = pending.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return True
        elif isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return False


def analyse_document(url: str, document: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    links: dict[str, dict[str, Any]] = {}
    methods: list[dict[str, Any]] = []
    _walk(url, document, (), links, methods)
    return list(links.values())[:MAX_LINKS], methods


def _walk(
    base: str,
    node: Any,
    path: tuple[str, ...],
    links: dict[str, dict[str, Any]],
    methods: list[dict[str, Any]],
) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("openrpc"), str) and isinstance(node.get("methods"), list):
            methods.extend(_openrpc_methods(base, node))
        for key, value in node.items():
            if key in _SKIP_KEYS:
                continue
            if isinstance(value, str) and _looks_like_link(key, value):
                try:
                    target = urljoin(base, value)
                except ValueError:  # (an unbalanced IPv6 bracket): not a link to follow
                    continue
                if target not in links and target.split("#")[0] != base.split("#")[0]:
                    links[target] = _describe_link(target, node, path, key)
            else:
                _walk(base, value, (*path, key), links, methods)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            _walk(base, item, (*path, str(index)), links, methods)


def _looks_like_link(key: str, value: str) -> bool:
    if value.startswith(("http://", "https://")):
        return True
    return key in ("url", "href", "uri") and value.startswith(("/", "./", "../"))


def _describe_link(
    target: str, node: dict[str, Any], path: tuple[str, ...], key: str
) -> dict[str, Any]:
    names = [p for p in path if not p.isdigit()]
    if "interfaces" in names:
        kind = "interface"
    elif "servers" in names:
        kind = "jsonrpc-endpoint"
    else:
        kind = "link"
    link: dict[str, Any] = {"url": target, "kind": kind, "at": "/".join((*path, key))}
    for field in ("protocol", "name", "description"):
        if isinstance(node.get(field), str):
            link[field] = node[field]
    return link


def _openrpc_methods(base: str, document: dict[str, Any]) -> list[dict[str, Any]]:
    servers = document.get("servers")
    endpoint = None
    if isinstance(servers, list) and servers and isinstance(servers[0], dict):
        server_url = servers[0].get("url")
        if isinstance(server_url, str):
            with contextlib.suppress(ValueError):  # a malformed URL names no endpoint
                endpoint = urljoin(base, server_url)
    found = []
    for method in document["methods"]:
        if not isinstance(method, dict) or not isinstance(method.get("name"), str):
            continue
        params = []
        listed = method.get("params")
        for param in listed if isinstance(listed, list) else []:
            if isinstance(param, dict) and isinstance(param.get("name"), str):
                params.append(
                    {
                        "name": param["name"],
                        "required": bool(param.get("required", False)),
                        "schema": param.get("schema", {}),
                        **({"description": param["description"]} if "description" in param else {}),
                    }
                )
        entry: dict[str, Any] = {"name": method["name"], "endpoint": endpoint, "params": params}
        for field in ("summary", "description"):
            if isinstance(method.get(field), str):
                entry[field] = method[field]
        found.append(entry)
    return found


# --------------------------------------------------------------------------- document cache

V = TypeVar("V")

DEFAULT_SESSION_CACHE_BYTES = 4 * 1024 * 1024
DEFAULT_PROCESS_CACHE_BYTES = 64 * 1024 * 1024

_tokens = itertools.count()


class _Entry(NamedTuple, Generic[V]):
    stored_at: float
    size: int
    token: int
    value: V


class _Slot(NamedTuple):
    cache: weakref.ref[DocumentCache[Any]]
    key: str
    size: int


class CacheBudget:
    """Bytes all document caches of a process may hold together (each session has its own cache).

    Entries are charged here in the order they were stored, across caches, so that the oldest can
    be dropped first when the budget is full, and expired ones purged without being read again. A
    cache that is dropped (its session ended) stops counting at once: a finalizer releases its
    entries, and an entry whose cache is gone is also released when it reaches the front.
    """

    __slots__ = ("_index", "_lock", "max_bytes", "used")

    def __init__(self, max_bytes: int = DEFAULT_PROCESS_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._index: OrderedDict[int, _Slot] = OrderedDict()
        # Re-entrant: a finalizer may run (garbage collection) in the middle of an update.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._index)

    def purge_expired(self) -> None:
        """Drop expired entries of every cache, oldest first, stopping at the first fresh one."""
        with self._lock:
            while self._index:
                token, slot = next(iter(self._index.items()))
                cache = self._owner(token, slot)
                if cache is None:
                    continue
                if not cache._expired(cache._entries[slot.key]):
                    return
                cache._discard(slot.key)

    def _make_room(self, size: int) -> None:
        """Drop the oldest entries of any cache until ``size`` more bytes fit."""
        while self._index and self.used + size > self.max_bytes:
            token, slot = next(iter(self._index.items()))
            cache = self._owner(token, slot)
            if cache is not None:
                cache._discard(slot.key)

    def _owner(self, token: int, slot: _Slot) -> DocumentCache[Any] | None:
        """The live cache that holds entry ``token``; None (and the entry released) if its cache
        is gone or no longer holds it."""
        cache = slot.cache()
        entry = cache._entries.get(slot.key) if cache is not None else None
        if cache is None or entry is None or entry.token != token:
            self._release(token)
            return None
        return cache

    def _charge(self, token: int, cache: DocumentCache[Any], key: str, size: int) -> None:
        self._index[token] = _Slot(weakref.ref(cache), key, size)
        self.used += size

    def _release(self, token: int) -> None:
        """Stop counting entry ``token``; a second call does nothing, so every path may call it."""
        with self._lock:
            slot = self._index.pop(token, None)
            if slot is not None:
                self.used -= slot.size

    def _release_all(self, entries: OrderedDict[str, _Entry[Any]]) -> None:
        """Finalizer of a dropped cache: release what it still held."""
        with self._lock:
            for entry in list(entries.values()):
                self._release(entry.token)


PROCESS_CACHE_BUDGET = CacheBudget()
"""The budget every :class:`ANPToolkit` shares unless it is given its own."""


class DocumentCache(Generic[V]):
    """One session's cache: at most ``max_entries`` entries and ``max_bytes`` bytes, each kept
    ``ttl`` seconds, all charged to the process-wide ``budget``.

    Sizes are given by the caller and must cover what an entry really holds (raw bytes, not parsed
    objects). Every store first purges expired entries, of this cache and, oldest first, of all
    caches; an entry larger than either budget is not stored (and evicts nothing).
    """

    __slots__ = (
        "__weakref__",
        "_entries",
        "budget",
        "clock",
        "max_bytes",
        "max_entries",
        "ttl",
        "used",
    )

    def __init__(
        self,
        *,
        ttl: float,
        max_entries: int,
        max_bytes: int,
        budget: CacheBudget,
        clock: Clock,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.budget = budget
        self.clock = clock
        self.used = 0
        # Oldest first: entries are only ever added at the end, so expiry purges from the front.
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        finalizer = weakref.finalize(self, budget._release_all, self._entries)
        finalizer.atexit = False

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> V | None:
        """The fresh value stored under ``key``, or None (an expired one is dropped)."""
        with self.budget._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self._expired(entry):
                self._discard(key)
                return None
            return entry.value

    def put(self, key: str, value: V, size: int) -> bool:
        """Store ``value`` (``size`` bytes) under ``key``; False when it is not kept."""
        with self.budget._lock:
            self._discard(key)
            self.purge_expired()
            self.budget.purge_expired()
            if self.max_entries <= 0 or size > self.max_bytes or size > self.budget.max_bytes:
                return False
            while self._entries and (
                len(self._entries) >= self.max_entries or self.used + size > self.max_bytes
            ):
                self._discard(next(iter(self._entries)))
            self.budget._make_room(size)
            token = next(_tokens)
            self._entries[key] = _Entry(self.clock(), size, token, value)
            self.used += size
            self.budget._charge(token, self, key, size)
            return True

    def purge_expired(self) -> None:
        """Drop this cache's expired entries, oldest first: O(number expired)."""
        with self.budget._lock:
            while self._entries:
                key, entry = next(iter(self._entries.items()))
                if not self._expired(entry):
                    return
                self._discard(key)

    def clear(self) -> None:
        with self.budget._lock:
            while self._entries:
                self._discard(next(iter(self._entries)))

    def _expired(self, entry: _Entry[Any]) -> bool:
        return self.clock() - entry.stored_at > self.ttl

    def _discard(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used -= entry.size
            self.budget._release(entry.token)
