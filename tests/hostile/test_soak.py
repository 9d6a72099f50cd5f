"""Bounded soak: tens of thousands of unique tokens through a real service process, memory levels off,
no request is lost.

Every soak is bounded twice: it stops after its request count or its time budget, whichever comes
first (the time budget only protects CI from a pathologically slow machine; the assertions need
enough rounds to mean anything and say so when they do not get them).

Memory is the service process's resident set (VmRSS from /proc/<pid>/status), read after each
round. The criterion: once the bounded caches are full (they fill within the first rounds), the
growth over the second half of the rounds must stay under LATE_GROWTH_LIMIT. Resident memory is
noisy (allocator arenas, gRPC buffers: +-1 MiB here) but does not trend upwards; a per-request leak
of a few hundred bytes over the JWT soak's 10,000 second-half requests crosses the limit (with the
verified-token cache made unbounded, that half grows by ~13 MiB). A ratio to the first half's growth
was rejected: with small caches the first half grows by almost nothing too, and the ratio measures noise.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import StartService, exit_code, free_port, opaque_introspector, run_service, wait_serving
from tests.harness import Answer, AuthorizationClient, authentication_only_unless_policies, check_request

pytestmark = pytest.mark.slow  # tens of thousands of checks, most through service subprocesses

ISS = "https://soak.example"
SECRET = "soak-suite-hmac-secret-0123456789abcdef"
CONCURRENCY = 50
LATE_GROWTH_LIMIT = 4 * 1024 * 1024  # bytes of VmRSS growth allowed over the second half of the rounds
MAX_ENTRIES = 2000


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_HEADER = b64(b'{"alg":"HS256","typ":"JWT"}')


def mint(claims: dict[str, Any]) -> str:
    """HS256, by hand: five times faster than PyJWT, which matters for 20,000 tokens."""
    signing_input = f"{_HEADER}.{b64(json.dumps(claims, separators=(',', ':')).encode())}"
    return f"{signing_input}.{b64(hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())}"


def claims_for(i: int, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": ISS,
        "sub": f"soak-user-{i}",
        "jti": f"jti-{i}-{os.urandom(6).hex()}",
        "iat": now,
        "exp": now + 600,
        "email": f"user{i}@soak.example",
        **extra,
    }


HS_INTROSPECTOR = {"id": "hs", "type": "jwt", "jwt": {"iss": ISS, "secret": SECRET}}


# --------------------------------------------------------------------------- the service process


class ServiceProcess:
    """`authz-service --config FILE` in a subprocess, with its gRPC and admin ports."""

    def __init__(self, process: asyncio.subprocess.Process, grpc_port: int, admin_port: int) -> None:
        self.process = process
        self.grpc_port = grpc_port
        self.admin_port = admin_port

    def rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match, status
        return int(match.group(1)) * 1024

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The Prometheus samples of /metrics, keyed by (name, sorted labels)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.admin_port}/metrics") as reply,
        ):
            assert reply.status == 200
            text = await reply.text()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for line in text.splitlines():
            match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
            if match:
                labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")))
                samples[(match.group(1), labels)] = float(match.group(3))
        return samples


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[ServiceProcess]]]:
    """Start service processes from config dicts; each is SIGTERMed (and must exit 0) after the test."""
    started: list[ServiceProcess] = []

    async def start(config: dict[str, Any]) -> ServiceProcess:
        grpc_port, admin_port = free_port(), free_port()
        config = {
            **authentication_only_unless_policies(config),
            "server": {
                "grpc_address": f"127.0.0.1:{grpc_port}",
                "admin_address": f"127.0.0.1:{admin_port}",
                "drain_delay": 0,
            },
        }
        path = tmp_path / f"config-{grpc_port}.yaml"
        path.write_text(yaml.safe_dump(config))
        process = await run_service(path, tmp_path / f"service-{grpc_port}.log", log_level="warning")
        service = ServiceProcess(process, grpc_port, admin_port)
        started.append(service)
        await wait_serving(grpc_port, process, deadline=30.0)
        return service

    yield start
    for service in started:
        if service.process.returncode is None:
            service.process.send_signal(signal.SIGTERM)
    for service in started:
        assert await exit_code(service.process, 20) == 0  # drains and exits 0: the soak did not wedge it


# --------------------------------------------------------------------------- load


class Tally:
    """Requests sent and answers received; every lost request is kept with its error."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.lost: list[tuple[int, str]] = []
        self.wrong: list[tuple[int, str]] = []


