"""Overload: bounded queueing with fast 503s, never an allow, and no work for callers who left."""

from __future__ import annotations

import asyncio
import http.client
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import grpc

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_service.decisionlog import log_internal_error
from authz_service.decisionlog import log_via_logging as log_decision
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.model import Reason
from authz_service.server.grpc import MIN_PENDING, AuthorizationServicer, pending_bound
from authz_service.server.http_granian import GranianHttpServer
from tests.conftest import StartService, jwks_introspector
from tests.harness import Answer, check_request


async def test_grpc_sheds_past_max_concurrent_checks_and_recovers(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    await idp.go_offline()  # no keys yet: every check waits for the one JWKS fetch below
    service = await start_service(
        {
            "server": {"grpc_address": "127.0.0.1:0", "admin_address": None, "max_concurrent_checks": 3},
            "introspectors": [jwks_introspector(idp)],
        }
    )
    idp.delay = 0.5
    await idp.go_online()
    token = idp.mint()

    async def one() -> Any:
        started = time.monotonic()
        try:
            return await service.check(token=token), time.monotonic() - started
        except grpc.aio.AioRpcError as err:
            return err.code(), time.monotonic() - started

    results = await asyncio.gather(*(one() for _ in range(10)))
    allowed = [elapsed for outcome, elapsed in results if isinstance(outcome, Answer) and outcome.allowed]
    shed = [elapsed for outcome, elapsed in results if outcome == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(allowed) == 3  # admitted: they waited for the keys
    assert len(shed) == 7  # the rest: a fast no (Envoy answers it with status_on_error, a 503)
    assert max(shed) < 0.4
    assert len(allowed) + len(shed) == len(results)  # nothing was allowed that was not checked
    # Load gone: everything is answered again at once.
    assert all([(await service.check(token=token)).allowed for _ in range(10)])


async def test_http_sheds_past_max_concurrent_checks_with_a_503(
    idp: DevIdentityProvider, start_service: StartService, http_engine: str
) -> None:
    await idp.go_offline()
    service = await start_service(
        {
            "server": {
                "grpc_address": "127.0.0.1:0",
                "admin_address": None,
                "http_address": "127.0.0.1:0",
                "http_engine": http_engine,
                "max_concurrent_checks": 3,
            },
            "introspectors": [jwks_introspector(idp)],
        }
    )
    idp.delay = 0.5
    await idp.go_online()
    assert service.service.http is not None
    url = f"http://127.0.0.1:{service.service.http.port}/ext_authz/x"
    headers = {"Authorization": f"Bearer {idp.mint()}"}
    async with aiohttp.ClientSession() as session:

        async def one() -> tuple[int, str]:
            async with session.get(url, headers=headers) as response:
                return response.status, (await response.text())

        results = await asyncio.gather(*(one() for _ in range(10)))
        assert sorted(status for status, _ in results) == [200] * 3 + [503] * 7
        assert all("too many checks in flight" in body for status, body in results if status == 503)
        assert service.service.http.runner.in_flight == 0  # the shed ones too, not only the answered
        statuses = [await one() for _ in range(5)]
        assert [status for status, _ in statuses] == [200] * 5


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One blocking GET on its own connection (run in a thread: the test holds the loop)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


async def test_granian_sheds_checks_queued_for_the_loop_past_max_concurrent_checks(
    idp: DevIdentityProvider, start_service: StartService, loop_may_block: None
) -> None:
    # A cached check never suspends, so no more than one is ever in flight: the bound has to count
    # the requests granian handed over that still wait for the loop, or it would never shed.
    service = await start_service(
        {
            "server": {
                "grpc_address": "127.0.0.1:0",
                "admin_address": None,
                "http_address": "127.0.0.1:0",
                "http_engine": "granian",
                "max_concurrent_checks": 3,
            },
            "introspectors": [jwks_introspector(idp)],
        }
    )
    server = service.service.http
    assert isinstance(server, GranianHttpServer)
    assert server.port is not None
    headers = {"Authorization": f"Bearer {idp.mint()}"}
    assert (await asyncio.to_thread(_get, server.port, "/ext_authz/x", headers))[0] == 200  # keys, token cached
    before = server.handed_over
    paths = ["/ext_authz/x"] * 9 + ["/healthz"]
    with ThreadPoolExecutor(len(paths)) as pool:
        futures = []
        for path in paths:  # in this order: granian hands them over one connection at a time
            futures.append(pool.submit(_get, server.port, path, headers))
            deadline = time.monotonic() + 10
            # The loop is held here, so every request handed over queues behind this step.
            while server.handed_over < before + len(futures) and time.monotonic() < deadline:
                time.sleep(0.002)  # noqa: ASYNC251 (holding the loop is the point)
        assert server.handed_over == before + len(paths)
        results = [await asyncio.wrap_future(future) for future in futures]
    checks, health = results[:-1], results[-1]
    assert [status for status, _ in checks] == [200] * 3 + [503] * 6  # three admitted, the rest a fast no
    assert all(b"too many checks in flight" in body for status, body in checks if status == 503)
    assert health[0] == 200  # a busy service is still alive
    assert server.finished == server.handed_over  # nothing left counted as waiting
    assert server.runner.in_flight == 0
    # The queue gone, checks are admitted again.
    assert [(await asyncio.to_thread(_get, server.port, "/ext_authz/x", headers))[0] for _ in range(5)] == [200] * 5


class _GoneCaller:
    """The one thing Check asks of its context: how long the caller still waits (it has left)."""

    def time_remaining(self) -> float:
        return 0.0


async def test_a_check_whose_caller_has_left_is_not_computed(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    servicer = AuthorizationServicer(
        service.service.current_engine,
        service.service.metrics,
        log_decision=log_decision,
        log_internal_error=log_internal_error,
    )
    verified = service.service.engine.verified
    before = (verified.hits, verified.misses)
    raw = check_request("/x", token=idp.mint()).SerializeToString()
    answer = Answer.of(pb.CheckResponse.FromString(await servicer.Check(raw, _GoneCaller())))  # type: ignore[arg-type]
    assert answer.http_status == 503
    assert answer.response.status.message == Reason.DEADLINE_EXCEEDED.label
    assert (verified.hits, verified.misses) == before  # not even a cache lookup


def test_grpc_cores_pending_queue_is_bounded_like_the_checks_in_flight() -> None:
    # The queue ahead of Python: as long as max_concurrent_checks (a burst of that many fits), never
    # shorter than grpc's own 1,000, never the 10,000 that let admitted checks wait out Envoy's 3 s.
    assert pending_bound(None) == MIN_PENDING == 1024
    assert pending_bound(3) == MIN_PENDING
    assert pending_bound(2048) == 2048
