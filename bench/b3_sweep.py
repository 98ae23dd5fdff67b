"""3. Sweep cost: 1,000,000 live sessions vs 1,000, and the longest event-loop stall.

Part A. Two registries (in-memory store, ``ManualClock``) are populated directly with
``SessionRegistry.register``: one with 1,000 sessions, one with 1,000,000, none expired. Batches of
``registry.sweep()`` calls on each alternate; the ratio is the median of the paired per-sweep
costs (1M / 1K). Beside it, the seed's O(n) cleanup (a plain loop over every session calling
``is_expired``) is timed on the same sessions.

Part B. 100,000 sessions are registered, the clock is advanced past the idle timeout, and one
``sweep()`` removes them all while a ticker task (``await asyncio.sleep(0)`` in a loop) records
the gaps between its wake-ups: the longest gap is the longest the sweep held the event loop. The
same ticker runs alone first, as the noise floor of this machine.

The cyclic GC is frozen (``gc.freeze()``) after populating, so a full collection over a
million-object heap (an interpreter pause unrelated to the sweep) does not land in a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time

import psutil
import structlog

from mcp2anp_middleware import SessionConfig
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.stores import SessionStore

from .common import Result, log, median, run_module, spread

logger = structlog.get_logger("mcp2anp_middleware.sessions")
TIMEOUT = 1800.0
STALL_LIMIT = 0.020


def rss_mb() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


async def populate(count: int, clock: ManualClock) -> SessionRegistry:
    registry = SessionRegistry(session_timeout=TIMEOUT, clock=clock)
    config = SessionConfig(principal="bench")
    gc.disable()
    try:
        for _ in range(count):
            await registry.register(registry.new_session(config))
    finally:
        gc.enable()
    assert len(registry.store) == count  # type: ignore[arg-type]  # (live objects: at most 100,000)
    return registry


async def sweep_cost(registry: SessionRegistry, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        removed = await registry.sweep()
        assert removed == 0
    return (time.perf_counter() - start) / repeats


def seed_scan_cost(registry: SessionRegistry) -> float:
    """The seed's cleanup: look at every session's idle time, collect the expired ones."""
    sessions = registry.live_sessions()
    now = registry.clock()
    start = time.perf_counter()
    expired = [s.session_id for s in sessions if now - s.last_accessed > TIMEOUT]
    elapsed = time.perf_counter() - start
    assert not expired
    return elapsed


async def ticker(gaps: list[float], stop: asyncio.Event) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def max_stall(work: object) -> float:
    gaps: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(ticker(gaps, stop))
    await asyncio.sleep(0)
    await work  # type: ignore[misc]
    stop.set()
    await task
    return max(gaps)


async def idle(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def part_a(big: int, quick: bool) -> tuple[list[Result], str]:
    clock = ManualClock()
    base_rss = rss_mb()
    t0 = time.perf_counter()
    small_registry = await populate(1000, clock)
    large_registry = await populate(big, clock)
    populate_s = time.perf_counter() - t0
    gc.collect()
    gc.freeze()
    used = rss_mb() - base_rss
    log(
        f"  populated 1,000 + {big:,} sessions in {populate_s:.1f} s; "
        f"RSS +{used:.0f} MB ({used * 2**20 / big:.0f} B/session incl. allocator slack)"
    )
    clock.advance(TIMEOUT / 2)  # everyone idle, nobody expired
    repeats = 200 if quick else 2000
    small: list[float] = []
    large: list[float] = []
    for i in range(5 if quick else 21):
        pair = (small_registry, large_registry) if i % 2 == 0 else (large_registry, small_registry)
        for registry in pair:
            cost = await sweep_cost(registry, repeats)
            (small if registry is small_registry else large).append(cost)
    ratios = [b / a for a, b in zip(small, large, strict=True)]
    ratio = median(ratios)
    seed_small = median([seed_scan_cost(small_registry) for _ in range(5)])
    seed_large = median([seed_scan_cost(large_registry) for _ in range(3)])
    log(
        f"  sweep, none expired: 1K {median(small) * 1e6:.1f} us, {big:,} "
        f"{median(large) * 1e6:.1f} us, ratio {ratio:.3f}; {spread(ratios)}"
    )
    log(
        f"  seed O(n) scan: 1K {seed_small * 1e3:.3f} ms, {big:,} {seed_large * 1e3:.1f} ms, "
        f"ratio {seed_large / seed_small:.0f}"
    )
    label = "1M" if big == 1_000_000 else f"{big:,}"
    rows = [
        Result(
            f"3a. sweep, {label} live vs 1K live (none expired)",
            ratio,
            "<= 2",
            f"{median(small) * 1e6:.1f} us vs {median(large) * 1e6:.1f} us per sweep; "
            f"{spread(ratios)}",
        ),
        Result(
            f"3a'. seed O(n) scan, {label} vs 1K (baseline)",
            seed_large / seed_small,
            "info",
            f"{seed_small * 1e3:.3f} ms vs {seed_large * 1e3:.1f} ms per scan",
        ),
    ]
    memory_note = f"RSS +{used:.0f} MB for {big + 1000:,} sessions"
    del small_registry, large_registry
    gc.unfreeze()
    gc.collect()
    return rows, memory_note


async def part_b(count: int, quick: bool) -> Result:
    floors: list[float] = []
    stalls: list[float] = []
    sweep_seconds: list[float] = []
    for _ in range(2 if quick else 3):
        clock = ManualClock()
        registry = await populate(count, clock)
        gc.collect()
        gc.freeze()
        floors.append(await max_stall(idle(0.2)))
        clock.advance(TIMEOUT + 1)
        started = time.perf_counter()
        stalls.append(await max_stall(registry.sweep()))
        sweep_seconds.append(time.perf_counter() - started)
        assert len(registry) == len(registry.store) == 0  # type: ignore[arg-type]
        gc.unfreeze()
        del registry
        gc.collect()
    store_stall, store_seconds = await store_only(count)
    worst = max(stalls)
    log(
        f"  sweep of {count:,} expired: total {median(sweep_seconds) * 1e3:.0f} ms, longest "
        f"loop stall per run {', '.join(f'{s * 1e3:.1f}' for s in stalls)} ms "
        f"(ticker alone: {max(floors) * 1e3:.2f} ms)"
    )
    return Result(
        f"3b. sweep {count // 1000}K expired: max loop stall / 20 ms",
        worst / STALL_LIMIT,
        "<= 1",
        f"worst stall {worst * 1e3:.1f} ms over {len(stalls)} runs (medians: stall "
        f"{median(stalls) * 1e3:.1f} ms, sweep {median(sweep_seconds) * 1e3:.0f} ms total; "
        f"idle ticker {max(floors) * 1e3:.2f} ms); the store's expire() alone: stall "
        f"{store_stall * 1e3:.1f} ms, {store_seconds * 1e3:.0f} ms total",
    )


async def store_only(count: int) -> tuple[float, float]:
    """Diagnosis: the store's ``expire()`` alone (without the registry's per-session follow-up)."""
    clock = ManualClock()
    registry = await populate(count, clock)
    gc.collect()
    gc.freeze()
    clock.advance(TIMEOUT + 1)
    kept: list[object] = []  # the records, freed after the measurement, not inside it

    async def expire(store: SessionStore) -> None:
        kept.append(await store.expire(now=clock()))

    started = time.perf_counter()
    stall = await max_stall(expire(registry.store))
    elapsed = time.perf_counter() - started
    kept.clear()
    gc.unfreeze()
    del registry
    gc.collect()
    log(
        f"  diagnosis: store.expire() alone on {count:,} expired: longest stall "
        f"{stall * 1e3:.1f} ms, total {elapsed * 1e3:.0f} ms"
    )
    return stall, elapsed


async def run(quick: bool) -> list[Result]:
    big = 100_000 if quick else 1_000_000
    rows, memory_note = await part_a(big, quick)
    log(f"  memory: {memory_note}")
    rows.append(await part_b(20_000 if quick else 100_000, quick))
    return rows


def main(args: argparse.Namespace) -> list[Result]:
    started = time.perf_counter()
    log("[3] sweep cost (in-memory store, ManualClock)")
    results = asyncio.run(run(args.quick))
    log(f"  ({time.perf_counter() - started:.1f} s)")
    return results


if __name__ == "__main__":
    run_module(main, __doc__ or "")
