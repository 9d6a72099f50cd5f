"""Readiness is true: NOT_SERVING and /readyz 503 until every required JWKS introspector has keys.

A real IdP on 127.0.0.1 answers 404 for its discovery document and JWKS until it recovers; the
service retries in the background (backoff capped at 5 s: tests/unit/test_jwks.py steps the
schedule) and turns SERVING, for "" and the Authorization service, once the keys arrive. Static
keys and opaque introspectors are ready at once; an `optional` one never holds readiness; a
reload never makes a ready process unready (docs/operations.md, "Readiness").
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2

from authz_service.devstack.idp import DevIdentityProvider
from authz_service.server.grpc import HEALTH_SERVICES
from tests.conftest import StartService
from tests.harness import Harness, HealthClient, config_from, watched_status

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WITH_ADMIN = {"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0"}
HMAC = {"id": "hmac", "type": "jwt", "jwt": {"iss": "https://hmac.example", "secret": "h" * 32}}


class MisroutedIdp(DevIdentityProvider):
    """The demo IdP behind a proxy that answers 404 for its discovery document and JWKS until `recover()`."""

    def __init__(self) -> None:
        super().__init__()
        self.missing = True

    def recover(self) -> None:
        self.missing = False

    async def _handle_discovery(self, request: web.Request) -> web.StreamResponse:
        if self.missing:
            return web.Response(status=404)
        return await super()._handle_discovery(request)

    async def _handle_jwks(self, request: web.Request) -> web.StreamResponse:
        if self.missing:
            return web.Response(status=404)
        return await super()._handle_jwks(request)


@pytest.fixture
async def idp() -> AsyncIterator[MisroutedIdp]:
    # Made off the loop: generating its RSA key can take a quarter second.
    async with await asyncio.to_thread(MisroutedIdp) as provider:
        yield provider


def discovering(idp: DevIdentityProvider, **overrides: Any) -> dict[str, Any]:
    return {"id": "idp", "type": "jwt", "discovery": True, "jwt": {"iss": idp.issuer}, **overrides}


def from_jwks(idp: DevIdentityProvider, ident: str = "idp", **overrides: Any) -> dict[str, Any]:
    return {"id": ident, "type": "jwt", "jwks_uri": idp.jwks_uri, "jwt": {"iss": idp.issuer}, **overrides}


async def readyz(service: Harness) -> tuple[int, Any]:
    admin = service.service.admin
    assert admin is not None
    async with aiohttp.ClientSession() as session, session.get(f"http://{admin.address}/readyz") as response:
        return response.status, await response.json()


async def health(service: Harness) -> list[int]:
    """The status of "" and of the Authorization service."""
    stub = HealthClient(service.channel)
    replies = [await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5) for name in HEALTH_SERVICES]
    return [reply.status for reply in replies]


async def test_not_ready_while_discovery_answers_404_then_serving_once_it_recovers(
    idp: MisroutedIdp, start_service: StartService
) -> None:
    service = await start_service({"server": WITH_ADMIN, "introspectors": [discovering(idp)]})
    assert await readyz(service) == (
        503,
        {"status": "not_ready", "introspectors": {"idp": f"no keys yet: http_404 from {idp.discovery_url}"}},
    )
    assert await health(service) == [NOT_SERVING, NOT_SERVING]
    assert (await service.check(token=idp.mint())).http_status == 503  # a check that comes anyway: no keys
    watch = HealthClient(service.channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert await watched_status(watch, 5) == NOT_SERVING
    idp.recover()
    # No request asks for keys now: the background retry (at most 5 s away) fetches them.
    assert await watched_status(watch, 10) == SERVING
    watch.cancel()
    assert await health(service) == [SERVING, SERVING]
    assert await readyz(service) == (200, {"status": "ready", "introspectors": {"idp": "ready"}})
    assert (await service.check(token=idp.mint())).allowed


async def test_static_keys_are_ready_at_once_and_an_optional_introspector_never_holds_readiness(
    idp: MisroutedIdp, start_service: StartService
) -> None:
    service = await start_service({"server": WITH_ADMIN, "introspectors": [HMAC, from_jwks(idp, optional=True)]})
    assert await health(service) == [SERVING, SERVING]
    assert await readyz(service) == (
        200,
        {
            "status": "ready",
            "introspectors": {
                "hmac": "ready",
                "idp": f"no keys yet: http_404 from {idp.jwks_uri} (optional: readiness does not wait for it)",
            },
        },
    )
    idp.recover()
    assert (await service.check(token=idp.mint())).allowed  # its keys still come, when asked for


async def test_the_fetch_failure_log_names_the_introspector_and_the_url_without_its_secrets(
    idp: MisroutedIdp, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="authz_service")
    secret_uri = idp.jwks_uri.replace("http://", "http://svc:pa55word@") + "?api_key=s3cr3t"
    service = await start_service({"server": WITH_ADMIN, "introspectors": [from_jwks(idp, jwks_uri=secret_uri)]})
    [record] = [r for r in caplog.records if r.getMessage() == "JWKS fetch failed"]  # the warm-up's
    fields = record.fields  # type: ignore[attr-defined]
    assert (fields["introspector"], fields["url"], fields["outcome"]) == ("idp", idp.jwks_uri, "http_404")
    status, body = await readyz(service)
    assert status == 503
    shown = caplog.text + json.dumps(fields) + json.dumps(body)
    assert "pa55word" not in shown
    assert "s3cr3t" not in shown


async def test_a_reload_never_makes_a_ready_process_unready_and_readyz_names_what_lacks_keys(
    idp: MisroutedIdp, start_service: StartService
) -> None:
    service = await start_service({"server": WITH_ADMIN, "introspectors": [HMAC]})
    assert await health(service) == [SERVING, SERVING]
    # An operator adds an introspector whose IdP is down: every replica gets it at once.
    await service.service.reload(config_from({"server": WITH_ADMIN, "introspectors": [HMAC, from_jwks(idp)]}))
    assert await health(service) == [SERVING, SERVING]
    status, body = await readyz(service)
    assert status == 200
    assert body["introspectors"]["idp"] == f"no keys yet: http_404 from {idp.jwks_uri}"
    idp.recover()
    assert (await service.check(token=idp.mint())).allowed
    assert (await readyz(service))[1]["introspectors"]["idp"] == "ready"


async def test_before_ready_a_reload_that_drops_the_keyless_introspector_makes_it_ready(
    idp: MisroutedIdp, start_service: StartService
) -> None:
    service = await start_service({"server": WITH_ADMIN, "introspectors": [HMAC, from_jwks(idp)]})
    became_ready: list[bool] = []
    service.service.on_ready(lambda: became_ready.append(True))  # how a worker's ready marker is made
    assert became_ready == []
    watch = HealthClient(service.channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert await watched_status(watch, 5) == NOT_SERVING
    await service.service.reload(config_from({"server": WITH_ADMIN, "introspectors": [HMAC]}))
    assert await watched_status(watch, 5) == SERVING
    watch.cancel()
    assert became_ready == [True]
    assert await readyz(service) == (200, {"status": "ready", "introspectors": {"hmac": "ready"}})