async def run_round(
    stub: AuthorizationClient,
    indices: range,
    request_for: Callable[[int], Any],
    verify: Callable[[int, Answer], str | None],
    tally: Tally,
    deadline: float,
    concurrency: int = CONCURRENCY,
) -> None:
    """Send one check per index with `concurrency` in flight; verify each answer against its index."""
    pending = iter(indices)

    async def worker() -> None:
        for i in pending:
            if time.monotonic() >= deadline:
                return
            tally.sent += 1
            try:
                response = await stub.Check(request_for(i), timeout=30)
            except grpc.aio.AioRpcError as err:
                tally.lost.append((i, f"{err.code()}: {err.details()}"))
                continue
            tally.answered += 1
            problem = verify(i, Answer.of(response))
            if problem is not None:
                tally.wrong.append((i, problem))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def levels_off(rss: list[int]) -> tuple[bool, str]:
    half = len(rss) // 2
    late = rss[-1] - rss[half]
    early = rss[half] - rss[0]
    report = (
        f"RSS MiB per round: {[round(r / 2**20, 1) for r in rss]}; first-half growth {early / 2**20:.1f} MiB, "
        f"second-half growth {late / 2**20:.1f} MiB (limit {LATE_GROWTH_LIMIT / 2**20:.0f} MiB)"
    )
    return late < LATE_GROWTH_LIMIT, report


# --------------------------------------------------------------------------- (a) unique JWTs


async def test_20k_unique_jwts_memory_levels_off(spawn: Callable[[dict[str, Any]], Awaitable[ServiceProcess]]) -> None:
    total, rounds = 20_000, 10
    per_round = total // rounds
    service = await spawn(
        {
            "cache": {"max_entries": MAX_ENTRIES},
            "introspectors": [HS_INTROSPECTOR],
            "response": {"claim_headers": {"email": "x-user-email"}},
        }
    )
    tokens = [mint(claims_for(i)) for i in range(total)]
    requests = [check_request(f"/soak/{i}", token=tokens[i]) for i in range(total)]

    def verify(i: int, answer: Answer) -> str | None:
        if not answer.allowed:
            return f"denied {answer.response.status.message}"
        identity = (answer.headers.get("x-user-id"), answer.headers.get("x-user-email"))
        if identity != (f"soak-user-{i}", f"user{i}@soak.example"):
            return f"wrong identity {identity}"
        return None

    tally = Tally()
    rss = [service.rss()]
    deadline = time.monotonic() + 40
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = AuthorizationClient(channel)
        for r in range(rounds):
            indices = range(r * per_round, (r + 1) * per_round)
            await run_round(stub, indices, requests.__getitem__, verify, tally, deadline)
            rss.append(service.rss())
            if time.monotonic() >= deadline:
                break
    assert not tally.lost, tally.lost[:5]
    assert not tally.wrong, tally.wrong[:5]
    assert tally.answered == tally.sent
    completed = len(rss) - 1
    assert completed >= 6, f"only {completed} rounds of {per_round} in the time budget: too few to judge memory"
    # Judge from the end of the first round: by then the verified-token cache (2,000 entries) is full.
    ok, report = levels_off(rss[1:])
    assert ok, report
    metrics = await service.metrics()
    allowed = metrics[("authz_checks_total", (("decision", "allow"), ("protocol", "grpc"), ("reason", "allowed")))]
    assert allowed == tally.sent, (allowed, tally.sent)


