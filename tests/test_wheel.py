"""The built wheel works outside the checkout: installed into a fresh venv, the launcher serves.

The wheel is built from this checkout (no network: no build isolation) and installed with
``--no-deps`` into a new venv whose only other path entry is this test venv's site-packages (for
the dependencies; a path added by a ``.pth`` line does not run that directory's own ``.pth``
files, so the checkout's editable install stays out). The launcher then runs from a directory
outside the checkout and must import the package from the new venv.
"""

from __future__ import annotations

import site
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest

from .messages import INITIALIZE, MCP_HEADERS, answer_of
from .processes import ROOT, launcher

pytestmark = pytest.mark.anyio


def build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("mcp2anp_middleware-*.whl")
    return wheel


def fresh_venv(where: Path, wheel: Path) -> Path:
    venv.EnvBuilder(with_pip=False).create(where)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "test-dependencies.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n", encoding="utf-8"
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", purelib,
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return python


def imported_from(python: Path, cwd: Path) -> list[str]:
    """Where the venv's interpreter imports the package and the launcher from, and the version."""
    return subprocess.run(
        [str(python), "-c", "import mcp2anp_middleware as m, example_app as e; "
         "print(m.__file__); print(e.__file__); print(m.__version__)"],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip


async def test_the_wheel_installs_and_serves_outside_the_checkout(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    python = fresh_venv(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = imported_from(python, elsewhere)
    assert all(path.startswith(str(tmp_path / "venv")) for path in where[:2]), where
    assert (Path(where[0]).parent / "py.typed").exists()
    with launcher(tmp_path, python=str(python), cwd=elsewhere) as served:
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{served.base_url}/mcp", json=INITIALIZE, headers=MCP_HEADERS)
    assert answer.status_code == 200, served.stderr()
    assert answer_of(answer)["result"]["serverInfo"]["version"] == where[2]
    assert "mcp-session-id" in answer.headers
