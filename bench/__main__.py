"""Run every benchmark and print the results table: ``python -m bench`` (from the repo root).

Each benchmark runs in its own Python process (so one's memory, GC state and event loop do not
affect the next); its detailed lines are printed as it goes, then one table of all rows.
Options: ``--quick`` (fewer iterations, a smoke test; 100K sessions instead of 1M), ``--only 1 3``
(a subset), ``--json PATH`` (all rows as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import Result

ROOT = Path(__file__).resolve().parent.parent
MODULES = {
    "1": "bench.b1_passthrough",
    "2": "bench.b2_session",
    "3": "bench.b3_sweep",
    "4": "bench.b4_memory",
    "5": "bench.b5_tools",
    "6": "bench.b6_redis",
    "7": "bench.b7_redis_ha",
    "8": "bench.b8_floor",
    "9": "bench.b9_instructions",
}


def run_one(module: str, quick: bool, *, root: Path = ROOT) -> list[Result]:
    """Run one benchmark module in its own process, from the checkout at ``root``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, "-m", module, "--json", str(out)]
        if quick:
            command.append("--quick")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        }
        done = subprocess.run(command, cwd=root, env=env, check=False)
        if done.returncode != 0 or not out.exists():
            return [Result(f"{module} FAILED (exit {done.returncode})", float("nan"), "info")]
        return [Result(**row) for row in json.loads(out.read_text())]


def table(rows: list[Result]) -> str:
    header = ("benchmark", "measured", "target", "result")
    lines = [(row.name, f"{row.measured:.4g}{row.unit}", row.target, row.status) for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=sorted(MODULES))
    parser.add_argument("--json")
    args = parser.parse_args()
    started = time.perf_counter()
    rows: list[Result] = []
    for key in args.only or sorted(MODULES):
        rows.extend(run_one(MODULES[key], args.quick))
    print()
    print(table(rows))
    print()
    for row in rows:
        if row.detail:
            print(f"- {row.name}: {row.detail}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([row.__dict__ for row in rows], indent=1))


if __name__ == "__main__":
    main()
