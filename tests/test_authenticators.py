"""Tests for the ready-made authenticators, the remote one against a real uvicorn verifier."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mcp2anp_middleware.authentication.authenticators import (
    MISSING_CREDENTIAL,
    AuthenticationUnavailable,
    CachingAuthenticator,
    NoAuthAuthenticator,
    RemoteVerifierAuthenticator,
    StaticKeyAuthenticator,
    SyncAuthenticator,
    credential_fingerprint,
    require_credentials,
)
from mcp2anp_middleware.authentication.base import AuthenticationError, Credentials
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.state import SessionConfig

from .servers import free_port, serve

pytestmark = pytest.mark.anyio

ALICE_KEY = "sk-alice-0123456789abcdef"
BOB_TOKEN = "tok-bob-fedcba9876543210"
ALICE = SessionConfig(principal="alice", did_document_path=Path("/keys/alice.json"))
BOB = SessionConfig(principal="bob")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Static keys
# ---------------------------------------------------------------------------------------------


async def test_static_accepts_api_key_and_bearer() -> None:
    auth = StaticKeyAuthenticator({ALICE_KEY: ALICE, BOB_TOKEN: BOB})
    assert await auth(Credentials(api_key=ALICE_KEY)) == ALICE
    assert await auth(Credentials(bearer_token=ALICE_KEY)) == ALICE
    assert await auth(Credentials(bearer_token=BOB_TOKEN)) == BOB
    # X-API-Key wins when both are sent.
    assert await auth(Credentials(api_key=BOB_TOKEN, bearer_token=ALICE_KEY)) == BOB


async def test_static_refuses_unknown_and_missing() -> None:
    auth = StaticKeyAuthenticator({ALICE_KEY: ALICE})
    with pytest.raises(AuthenticationError, match="credential refused") as refused:
        await auth(Credentials(api_key="sk-wrong"))
    assert not isinstance(refused.value, AuthenticationUnavailable)
    with pytest.raises(AuthenticationError, match="missing credential"):
        await auth(Credentials())


async def test_static_compares_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the number of comparisons does not depend on where (or if) a key matches."""
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = {f"key-{i}": SessionConfig(principal=f"p{i}") for i in range(5)}
    auth = StaticKeyAuthenticator(keys)
    for candidate in ("key-0", "key-4", "nope"):
        calls.clear()
        with contextlib.suppress(AuthenticationError):
            await auth(Credentials(api_key=candidate))
        assert len(calls) == 5


async def test_static_hashed_entries_and_bad_input() -> None:
    auth = StaticKeyAuthenticator({}, hashed_entries={sha(ALICE_KEY).upper(): ALICE})
    assert await auth(Credentials(api_key=ALICE_KEY)) == ALICE
    with pytest.raises(ValueError, match="64 hex"):
        StaticKeyAuthenticator({}, hashed_entries={"abc": ALICE})
    with pytest.raises(ValueError, match="non-empty"):
        StaticKeyAuthenticator({"": ALICE})
    # Keys that could never arrive as written (a header is bytes read as Latin-1, stripped):
    for never_matches in ("ключ-key", "key-€", " padded", "tab\tkey", "line\nbreak"):
        with pytest.raises(ValueError, match="printable Latin-1") as refused:
            StaticKeyAuthenticator({never_matches: ALICE})
        assert never_matches.strip() not in str(refused.value)  # (named by fingerprint only)
    with pytest.raises(ValueError, match="printable Latin-1"):  # (named by fingerprint)
        StaticKeyAuthenticator({"key\ud800": ALICE})
    # A Latin-1 key does arrive as written, from a client that sends it as Latin-1 bytes.
    latin = StaticKeyAuthenticator({"café-key": ALICE})
    assert await latin(Credentials(api_key=b"caf\xe9-key".decode("latin-1"))) == ALICE


