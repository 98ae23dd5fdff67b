"""Store URLs to redis-py clients: one Redis, a master behind Sentinel, or a Redis Cluster.

- ``redis://``, ``rediss://``, ``unix://``: redis-py's own ``from_url``, unchanged.
- ``redis+sentinel://[user:password@]h1:p1,h2:p2/service[/db]``: the sentinels to ask, the
  service (``sentinel monitor`` name) whose master to use; the password is the master's.
  A ``sentinel_password`` query option is for sentinels that require one.
- ``redis+cluster://[user:password@]host:port``: one seed node; the client discovers the rest.

Both HA forms take ``wait_replicas`` (default 1) and ``wait_timeout`` (milliseconds, default
500) query options: the durability the store asks of Redis, see :mod:`.redis`. They exist as
URL options because the URL is what a deployment changes; the code reads them in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
HA_DEFAULT_WAIT_REPLICAS = 1
HA_DEFAULT_WAIT_TIMEOUT_MS = 500

AnyRedis = aioredis.Redis | RedisCluster


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A client plus the durability to ask of it (0 replicas: do not wait)."""

    client: AnyRedis
    wait_replicas: int = 0
    wait_timeout_ms: int = HA_DEFAULT_WAIT_TIMEOUT_MS


def is_ha_url(url: str) -> bool:
    return urlsplit(url).scheme in (SENTINEL_SCHEME, CLUSTER_SCHEME)


def _hosts(netloc: str) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"expected host:port, got {item!r}")
        hosts.append((host.strip("[]") or "localhost", int(port)))
    if not hosts:
        raise ValueError("no host given")
    return hosts


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    if not colon:  # redis://password@host, as redis-py reads it
        return None, unquote(user) or None
    return unquote(user) or None, unquote(password) or None


def _int_option(options: dict[str, list[str]], name: str, default: int) -> int:
    values = options.get(name)
    if not values:
        return default
    try:
        value = int(values[-1])
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {values[-1]!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


def parse_ha_url(url: str) -> tuple[str, list[tuple[str, int]], dict[str, Any]]:
    """``(scheme, hosts, details)`` of a Sentinel or Cluster URL; ``ValueError`` when malformed.

    Separate from :func:`connect` so the launcher can check a URL (and name its hosts) without
    building a client."""
    parts = urlsplit(url)
    if parts.scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise ValueError(f"not a Sentinel or Cluster URL: {parts.scheme}://")
    hosts = _hosts(parts.netloc)
    username, password = _credentials(parts.netloc)
    options = parse_qs(parts.query)
    details: dict[str, Any] = {
        "username": username,
        "password": password,
        "wait_replicas": _int_option(options, "wait_replicas", HA_DEFAULT_WAIT_REPLICAS),
        "wait_timeout_ms": _int_option(options, "wait_timeout", HA_DEFAULT_WAIT_TIMEOUT_MS),
    }
    path = [segment for segment in parts.path.split("/") if segment]
    if parts.scheme == SENTINEL_SCHEME:
        if not path or len(path) > 2:
            raise ValueError("a Sentinel URL names its service: redis+sentinel://h:p,.../service")
        details["service"] = unquote(path[0])
        details["db"] = int(path[1]) if len(path) == 2 and path[1].isdigit() else 0
        if len(path) == 2 and not path[1].isdigit():
            raise ValueError(f"database must be a number, got {path[1]!r}")
        sentinel_password = options.get("sentinel_password")
        details["sentinel_password"] = sentinel_password[-1] if sentinel_password else None
    else:
        if path:
            raise ValueError("a Cluster URL has no path (a cluster has only database 0)")
        if len(hosts) != 1:
            raise ValueError("a Cluster URL names one seed node: redis+cluster://host:port")
    return parts.scheme, hosts, details


def connect(url: str, *, timeout: float) -> RedisTarget:
    """A client for ``url`` (text replies), with ``timeout`` for connecting and each reply."""
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": True,
    }
    if not is_ha_url(url):
        single = aioredis.Redis.from_url(url, health_check_interval=15, **common)
        return RedisTarget(single)
    scheme, hosts, details = parse_ha_url(url)
    credentials = {"username": details["username"], "password": details["password"]}
    if scheme == SENTINEL_SCHEME:
        sentinel_kwargs = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "password": details["sentinel_password"],
        }
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        master: aioredis.Redis = sentinel.master_for(
            details["service"],
            redis_class=aioredis.Redis,
            db=details["db"],
            health_check_interval=15,
            **credentials,
            **common,
        )
        client: AnyRedis = master
    else:
        host, port = hosts[0]
        client = RedisCluster(host=host, port=port, **credentials, **common)
    return RedisTarget(client, details["wait_replicas"], details["wait_timeout_ms"])


__all__ = ["RedisTarget", "connect", "is_ha_url", "parse_ha_url"]