# --------------------------------------------------------------------------- (b) unique opaque tokens


async def test_5k_unique_opaque_tokens_cache_stays_bounded(
    idp: DevIdentityProvider, spawn: Callable[[dict[str, Any]], Awaitable[ServiceProcess]]
) -> None:
    total, rounds = 5_000, 5
    per_round = total // rounds
    service = await spawn({"cache": {"max_entries": MAX_ENTRIES}, "introspectors": [opaque_introspector(idp)]})
    tokens = [idp.issue_opaque({"sub": f"opaque-user-{i}"}) for i in range(total)]

    def verify(i: int, answer: Answer) -> str | None:
        if not answer.allowed or answer.headers.get("x-user-id") != f"opaque-user-{i}":
            return f"{answer.response.status.message} {answer.headers.get('x-user-id')}"
        return None

    tally = Tally()
    rss = [service.rss()]
    deadline = time.monotonic() + 30
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = AuthorizationClient(channel)
        for r in range(rounds):
            await run_round(
                stub,
                range(r * per_round, (r + 1) * per_round),
                lambda i: check_request(token=tokens[i]),
                verify,
                tally,
                deadline,
            )
            rss.append(service.rss())
            if time.monotonic() >= deadline:
                break
        assert not tally.lost, tally.lost[:5]
        assert not tally.wrong, tally.wrong[:5]
        assert tally.answered == tally.sent
        assert tally.sent >= 3 * per_round, f"only {tally.sent} checks in the time budget"
        sent = tally.sent
        assert idp.hits["introspect"] == sent  # every token was new: one introspection each, no more
        before = await service.metrics()
        # The newest token is still cached; the oldest fell out of the bounded LRU long ago.
        newest, oldest = tokens[sent - 1], tokens[0]
        assert Answer.of(await stub.Check(check_request(token=newest), timeout=10)).allowed
        assert idp.hits["introspect"] == sent
        assert Answer.of(await stub.Check(check_request(token=oldest), timeout=10)).allowed
        assert idp.hits["introspect"] == sent + 1
        after = await service.metrics()

    def events(samples: dict[Any, float], event: str, cache: str = "opaque") -> float:
        return samples.get(("authz_cache_events_total", (("cache", cache), ("event", event))), 0.0)

    assert events(before, "miss") == sent
    assert events(before, "hit") == 0
    # The newest is answered by the verified-token cache in front of the token cache; the oldest
    # had fallen out of both bounded LRUs and is a miss in each.
    assert events(after, "hit", "verified") - events(before, "hit", "verified") == 1
    assert (events(after, "hit"), events(after, "miss")) == (0, sent + 1)
    ok, report = levels_off(rss[1:])
    assert ok, report


# --------------------------------------------------------------------------- (c) nothing lost under concurrency


def allowed_as(user: str, *, sub_claim: bool = False) -> Callable[[Answer], bool]:
    """Expect an allow for exactly this user (with sub_claim: also the sub in x-auth-claims)."""

    def expect(answer: Answer) -> bool:
        if not answer.allowed or answer.headers["x-user-id"] != user:
            return False
        return not sub_claim or answer.claims()["sub"] == user

    return expect