def write(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


async def test_from_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "keys": [
                {
                    "api_key": ALICE_KEY,
                    "principal": "alice",
                    "did_document_path": "alice/did.json",
                    "private_key_path": "/abs/alice.pem",
                },
                {"api_key_sha256": sha(BOB_TOKEN), "principal": "bob"},
                {"api_key": "sk-anon"},
            ]
        },
    )
    auth = StaticKeyAuthenticator.from_file(path)
    assert len(auth) == 3
    alice = await auth(Credentials(api_key=ALICE_KEY))
    assert alice == SessionConfig(
        principal="alice",
        did_document_path=tmp_path / "alice" / "did.json",
        private_key_path=Path("/abs/alice.pem"),
    )
    assert (await auth(Credentials(bearer_token=BOB_TOKEN))).principal == "bob"
    anon = await auth(Credentials(api_key="sk-anon"))
    assert anon.principal == "key:" + sha("sk-anon")[:12]
    assert anon.did_document_path is None
    with pytest.raises(AuthenticationError):
        await auth(Credentials(api_key=sha(BOB_TOKEN)))  # the digest itself is not a key


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", r"not valid JSON \(.* line 1"),
        ([], "top level must be a JSON object"),
        ({"key": []}, "unknown top-level field"),
        ({"keys": {}}, "'keys' must be a list"),
        ({"keys": ["sk-x"]}, r"keys\[0\]: must be a JSON object"),
        ({"keys": [{"principal": "a"}]}, r"keys\[0\]: give exactly one of"),
        (
            {"keys": [{"api_key": "a"}, {"api_key": "sk-x", "api_key_sha256": sha("sk-x")}]},
            r"keys\[1\]: give exactly one of",
        ),
        ({"keys": [{"api_key_sha256": "zz"}]}, r"keys\[0\]: 'api_key_sha256': .*64 hex"),
        ({"keys": [{"api_key_sha256": "z" * 64}]}, r"keys\[0\]: 'api_key_sha256': .*64 hex"),
        ({"keys": [{"api_key": 12}]}, r"keys\[0\]: 'api_key' must be a non-empty string"),
        ({"keys": [{"api_key": ""}]}, r"keys\[0\]: 'api_key' must be a non-empty string"),
        ({"keys": [{"api_key": "a", "principal": 5}]}, r"'principal' must be a non-empty"),
        ({"keys": [{"api_key": "a", "privat_key_path": "x"}]}, r"unknown field\(s\) privat_key"),
        (
            {"keys": [{"api_key": "sk-x"}, {"api_key": "b"}, {"api_key_sha256": sha("sk-x")}]},
            r"keys\[2\]: duplicate API key \(same as keys\[0\]\)",
        ),
        ({"keys": [{"api_key": " sk-x"}]}, r"keys\[0\]: 'api_key': API keys must be printable"),
        ({"keys": [{"api_key": "sk-x\u20ac"}]}, r"keys\[0\]: 'api_key': API keys must be"),
    ],
)
async def test_from_file_rejects_malformed(tmp_path: Path, document: Any, message: str) -> None:
    path = write(tmp_path, document)
    with pytest.raises(ValueError, match=message) as error:
        StaticKeyAuthenticator.from_file(path)
    assert str(path) in str(error.value)
    assert "sk-x" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Remote verifier against a real server
# ---------------------------------------------------------------------------------------------


@dataclass
class Verifier:
    """A credential-verifying service whose failure modes the tests switch on."""

    base: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Response] = field(default_factory=list)

    async def verify(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append(body)
        if self.failures:
            return self.failures.pop(0)
        if body.get("api_key") == ALICE_KEY:
            return JSONResponse(
                {
                    "principal": "alice",
                    "did_document_path": "/keys/alice.json",
                    "private_key_path": "/keys/alice.pem",
                }
            )
        if body.get("bearer_token") == BOB_TOKEN:
            return JSONResponse(
                {
                    "principal": "bob",
                    "did_document": {"id": "did:wba:example.com:bob"},
                    "private_key_pem": "-----BEGIN PRIVATE KEY-----\n...",
                }
            )
        if body.get("api_key") == "forbidden":
            return PlainTextResponse("no", status_code=403)
        return PlainTextResponse("unknown", status_code=401)

    async def malformed(self, request: Request) -> Response:
        await request.body()
        kind = request.query_params["kind"]
        if kind == "text":
            return PlainTextResponse("principal=alice")
        if kind == "list":
            return JSONResponse(["alice"])
        if kind == "no-principal":
            return JSONResponse({"did_document_path": "/x"})
        return JSONResponse({"principal": "alice", "did_document": "{broken"})

    async def teapot(self, request: Request) -> Response:
        return PlainTextResponse("teapot", status_code=418)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/verify", self.verify, methods=["POST"]),
                Route("/malformed", self.malformed, methods=["POST"]),
                Route("/teapot", self.teapot, methods=["POST"]),
            ]
        )


