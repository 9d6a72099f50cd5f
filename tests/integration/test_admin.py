"""The admin HTTP server and decision logs: /healthz, /readyz, /metrics, one redacted line per decision."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web

from authz_service.devstack.idp import DevIdentityProvider
from authz_service.server.service import AuthzService
from tests.api_harness import API_TOKEN, config_with_api
from tests.certs import make_pki
from tests.conftest import Spawn, StartService, free_port, jwks_introspector, opaque_introspector
from tests.harness import Harness


async def _get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _admin_port(service: Harness) -> int:
    admin = service.service.admin
    assert admin is not None, "no admin server"
    assert admin.port is not None, "admin server not started"
    return admin.port


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a decision log line carries (logged as `extra={"fields": ...}`)."""
    fields: dict[str, Any] = record.__dict__["fields"]
    return fields


async def test_healthz_readyz_and_draining(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service(
        {
            "server": {"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0"},
            "introspectors": [jwks_introspector(idp)],
        }
    )
    port = _admin_port(service)
    assert await _get(port, "/healthz") == (200, '{"status": "alive"}')
    assert (await _get(port, "/readyz"))[0] == 200
    assert idp.hits["jwks"] == 1  # ready only after the first JWKS fetch was attempted
    await service.service.health.enter_graceful_shutdown()
    service.service.ready = False
    assert (await _get(port, "/readyz"))[0] == 503


async def test_metrics_count_decisions_caches_and_upstream_calls(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    service = await start_service(
        {
            "server": {"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0"},
            "introspectors": [jwks_introspector(idp, max_stale=60), opaque_introspector(idp)],
        }
    )
    token = idp.issue_opaque()
    for _ in range(3):
        assert (await service.check(token=token)).allowed
    assert (await service.check(token=idp.mint())).allowed
    assert (await service.check()).http_status == 401
    assert (await service.check(token=idp.mint({"exp": 1}))).http_status == 401
    _, text = await _get(_admin_port(service), "/metrics")
    assert _metric(text, "authz_checks_total", decision="allow", reason="allowed") == 4
    assert _metric(text, "authz_checks_total", decision="unauthenticated", reason="missing_token") == 1
    assert _metric(text, "authz_checks_total", decision="unauthenticated", reason="expired") == 1
    assert _metric(text, "authz_check_duration_seconds_count") == 6
    assert _metric(text, "authz_cache_events_total", cache="opaque", event="miss") == 1
    assert _metric(text, "authz_cache_events_total", cache="verified", event="hit") == 2
    assert _metric(text, "authz_upstream_calls_total", endpoint="introspection", outcome="ok") == 1
    assert _metric(text, "authz_upstream_calls_total", endpoint="jwks", outcome="ok") == 1
    assert "authz_jwks_staleness_seconds" in text


async def test_one_redacted_log_line_per_decision(
    idp: DevIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    token = idp.mint({"sub": "alice", "email": "alice@example.com"})
    caplog.set_level(logging.INFO, logger="authz_service.decision")
    await service.check("/orders?access_token=" + token, token=token, headers={"x-request-id": token})
    await service.check("/orders", headers={"x-request-id": "req-42"})
    records = [r for r in caplog.records if r.name == "authz_service.decision"]
    assert len(records) == 2
    first, second = (_fields(r) for r in records)
    assert first["decision"] == "allow"
    assert first["user_id"] == "alice"
    assert first["introspector"] == "idp"
    assert first["path"] == "/orders"
    assert first["request_id"].startswith("sha256:")
    assert first["latency_ms"] >= 0
    assert second["decision"] == "unauthenticated"
    assert second["reason"] == "missing_token"
    assert second["request_id"] == "req-42"
    text = caplog.text + json.dumps([_fields(r) for r in records])
    assert token not in text
    assert "alice@example.com" not in text


async def test_decision_logs_can_be_turned_off(
    idp: DevIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)], "logging": {"decisions": "off"}})
    caplog.set_level(logging.DEBUG, logger="authz_service.decision")
    await service.check(token=idp.mint())
    assert not [r for r in caplog.records if r.name == "authz_service.decision"]