async def test_2000_concurrent_mixed_checks_each_get_their_own_answer(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    service = await start_service(
        {
            "cache": {"max_entries": MAX_ENTRIES},
            "introspectors": [HS_INTROSPECTOR, opaque_introspector(idp)],
            "response": {"claim_headers": {"email": "x-user-email"}},
            "policies": [
                {"id": "api", "engine": "matcho", "matcho": {"uri": "#^/api/", "headers": {"x-expect": "#^allow"}}},
                {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public/"}},
            ],
        }
    )
    shared = mint(claims_for(-1))  # one token many requests share: the verified-cache path under concurrency
    now = int(time.time())
    kinds = [
        "allow",
        "allow-shared",
        "opaque",
        "forbidden",
        "public",
        "missing",
        "expired",
        "bad-signature",
        "two-values",
        "inactive",
    ]
    cases: list[tuple[str, pb.CheckRequest, Callable[[Answer], bool]]] = []
    for i in range(2000):
        kind = kinds[i % len(kinds)]
        user = f"soak-user-{i}"
        expect: Callable[[Answer], bool]
        if kind == "allow":
            request = check_request(f"/api/{i}", token=mint(claims_for(i)), headers={"x-expect": f"allow-{i}"})
            expect = allowed_as(user, sub_claim=True)
        elif kind == "allow-shared":
            request = check_request(f"/api/{i}", token=shared, headers={"x-expect": f"allow-{i}"})
            expect = lambda a: a.allowed and a.headers["x-user-id"] == "soak-user--1"  # noqa: E731
        elif kind == "opaque":
            token = idp.issue_opaque({"sub": f"opaque-{i}"})
            request = check_request(f"/api/{i}", token=token, headers={"x-expect": "allow"})
            expect = allowed_as(f"opaque-{i}")
        elif kind == "forbidden":
            request = check_request(f"/admin/{i}", token=mint(claims_for(i)))
            expect = lambda a: (a.code, a.http_status, a.response.status.message) == (7, 403, "forbidden")  # noqa: E731
        elif kind == "public":
            request = check_request(f"/public/{i}")
            expect = lambda a: a.allowed and "x-user-id" not in a.headers and "x-user-id" in a.removed  # noqa: E731
        elif kind == "missing":
            request = check_request(f"/api/{i}")
            expect = lambda a: (a.http_status, a.response.status.message) == (401, "missing_token")  # noqa: E731
        elif kind == "expired":
            expired = mint(claims_for(i, exp=now - 3600))
            request = check_request(f"/api/{i}", token=expired, headers={"x-expect": "allow"})
            expect = lambda a: (a.http_status, a.response.status.message) == (401, "expired")  # noqa: E731
        elif kind == "bad-signature":
            request = check_request(f"/api/{i}", token=mint(claims_for(i))[:-4] + "AAAA", headers={"x-expect": "allow"})
            expect = lambda a: (a.http_status, a.response.status.message) == (401, "bad_signature")  # noqa: E731
        elif kind == "two-values":
            joined = f"Bearer {mint(claims_for(i))},Bearer {shared}"
            request = check_request(f"/api/{i}", headers={"authorization": joined})
            expect = lambda a: (a.code, a.http_status) == (3, 400)  # noqa: E731
        else:
            request = check_request(f"/api/{i}", token=f"not-issued-{i}", headers={"x-expect": "allow"})
            expect = lambda a: (a.http_status, a.response.status.message) == (401, "inactive")  # noqa: E731
        cases.append((kind, request, expect))

    # All 2,000 at once on one connection, as one busy Envoy worker would send them.
    results = await asyncio.wait_for(
        asyncio.gather(*(service.stub.Check(request, timeout=60) for _, request, _ in cases), return_exceptions=True),
        timeout=60,
    )
    assert len(results) == len(cases) == 2000
    wrong, lost = [], []
    for i, ((kind, _, expect), result) in enumerate(zip(cases, results, strict=True)):
        if isinstance(result, BaseException):
            code = result.code() if isinstance(result, grpc.aio.AioRpcError) else None
            lost.append((i, kind, code, repr(result)[:80]))
            continue
        answer = Answer.of(result)
        if not expect(answer):
            wrong.append((i, kind, answer.code, answer.response.status.message, answer.headers.get("x-user-id")))
    # Every answer that came back is the right one for its own request (no cross-talk between requests)...
    assert not wrong, (len(wrong), wrong[:10])
    # ...and none was lost: Envoy would turn a lost Check into a denial of a legitimate request.
    assert not lost, (f"{len(lost)} of 2000 concurrent checks got no answer", lost[:5])
