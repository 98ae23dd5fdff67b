"""Side by side with an earlier commit: ``python -m bench.compare REF [--only 1 3 4] [--quick]``.

Checks REF out into a temporary git worktree, then runs each selected benchmark there and here,
alternating (REF, here, REF, here...) so that the machine's noise falls on both, and prints one
table: each row's value at REF, here, and here / REF. A benchmark's rows are matched by name; a
row that exists on one side only is shown with a dash. Uses this checkout's interpreter for both.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tempfile
from pathlib import Path

from .__main__ import MODULES, ROOT, run_one
from .common import Result


def run_at(root: Path, module: str, quick: bool) -> list[Result]:
    return run_one(module, quick, root=root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the commit to compare with (e.g. HEAD~3, a tag)")
    parser.add_argument("--only", nargs="*", default=sorted(MODULES), choices=sorted(MODULES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=1, help="alternations per benchmark")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        then = Path(tmp) / "ref"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(then), args.ref], cwd=ROOT, check=True
        )
        try:
            rows: list[tuple[str, float, float, str]] = []
            for key in args.only:
                before: dict[str, list[float]] = {}
                after: dict[str, list[float]] = {}
                units: dict[str, str] = {}
                for _ in range(args.rounds):
                    for side, root in ((before, then), (after, ROOT)):
                        for row in run_at(root, MODULES[key], args.quick):
                            side.setdefault(row.name, []).append(row.measured)
                            units[row.name] = row.unit
                for name in dict.fromkeys([*before, *after]):
                    rows.append(
                        (name, _median(before.get(name)), _median(after.get(name)), units[name])
                    )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(then)], cwd=ROOT, check=False
            )
    print(f"\n| benchmark | at {args.ref} | now | now / then |\n|---|---|---|---|")
    for name, was, now, unit in rows:
        ratio = now / was if was and not math.isnan(was) and not math.isnan(now) else math.nan
        print(f"| {name} | {_fmt(was, unit)} | {_fmt(now, unit)} | {_fmt(ratio, '')} |")


def _median(values: list[float] | None) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _fmt(value: float, unit: str) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}{unit}"


if __name__ == "__main__":
    main()
