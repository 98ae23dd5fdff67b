"""Prometheus metrics (``pip install mcp2anp-middleware[prometheus]``).

A collector that reads the middleware's counters at scrape time, so requests pay nothing for it::

    from prometheus_client import REGISTRY, make_asgi_app
    REGISTRY.register(SessionMetricsCollector(middleware))
    # serve make_asgi_app() at /metrics from the host app
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from mcp2anp_middleware.sessions.middleware import MCPSessionMiddleware


class SessionMetricsCollector(Collector):
    def __init__(self, middleware: MCPSessionMiddleware, *, prefix: str = "mcp2anp") -> None:
        self.middleware = middleware
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        registry = self.middleware.registry
        stats = registry.stats
        p = self.prefix
        yield GaugeMetricFamily(
            f"{p}_local_sessions", "Sessions held by this process", value=len(registry)
        )
        yield GaugeMetricFamily(
            f"{p}_in_flight_requests", "MCP requests in flight", value=registry.in_flight
        )
        yield CounterMetricFamily(f"{p}_sessions_created", "Sessions created", value=stats.created)
        removed = CounterMetricFamily(
            f"{p}_sessions_removed", "Sessions removed, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.removed.items()):
            removed.add_metric([reason], count)
        yield removed
        rejected = CounterMetricFamily(
            f"{p}_requests_rejected", "MCP requests refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield CounterMetricFamily(f"{p}_sweeps", "Cleanup sweeps run", value=stats.sweeps)
        yield CounterMetricFamily(
            f"{p}_sweep_seconds", "Time spent in cleanup sweeps", value=stats.total_sweep_seconds
        )
        yield GaugeMetricFamily(
            f"{p}_last_sweep_seconds", "Duration of the last sweep", value=stats.last_sweep_seconds
        )