@pytest.fixture
async def verifier() -> AsyncIterator[Verifier]:
    state = Verifier()
    async with serve(state.app(), lifespan="off") as base:
        state.base = base
        yield state


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def test_remote_success_api_key_and_bearer(verifier: Verifier) -> None:
    async with RemoteVerifierAuthenticator(f"{verifier.base}/verify") as auth:
        alice = await auth(Credentials(api_key=ALICE_KEY))
        bob = await auth(Credentials(bearer_token=BOB_TOKEN))
    assert alice == SessionConfig(
        principal="alice",
        did_document_path=Path("/keys/alice.json"),
        private_key_path=Path("/keys/alice.pem"),
    )
    assert bob.principal == "bob"
    assert isinstance(bob.did_document, str)
    assert json.loads(bob.did_document) == {"id": "did:wba:example.com:bob"}
    assert bob.private_key_pem is not None
    hash(bob)  # stays usable as a dict key
    assert verifier.seen == [{"api_key": ALICE_KEY}, {"bearer_token": BOB_TOKEN}]


async def test_remote_refusal_is_not_retried(verifier: Verifier) -> None:
    sleep = RecordingSleep()
    async with RemoteVerifierAuthenticator(f"{verifier.base}/verify", sleep=sleep) as auth:
        for key in ("sk-unknown", "forbidden"):
            with pytest.raises(AuthenticationError, match="credential refused") as refused:
                await auth(Credentials(api_key=key))
            assert not isinstance(refused.value, AuthenticationUnavailable)
        with pytest.raises(AuthenticationError, match="missing credential"):
            await auth(Credentials())
    assert len(verifier.seen) == 2
    assert sleep.delays == []


async def test_remote_retries_5xx_then_succeeds(verifier: Verifier) -> None:
    verifier.failures = [PlainTextResponse("down", 503), PlainTextResponse("oops", 500)]
    sleep = RecordingSleep()
    async with RemoteVerifierAuthenticator(
        f"{verifier.base}/verify", retries=2, backoff=0.5, sleep=sleep
    ) as auth:
        assert (await auth(Credentials(api_key=ALICE_KEY))).principal == "alice"
    assert len(verifier.seen) == 3
    assert sleep.delays == [0.5, 1.0]


async def test_remote_honours_retry_after_up_to_cap(verifier: Verifier) -> None:
    verifier.failures = [
        PlainTextResponse("slow down", 429, headers={"Retry-After": "3"}),
        PlainTextResponse("slow down", 429, headers={"Retry-After": "3600"}),
        PlainTextResponse("slow down", 429, headers={"Retry-After": "Wed, 21 Oct 2099 07:28:00"}),
    ]
    sleep = RecordingSleep()
    async with RemoteVerifierAuthenticator(
        f"{verifier.base}/verify", retries=3, backoff=0.1, max_retry_after=10, sleep=sleep
    ) as auth:
        assert (await auth(Credentials(api_key=ALICE_KEY))).principal == "alice"
    assert sleep.delays == [3.0, 10.0, pytest.approx(0.4)]


async def test_remote_ignores_a_retry_after_that_is_no_number(verifier: Verifier) -> None:
    """``"²"`` is a digit to ``str.isdigit`` and not to ``int()``: backed off as without one."""
    verifier.failures = [
        PlainTextResponse("slow down", 429, headers={"Retry-After": "\xb2"}),
        PlainTextResponse("slow down", 429, headers={"Retry-After": "9" * 5000}),
    ]
    sleep = RecordingSleep()
    async with RemoteVerifierAuthenticator(
        f"{verifier.base}/verify", retries=2, backoff=0.1, max_retry_after=10, sleep=sleep
    ) as auth:
        assert (await auth(Credentials(api_key=ALICE_KEY))).principal == "alice"
    assert sleep.delays == [pytest.approx(0.1), pytest.approx(0.2)]


async def test_remote_gives_up_after_retries(verifier: Verifier) -> None:
    verifier.failures = [PlainTextResponse("down", 503) for _ in range(3)]
    sleep = RecordingSleep()
    async with RemoteVerifierAuthenticator(
        f"{verifier.base}/verify", retries=2, sleep=sleep
    ) as auth:
        with pytest.raises(AuthenticationUnavailable, match=r"HTTP 503 after 3 attempts"):
            await auth(Credentials(api_key=ALICE_KEY))
    assert len(sleep.delays) == 2


async def test_remote_unreachable_is_unavailable() -> None:
    sleep = RecordingSleep()
    url = f"http://127.0.0.1:{free_port()}/verify"
    async with RemoteVerifierAuthenticator(url, retries=2, backoff=0.2, sleep=sleep) as auth:
        with pytest.raises(AuthenticationUnavailable, match="ConnectError after 3 attempts"):
            await auth(Credentials(api_key=ALICE_KEY))
    assert sleep.delays == [pytest.approx(0.2), pytest.approx(0.4)]


