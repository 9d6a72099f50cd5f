"""Shared fixtures: a real identity provider and real services on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from authz_service.config.model import HTTP_ENGINES
from authz_service.devstack.idp import DevIdentityProvider
from tests.api_harness import ApiService, config_with_api, start_api_service
from tests.harness import (
    POLLING_CHANNEL,
    Harness,
    HealthClient,
    authentication_only_unless_policies,
    config_from,
    start_harness,
)
from tests.hostile_idp import HostileIdentityProvider

StartService = Callable[[Mapping[str, Any]], Awaitable[Harness]]
StartApi = Callable[..., Awaitable[ApiService]]  # keyword arguments: config sections


async def new_idp(issuer: str | None = None) -> HostileIdentityProvider:
    """An identity provider, made off the loop: generating its RSA key can take a quarter second."""
    return await asyncio.to_thread(HostileIdentityProvider, issuer)


@pytest.fixture
async def idp() -> AsyncIterator[HostileIdentityProvider]:
    """A running identity provider on an ephemeral loopback port (the dev IdP plus failure modes)."""
    async with await new_idp() as provider:
        yield provider


@pytest.fixture
async def start_service() -> AsyncIterator[StartService]:
    """Start services from config dicts; all are stopped after the test."""
    started: list[Harness] = []

    async def start(config: Mapping[str, Any]) -> Harness:
        harness = await start_harness(config_from(config))
        started.append(harness)
        return harness

    yield start
    for harness in started:
        await harness.close()


@pytest.fixture
async def start_api(tmp_path: Path) -> AsyncIterator[StartApi]:
    """Start services with the resource API on a file store (tmp_path/store) from config sections
    (`introspectors=[...]`); all are stopped after the test."""
    started: list[ApiService] = []

    async def start(**sections: Any) -> ApiService:
        config = config_with_api({"backend": "file", "path": str(tmp_path / "store")}, **sections)
        service = await start_api_service(tmp_path / f"config-{len(started)}.yaml", config)
        started.append(service)
        return service

    yield start
    for service in started:
        await service.close()


@pytest.fixture(params=HTTP_ENGINES)
def http_engine(request: pytest.FixtureRequest) -> str:
    """Each of HTTP mode's servers (`server.http_engine`): a test that takes it runs on both."""
    engine: str = request.param
    return engine


async def sleep_past(deadline: float, margin: float = 0.05) -> None:
    """Sleep until the wall clock is `margin` seconds past `deadline` (epoch seconds, e.g. a token's exp)."""
    await asyncio.sleep(max(0.0, deadline - time.time()) + margin)


def jwks_introspector(provider: DevIdentityProvider, **overrides: Any) -> dict[str, Any]:
    """A jwt introspector trusting the provider's JWKS (audience authz-service)."""
    resource: dict[str, Any] = {
        "id": "idp",
        "resourceType": "TokenIntrospector",
        "type": "jwt",
        "jwks_uri": provider.jwks_uri,
        "jwt": {"iss": provider.issuer, "aud": "authz-service"},
    }
    jwt_overrides = overrides.pop("jwt", {})
    resource.update(overrides)
    resource["jwt"].update(jwt_overrides)
    return resource


def tail(path: Path, lines: int = 30) -> str:
    """The end of a log file, for failure messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def wait_serving(
    port: int, process: asyncio.subprocess.Process, deadline: float = 20.0, log: Path | None = None
) -> None:
    """Poll gRPC health until the service process reports SERVING; fail if it exits (quoting the
    end of its `log`, when given) or takes too long."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=POLLING_CHANNEL) as channel:
        stub = HealthClient(channel)
        while True:
            assert process.returncode is None, "service exited during start-up" + (f":\n{tail(log)}" if log else "")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert loop.time() < end, "service did not become SERVING"
            await asyncio.sleep(0.02)  # a start-up takes seconds: polling finely costs nothing


async def run_service(config: Path, output: Path, *, log_level: str = "info") -> asyncio.subprocess.Process:
    """`python -m authz_service --config FILE` as a subprocess, stdout and stderr into `output`."""
    with output.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "authz_service",
            "--config",
            str(config),
            "--log-level",
            log_level,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def exit_code(process: asyncio.subprocess.Process, timeout: float) -> int:
    """The exit code, waited for without blocking the loop; SIGKILL and fail after `timeout` seconds."""
    try:
        return await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        pytest.fail(f"process {process.pid} did not exit within {timeout:g} s")


@dataclass
class Spawned:
    """A service subprocess: its gRPC port, config file and process."""

    port: int
    path: Path
    process: asyncio.subprocess.Process
    log: Path


class Spawn(Protocol):
    """The `spawn` fixture: start a service subprocess from a config dict (plus `server` settings)."""

    async def __call__(self, config: Mapping[str, Any], server: Mapping[str, Any] | None = None) -> Spawned: ...


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start `authz-service --config` subprocesses; each is SIGTERMed after the test."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(config: Mapping[str, Any], server: Mapping[str, Any] | None = None) -> Spawned:
        port = free_port()
        settings = {"grpc_address": f"127.0.0.1:{port}", "admin_address": None, "drain_delay": 0, **(server or {})}
        path = tmp_path / f"config-{port}.yaml"
        path.write_text(yaml.safe_dump(authentication_only_unless_policies({**config, "server": settings})))
        log = tmp_path / f"service-{port}.log"
        process = await run_service(path, log)
        processes.append(process)
        await wait_serving(port, process)
        return Spawned(port, path, process, log)

    yield start
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        assert await exit_code(process, 15) == 0  # SIGTERM drains and exits 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on 127.0.0.1 for the whole session (installed by ./dev test)."""
    import shutil
    import socket
    import subprocess
    import tempfile

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; run the suite through ./dev test")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="authz-redis-")
    process = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


def opaque_introspector(provider: DevIdentityProvider, **overrides: Any) -> dict[str, Any]:
    """An opaque introspector asking the provider's RFC 7662 endpoint."""
    resource: dict[str, Any] = {
        "id": "opaque",
        "type": "opaque",
        "introspection_endpoint": {
            "url": provider.introspection_url,
            "authorization": provider.introspection_authorization,
        },
    }
    resource.update(overrides)
    return resource
