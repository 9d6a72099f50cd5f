"""The admin HTTP server and decision logs: /healthz, /readyz, /metrics, one redacted line per decision."""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
import pytest

from authz_service.devstack.idp import DevIdentityProvider
from authz_service.observe import redact
from tests.conftest import StartService, jwks_introspector, opaque_introspector
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


def test_redaction_helper() -> None:
    assert redact.identifier("req-1.2:3_x") == "req-1.2:3_x"
    assert redact.identifier("eyJhbGciOiJIUzI1NiJ9").startswith("sha256:")
    assert redact.identifier("has space").startswith("sha256:")
    assert redact.identifier("x" * 129).startswith("sha256:")
    assert redact.path("/a/b?token=secret") == "/a/b"
    assert redact.user_id("u" * 500) == "u" * 128


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