async def test_remote_timeout_is_unavailable() -> None:
    release = asyncio.Event()

    async def stuck(request: Request) -> Response:
        await release.wait()
        return JSONResponse({"principal": "late"})

    app = Starlette(routes=[Route("/verify", stuck, methods=["POST"])])
    async with serve(app, lifespan="off") as base:
        async with RemoteVerifierAuthenticator(
            f"{base}/verify", timeout=0.2, retries=0, sleep=RecordingSleep()
        ) as auth:
            with pytest.raises(AuthenticationUnavailable, match="Timeout"):
                await auth(Credentials(api_key=ALICE_KEY))
        release.set()


@pytest.mark.parametrize("kind", ["text", "list", "no-principal", "bad-did"])
async def test_remote_malformed_body_is_unavailable(verifier: Verifier, kind: str) -> None:
    sleep = RecordingSleep()
    url = f"{verifier.base}/malformed?kind={kind}"
    async with RemoteVerifierAuthenticator(url, sleep=sleep) as auth:
        with pytest.raises(AuthenticationUnavailable, match="malformed response"):
            await auth(Credentials(api_key=ALICE_KEY))
    assert sleep.delays == []  # a broken contract is not retried


async def test_remote_unexpected_status_is_unavailable(verifier: Verifier) -> None:
    async with RemoteVerifierAuthenticator(f"{verifier.base}/teapot") as auth:
        with pytest.raises(AuthenticationUnavailable, match="unexpected HTTP 418"):
            await auth(Credentials(api_key=ALICE_KEY))


async def test_remote_closes_only_its_own_client(verifier: Verifier) -> None:
    owned = RemoteVerifierAuthenticator(f"{verifier.base}/verify")
    await owned.aclose()
    assert owned._client.is_closed

    async with httpx.AsyncClient() as client:
        borrowed = RemoteVerifierAuthenticator(f"{verifier.base}/verify", http_client=client)
        await borrowed.aclose()
        assert not client.is_closed
        assert (await borrowed(Credentials(api_key=ALICE_KEY))).principal == "alice"


# ---------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------


class CountingInner:
    """An authenticator over a mutable key table that counts its calls."""

    def __init__(self, keys: dict[str, SessionConfig] | None = None) -> None:
        self.keys = dict(keys or {})
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.error: AuthenticationError | None = None

    async def __call__(self, credentials: Credentials) -> SessionConfig:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        key = credentials.api_key or credentials.bearer_token or ""
        if key not in self.keys:
            raise AuthenticationError("credential refused")
        return self.keys[key]


async def test_cache_hits_then_revocation_takes_effect_after_ttl() -> None:
    clock = ManualClock()
    inner = CountingInner({ALICE_KEY: ALICE})
    auth = CachingAuthenticator(inner, ttl=60, clock=clock)
    assert await auth(Credentials(api_key=ALICE_KEY)) == ALICE
    assert await auth(Credentials(api_key=ALICE_KEY)) == ALICE
    assert inner.calls == 1

    del inner.keys[ALICE_KEY]  # revoked
    clock.advance(59)
    assert await auth(Credentials(api_key=ALICE_KEY)) == ALICE  # still cached
    clock.advance(1)
    with pytest.raises(AuthenticationError):
        await auth(Credentials(api_key=ALICE_KEY))
    assert inner.calls == 2


async def test_cache_distinguishes_credential_kind() -> None:
    inner = CountingInner({ALICE_KEY: ALICE})
    auth = CachingAuthenticator(inner, clock=ManualClock())
    await auth(Credentials(api_key=ALICE_KEY))
    await auth(Credentials(bearer_token=ALICE_KEY))
    assert inner.calls == 2
    assert len(auth) == 2
    assert all(ALICE_KEY.encode() not in key for key in auth._entries)


async def test_cache_negative_ttl_and_invalidate() -> None:
    clock = ManualClock()
    inner = CountingInner()
    auth = CachingAuthenticator(inner, ttl=60, negative_ttl=5, clock=clock)
    for _ in range(3):
        with pytest.raises(AuthenticationError, match="credential refused"):
            await auth(Credentials(api_key="sk-new"))
    assert inner.calls == 1

    inner.keys["sk-new"] = BOB  # issued just after the refusal
    clock.advance(4.9)
    with pytest.raises(AuthenticationError):
        await auth(Credentials(api_key="sk-new"))
    clock.advance(0.1)
    assert await auth(Credentials(api_key="sk-new")) == BOB
    assert inner.calls == 2

    del inner.keys["sk-new"]
    auth.invalidate(Credentials(api_key="sk-new"))
    with pytest.raises(AuthenticationError):
        await auth(Credentials(api_key="sk-new"))
    assert inner.calls == 3


