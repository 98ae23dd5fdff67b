"""The Django project's own middleware: adds ``X-Host: django`` to its responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from django.utils.decorators import async_only_middleware  # type: ignore[import-untyped]


@async_only_middleware  # type: ignore[untyped-decorator]
def host_header(
    get_response: Callable[[Any], Awaitable[Any]],
) -> Callable[[Any], Awaitable[Any]]:
    async def middleware(request: Any) -> Any:
        response = await get_response(request)
        response["X-Host"] = "django"
        return response

    return middleware
