"""Signals on a real service process: SIGHUP reloads atomically, SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import Spawn, Spawned, exit_code, jwks_introspector, opaque_introspector
from tests.harness import Answer, AuthorizationClient, HealthClient, check_request, watched_status

pytestmark = pytest.mark.slow  # service subprocesses, and a drain on the wall clock


async def _check(port: int, path: str = "/", token: str | None = None) -> Answer:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return Answer.of(await AuthorizationClient(channel).Check(check_request(path, token=token), timeout=10))


async def _log_lines(spawned: Spawned, message: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    end = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in spawned.log.read_text().splitlines() if line.startswith("{")]
        found = [line for line in lines if line.get("msg") == message]
        if found or time.monotonic() > end:
            return found
        await asyncio.sleep(0.05)


async def test_sighup_reloads_and_keeps_unchanged_introspectors(idp: DevIdentityProvider, spawn: Spawn) -> None:
    config = {"introspectors": [jwks_introspector(idp), opaque_introspector(idp)]}
    spawned = await spawn(config)
    opaque = idp.issue_opaque()
    assert (await _check(spawned.port, "/admin", idp.mint())).allowed
    assert (await _check(spawned.port, "/admin", opaque)).allowed
    assert idp.hits["jwks"] == 1
    assert idp.hits["introspect"] == 1

    # New config: same introspectors, plus a policy that keeps /admin for admins.
    server = yaml.safe_load(spawned.path.read_text())["server"]
    policy = {"id": "no-admin", "engine": "matcho", "matcho": {"uri": {"$not": "#^/admin"}}}
    spawned.path.write_text(yaml.safe_dump({**config, "server": server, "policies": [policy]}))
    spawned.process.send_signal(signal.SIGHUP)
    assert await _log_lines(spawned, "config reloaded")

    assert (await _check(spawned.port, "/admin", idp.mint())).http_status == 403
    assert (await _check(spawned.port, "/home", idp.mint())).allowed
    assert (await _check(spawned.port, "/home", opaque)).allowed
    # JWKS keys and the opaque token cache of the unchanged introspectors survived the reload.
    assert idp.hits["jwks"] == 1
    assert idp.hits["introspect"] == 1


async def test_sighup_with_a_bad_config_keeps_the_old_one(idp: DevIdentityProvider, spawn: Spawn) -> None:
    spawned = await spawn({"introspectors": [jwks_introspector(idp)]})
    good = spawned.path.read_text()
    spawned.path.write_text(
        good.replace("cache_ttl", "x") + "\npolicies: [{id: p, engine: matcho, matcho: {uri: '#('}}]\n"
    )
    spawned.process.send_signal(signal.SIGHUP)
    rejected = await _log_lines(spawned, "config reload rejected; keeping the running config")
    assert rejected
    assert any("policy 'p'" in p for p in rejected[0]["problems"])
    assert (await _check(spawned.port, "/", idp.mint())).allowed
    assert spawned.process.returncode is None


async def test_sigterm_goes_not_serving_drains_and_exits_zero(idp: DevIdentityProvider, spawn: Spawn) -> None:
    spawned = await spawn({"introspectors": [jwks_introspector(idp)]}, server={"drain_delay": 1.5})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{spawned.port}") as channel:
        health = HealthClient(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"))
        assert await watched_status(watch) == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        spawned.process.send_signal(signal.SIGTERM)
        assert await watched_status(watch, 5) == health_pb2.HealthCheckResponse.NOT_SERVING
        # While draining, checks are still answered (Envoy moves away on its own schedule).
        answer = Answer.of(await AuthorizationClient(channel).Check(check_request(token=idp.mint()), timeout=5))
        assert answer.allowed
    assert await exit_code(spawned.process, 15 - (time.monotonic() - started)) == 0
    assert time.monotonic() - started >= 1.5