async def test_cache_never_remembers_unavailable() -> None:
    inner = CountingInner({ALICE_KEY: ALICE})
    inner.error = AuthenticationUnavailable("verifier down")
    auth = CachingAuthenticator(inner, clock=ManualClock())
    for _ in range(2):
        with pytest.raises(AuthenticationUnavailable):
            await auth(Credentials(api_key=ALICE_KEY))
    assert inner.calls == 2
    inner.error = None
    assert await auth(Credentials(api_key=ALICE_KEY)) == ALICE


async def test_cache_single_flight() -> None:
    inner = CountingInner({ALICE_KEY: ALICE})
    inner.gate = asyncio.Event()
    auth = CachingAuthenticator(inner, clock=ManualClock())
    tasks = [asyncio.create_task(auth(Credentials(api_key=ALICE_KEY))) for _ in range(10)]
    # The leader is inside the inner check; tasks run in order, so the nine others have reached
    # the cache by the time this waiter is woken.
    await inner.entered.wait()
    assert all(not task.done() for task in tasks)
    assert inner.calls == 1
    inner.gate.set()
    assert await asyncio.gather(*tasks) == [ALICE] * 10
    assert inner.calls == 1


async def test_cache_single_flight_shares_refusal_and_survives_cancelled_leader() -> None:
    inner = CountingInner()
    inner.gate = asyncio.Event()
    auth = CachingAuthenticator(inner, clock=ManualClock())
    leader = asyncio.create_task(auth(Credentials(api_key="sk-bad")))
    await asyncio.sleep(0)
    followers = [asyncio.create_task(auth(Credentials(api_key="sk-bad"))) for _ in range(3)]
    await inner.entered.wait()
    await asyncio.sleep(0)  # the followers, scheduled after the leader, reach the cache
    leader.cancel()
    inner.gate.set()
    results = await asyncio.gather(*followers, return_exceptions=True)
    assert all(isinstance(r, AuthenticationError) for r in results)
    assert inner.calls == 1


async def test_cache_is_bounded_and_evicts_oldest() -> None:
    keys = {f"k{i}": SessionConfig(principal=f"p{i}") for i in range(5)}
    inner = CountingInner(keys)
    auth = CachingAuthenticator(inner, max_entries=3, clock=ManualClock())
    for key in keys:
        await auth(Credentials(api_key=key))
    assert len(auth) == 3
    await auth(Credentials(api_key="k4"))  # newest: still cached
    assert inner.calls == 5
    await auth(Credentials(api_key="k0"))  # oldest: evicted
    assert inner.calls == 6
    assert len(auth) == 3


async def test_a_cache_hit_keeps_an_entry_from_eviction() -> None:
    """Least recently used first: a credential in use is not evicted by a stream of others."""
    keys = {f"k{i}": SessionConfig(principal=f"p{i}") for i in range(4)}
    inner = CountingInner(keys)
    auth = CachingAuthenticator(inner, max_entries=2, clock=ManualClock())
    for key in ("k0", "k1", "k0", "k2", "k0", "k3", "k0"):
        await auth(Credentials(api_key=key))
    assert inner.calls == 4  # k0 asked once, then always a hit


@pytest.mark.parametrize("forget", ["invalidate", "clear"])
async def test_a_check_under_way_when_a_credential_is_revoked_is_not_cached(forget: str) -> None:
    """Revoked while the inner check runs (it had read the credential as valid): that check's
    answer is not remembered, and a request after the revocation asks again rather than joining
    it."""

    class ReadsFirst(CountingInner):
        async def __call__(self, credentials: Credentials) -> SessionConfig:
            self.calls += 1
            found = self.keys.get(credentials.api_key or "")
            self.entered.set()
            if self.calls == 1 and self.gate is not None:
                await self.gate.wait()
            if found is None:
                raise AuthenticationError("credential refused")
            return found

    inner = ReadsFirst({ALICE_KEY: ALICE})
    inner.gate = asyncio.Event()
    auth = CachingAuthenticator(inner, clock=ManualClock())
    before = asyncio.create_task(auth(Credentials(api_key=ALICE_KEY)))
    await inner.entered.wait()
    del inner.keys[ALICE_KEY]  # revoked
    if forget == "invalidate":
        auth.invalidate(Credentials(api_key=ALICE_KEY))
    else:
        auth.clear()
    after = asyncio.create_task(auth(Credentials(api_key=ALICE_KEY)))
    inner.gate.set()
    assert await before == ALICE  # (began before the revocation)
    with pytest.raises(AuthenticationError):
        await after
    with pytest.raises(AuthenticationError):
        await auth(Credentials(api_key=ALICE_KEY))
    assert inner.calls == 2 and len(auth) == 1  # the refusal, remembered


