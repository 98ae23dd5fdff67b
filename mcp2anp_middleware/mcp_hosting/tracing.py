"""The SDK's OpenTelemetry spans, made only when something records them.

The SDK wraps every request in a span (:class:`mcp.server._otel.OpenTelemetryMiddleware`, first
in ``Server.middleware``). With only the OpenTelemetry API installed and no tracer provider set,
every span is a non-recording one, yet building it (attributes, the trace context extracted from
``_meta``, attaching and detaching it as the current context) was about a tenth of the SDK's
cost per request. :class:`SpansWhenTraced` takes its place: while the global tracer provider is
the API's placeholder it passes the request straight on; once a provider is installed (at any
time with ``trace.set_tracer_provider``, or by ``OTEL_PYTHON_TRACER_PROVIDER`` set when the
middleware is made) it makes the SDK's span exactly as before.

Being the link of the chain every request passes anyway, it is also where a repeated
``initialize`` is answered from what the kernel answered before (:mod:`.initialize`), when the
request's task asks for it (:data:`KERNEL_SHORTCUT`): a link of its own would cost every request
a step of the chain.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import Any

from mcp.server._otel import OpenTelemetryMiddleware
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.server.request_state import RequestStateBoundary
from opentelemetry import trace
from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.trace import ProxyTracerProvider, get_tracer_provider


def traced() -> bool:
    """Whether a tracer provider is installed.

    ``get_tracer_provider()`` answers the same, but while none is set it looks
    ``OTEL_PYTHON_TRACER_PROVIDER`` up in ``os.environ`` on every call (a raised and caught
    ``KeyError`` each time). Here the variable is looked up when the middleware is made, which
    installs the provider it names, and a request reads the installed one from its module.
    """
    provider = getattr(trace, "_TRACER_PROVIDER", _UNREADABLE)
    if provider is _UNREADABLE:  # another OpenTelemetry layout: ask it
        return not isinstance(get_tracer_provider(), ProxyTracerProvider)
    return provider is not None


_UNREADABLE = object()


KERNEL_SHORTCUT: ContextVar[ServerMiddleware[Any] | None] = ContextVar(
    "mcp2anp_kernel_shortcut", default=None
)
"""What :class:`SpansWhenTraced` calls in place of the rest of the chain for an ``initialize``
the current task serves, while untraced: set around one by this package's endpoint."""


class SpansWhenTraced(OpenTelemetryMiddleware):
    """:class:`OpenTelemetryMiddleware`, skipped while no tracer provider is installed (and
    then, for an ``initialize`` whose task set :data:`KERNEL_SHORTCUT`, calling that instead of
    the rest of the chain)."""

    def __init__(self) -> None:
        super().__init__()
        if OTEL_PYTHON_TRACER_PROVIDER in os.environ:
            get_tracer_provider()  # installs the provider the variable names

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if not traced():
            if ctx.method == "initialize":
                shortcut = KERNEL_SHORTCUT.get()
                if shortcut is not None:
                    return await shortcut(ctx, call_next)
            return await call_next(ctx)
        return await super().__call__(ctx, call_next)


def spans_when_traced(middleware: list[Any]) -> None:
    """Swap the SDK's own span middleware in a server's ``middleware`` list (in place) for
    :class:`SpansWhenTraced`; subclasses of it, and any other middleware, are left alone."""
    for index, entry in enumerate(middleware):
        if type(entry) is OpenTelemetryMiddleware:
            middleware[index] = SpansWhenTraced()


def only_sdk_middleware(middleware: list[Any]) -> bool:
    """Whether every server middleware in ``middleware`` is the SDK's own (its spans, whether
    ours or its, and its request-state boundary): links that pass a request's context on as it
    came (the boundary rewrites only the ``requestState`` of a few methods' params) and hand
    back what the kernel made. With anything else in the chain, the hosting takes no shortcut
    that a host's middleware could notice."""
    for entry in middleware:  # noqa: SIM110 (all() makes a generator per call)
        if type(entry) not in _SDK_MIDDLEWARE:
            return False
    return True


_SDK_MIDDLEWARE = frozenset({OpenTelemetryMiddleware, SpansWhenTraced, RequestStateBoundary})
"""Server middleware that passes a request's context on as it came (the SDK's spans, and
its request-state boundary, which rewrites only the ``requestState`` of a request's params)."""
