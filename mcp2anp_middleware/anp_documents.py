"""Reading ANP documents for an agent: which links to follow next and which methods it can call.

anp's crawler only collects interfaces from OpenRPC documents and leaves link extraction to the
caller; an agent browsing the ANP network needs both, so :func:`analyse_document` returns the
follow-up links of any JSON document (interfaces of an agent description, OpenRPC servers, other
URLs) and the methods of OpenRPC documents, standalone or embedded.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

MAX_LINKS = 100
_SKIP_KEYS = {"@context", "$schema"}


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
                target = urljoin(base, value)
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
            endpoint = urljoin(base, server_url)
    found = []
    for method in document["methods"]:
        if not isinstance(method, dict) or not isinstance(method.get("name"), str):
            continue
        params = []
        for param in method.get("params") or []:
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