async def test_a_cached_refusal_keeps_its_status() -> None:
    class Forbidden(AuthenticationError):
        status = 403

    inner = CountingInner()
    inner.error = Forbidden("not for you")
    auth = CachingAuthenticator(inner, clock=ManualClock())
    for _ in range(2):
        with pytest.raises(AuthenticationError) as refused:
            await auth(Credentials(api_key="sk-x"))
        assert refused.value.status == 403
    assert inner.calls == 1


async def test_cache_passes_missing_credentials_through() -> None:
    auth = CachingAuthenticator(require_credentials(CountingInner()), clock=ManualClock())
    with pytest.raises(AuthenticationError, match="missing credential"):
        await auth(Credentials())
    assert len(auth) == 0


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------


async def test_sync_authenticator_runs_off_the_loop() -> None:
    threads: list[int] = []

    def lookup(credentials: Credentials) -> SessionConfig:
        threads.append(threading.get_ident())
        if credentials.api_key != ALICE_KEY:
            raise AuthenticationError("credential refused")
        return ALICE

    auth = SyncAuthenticator(lookup)
    assert await auth(Credentials(api_key=ALICE_KEY)) == ALICE
    with pytest.raises(AuthenticationError, match="credential refused"):
        await auth(Credentials(api_key="nope"))
    assert threads and threading.get_ident() not in threads


async def test_no_auth_and_require_credentials() -> None:
    assert (await NoAuthAuthenticator()(Credentials())).principal == "dev"
    assert await NoAuthAuthenticator(BOB)(Credentials(api_key="anything")) == BOB

    guarded = require_credentials(NoAuthAuthenticator(BOB))
    with pytest.raises(AuthenticationError) as missing:
        await guarded(Credentials())
    assert str(missing.value) == MISSING_CREDENTIAL
    assert await guarded(Credentials(bearer_token="t")) == BOB


# ---------------------------------------------------------------------------------------------
# Secrets stay out of logs and error messages
# ---------------------------------------------------------------------------------------------


async def test_logs_and_errors_never_contain_secrets(verifier: Verifier, tmp_path: Path) -> None:
    secret = "sk-very-secret-value-42"
    messages: list[str] = []
    static = StaticKeyAuthenticator.from_file(
        write(tmp_path, {"keys": [{"api_key": ALICE_KEY}, {"api_key_sha256": sha(BOB_TOKEN)}]})
    )
    remote = RemoteVerifierAuthenticator(f"{verifier.base}/verify", sleep=RecordingSleep())
    malformed = RemoteVerifierAuthenticator(
        f"{verifier.base}/malformed?kind=no-principal", sleep=RecordingSleep()
    )
    down = RemoteVerifierAuthenticator(
        f"http://127.0.0.1:{free_port()}/verify", retries=1, sleep=RecordingSleep()
    )
    cached = CachingAuthenticator(remote, clock=ManualClock())
    verifier.failures = [PlainTextResponse("down", 503)]
    with structlog.testing.capture_logs() as logs:
        for auth in (static, cached, malformed, down, NoAuthAuthenticator()):
            for creds in (Credentials(api_key=secret), Credentials(bearer_token=secret)):
                try:
                    await auth(creds)
                except AuthenticationError as exc:
                    messages.append(str(exc))
        await cached(Credentials(api_key=ALICE_KEY))
        await cached(Credentials(bearer_token=BOB_TOKEN))
    for auth in (remote, malformed, down):
        await auth.aclose()

    assert logs, "expected refusals and retries to be logged"
    assert any(e.get("fingerprint") == credential_fingerprint(secret) for e in logs)
    text = repr(logs) + repr(messages)
    for value in (secret, ALICE_KEY, BOB_TOKEN, "BEGIN PRIVATE KEY"):
        assert value not in text
    assert {e["log_level"] for e in logs} <= {"debug", "info", "warning"}
