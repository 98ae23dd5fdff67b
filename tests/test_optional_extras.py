"""The package without its optional extras: on a machine where ``redis`` is not installed, the
launcher still serves with the memory store (the README's first command installs only
``[example]``). Run as a real process with an import hook that makes ``redis`` absent."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from .messages import INITIALIZE, MCP_HEADERS, answer_of
from .processes import clean_env, launcher

pytestmark = pytest.mark.anyio

NO_REDIS = '''
import sys


class NoRedis:
    """As if redis were not installed: importing it fails as a missing module does."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("redis", "hiredis"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoRedis())
'''


async def test_the_launcher_serves_without_redis_installed(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_REDIS, encoding="utf-8")
    env = clean_env(PYTHONPATH=str(hook))
    with launcher(tmp_path, env=env) as launched:
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{launched.base_url}/mcp", json=INITIALIZE, headers=MCP_HEADERS
            )
        assert answer.status_code == 200, launched.stderr()
        assert answer.headers["mcp-session-id"]
        assert "result" in answer_of(answer)
    assert "No module named 'redis'" not in launched.stderr()