async def test_metrics_have_what_operators_expect_and_no_created_series(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    service = await start_service(
        {
            "server": {"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0"},
            "introspectors": [jwks_introspector(idp)],
        }
    )
    assert (await service.check(token=idp.mint())).allowed
    _, text = await _get(_admin_port(service), "/metrics")
    assert _metric(text, "process_cpu_seconds_total") > 0
    assert _metric(text, "process_resident_memory_bytes") > 0
    assert _metric(text, "process_open_fds") > 0
    assert "python_gc_collections_total{" in text
    assert _metric(text, "python_info") == 1
    assert _metric(text, "authz_build_info") == 1
    assert "authz_checks_in_flight 0.0" in text.splitlines()
    assert _metric(text, "authz_checks_total", decision="allow") == 1
    assert "_created" not in text  # one rule for every counter and histogram (as with workers)


async def test_checks_in_flight_are_counted_while_they_wait(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    # An introspection endpoint that answers only when the test says so: the check stays in flight.
    asked, release = asyncio.Event(), asyncio.Event()

    async def introspect(request: web.Request) -> web.Response:
        asked.set()
        await release.wait()
        return web.json_response({"active": True, "sub": "alice"})

    app = web.Application()
    app.router.add_post("/introspect", introspect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/introspect"
        service = await start_service(
            {
                "server": {"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0"},
                "introspectors": [opaque_introspector(idp, introspection_endpoint={"url": url})],
            }
        )
        check = asyncio.ensure_future(service.check(token="opaque-token-1"))
        await asyncio.wait_for(asked.wait(), 10)
        _, during = await _get(_admin_port(service), "/metrics")
        release.set()
        assert (await check).allowed
        _, after = await _get(_admin_port(service), "/metrics")
    finally:
        release.set()
        await runner.cleanup()
    assert _metric(during, "authz_checks_in_flight") == 1
    assert _metric(after, "authz_checks_in_flight") == 0


async def test_policy_allows_and_reloads_are_counted(idp: DevIdentityProvider, tmp_path: Path) -> None:
    def config(policies: list[dict[str, Any]]) -> str:
        return yaml.safe_dump(
            {
                "server": {"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0", "drain_delay": 0},
                "introspectors": [jwks_introspector(idp)],
                "policies": policies,
            }
        )

    public = {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public"}}
    orders = {"id": "orders", "engine": "matcho", "matcho": {"uri": "#^/orders"}}
    path = tmp_path / "config.yaml"
    await asyncio.to_thread(path.write_text, config([public, orders]))
    service = await AuthzService.from_file(str(path))
    await service.start()
    try:
        assert service.admin is not None
        assert service.admin.port is not None
        assert service.sync is not None
        port = service.admin.port
        harness = Harness(service, grpc.aio.insecure_channel(f"127.0.0.1:{service.port}"))
        token = idp.mint()
        for _ in range(2):
            assert (await harness.check("/public/a", token=token)).allowed
        assert (await harness.check("/orders/1", token=token)).allowed
        assert (await harness.check("/private", token=token)).http_status == 403
        _, text = await _get(port, "/metrics")
        assert _metric(text, "authz_policy_allows_total", policy="public") == 2
        assert _metric(text, "authz_policy_allows_total", policy="orders") == 1
        # A reload drops `orders` (its series goes) and adds `staff` (a series at 0).
        staff = {"id": "staff", "engine": "matcho", "matcho": {"uri": "#^/staff"}}
        await asyncio.to_thread(path.write_text, config([public, staff]))
        assert await service.sync.reload_file("sighup")
        await asyncio.to_thread(path.write_text, "introspectors: [")  # not YAML: refused, config kept
        assert not await service.sync.reload_file("sighup")
        assert (await harness.check("/public/b", token=token)).allowed
        _, text = await _get(port, "/metrics")
        await harness.channel.close()
    finally:
        await service.stop(0)
    assert _metric(text, "authz_policy_allows_total", policy="public") == 3
    assert 'authz_policy_allows_total{policy="staff"} 0.0' in text
    assert 'policy="orders"' not in text
    assert _metric(text, "authz_config_reloads_total", source="sighup", result="ok") == 1
    assert _metric(text, "authz_config_reloads_total", source="sighup", result="invalid") == 1


async def test_verified_jwt_cache_is_in_the_metrics(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service(
        {
            "server": {"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0"},
            "introspectors": [jwks_introspector(idp)],
        }
    )
    token = idp.mint()
    for _ in range(4):
        assert (await service.check(token=token)).allowed
    _, text = await _get(_admin_port(service), "/metrics")
    assert _metric(text, "authz_cache_events_total", cache="verified", event="miss") == 1
    assert _metric(text, "authz_cache_events_total", cache="verified", event="hit") == 3


# --------------------------------------------------------------------------- admin TLS


async def test_admin_tls_serves_https_only(idp: DevIdentityProvider, tmp_path: Path) -> None:
    pki = await asyncio.to_thread(make_pki, tmp_path)
    config = config_with_api(
        {"backend": "file", "path": str(tmp_path / "store")}, introspectors=[jwks_introspector(idp)]
    )
    config["server"]["admin_tls"] = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
    path = tmp_path / "config.yaml"
    await asyncio.to_thread(path.write_text, yaml.safe_dump(config))
    service = await AuthzService.from_file(str(path))
    await service.start()
    try:
        assert service.admin is not None
        port = service.admin.port
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        auth = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "text/yaml"}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=trusting) as response:
                assert (response.status, await response.json()) == (200, {"status": "alive"})
            body = "engine: matcho\nmatcho: {uri: '#^/public'}\n"
            url = f"https://127.0.0.1:{port}/AccessPolicy/public"
            async with session.put(url, data=body, headers=auth, ssl=trusting) as response:
                assert response.status == 201
            # Plain HTTP on the TLS port: no answer at all (the token never travels in clear).
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    await response.read()
            # A client that does not trust the certificate refuses it.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=ssl.create_default_context()):
                    pass
    finally:
        await service.stop(0)


@pytest.mark.slow  # a service subprocess
async def test_start_up_warns_when_the_api_is_served_over_plain_http(
    spawn: Spawn, idp: DevIdentityProvider, tmp_path: Path
) -> None:
    admin = free_port()
    config = {
        "introspectors": [jwks_introspector(idp)],
        "api": {"token": API_TOKEN, "store": {"backend": "file", "path": str(tmp_path / "store")}},
    }
    spawned = await spawn(config, server={"admin_address": f"0.0.0.0:{admin}"})
    text = await asyncio.to_thread(spawned.log.read_text)
    warnings = [
        json.loads(line)
        for line in text.splitlines()
        if line.startswith("{") and "takes bearer tokens over plain HTTP" in line
    ]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["msg"].startswith(
        f"api: the resource API on 0.0.0.0:{admin} takes bearer tokens over plain HTTP"
    )
    assert API_TOKEN not in text
