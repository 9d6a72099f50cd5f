"""The whole stack on loopback: a real Envoy (the shipped envoy/envoy.yaml), the service as a
subprocess, the dev identity provider and an echo upstream. Nothing is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from authz_service.devstack.echo import EchoUpstream
from authz_service.devstack.envoy import ENVOY_YAML, Envoy, StartError, load_config, on_loopback
from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import free_port, jwks_introspector, opaque_introspector, run_service, tail, wait_serving

START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
# Long enough for Envoy's health checks (1 s interval, 2 failures) to see NOT_SERVING before the exit.
ENVOY_DRAIN_DELAY = 4.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is `e2e` and `slow`, also in a module that forgets its pytestmark."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)


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


async def stop_process(process: asyncio.subprocess.Process, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, wait without blocking the loop, SIGKILL on timeout; returns the exit code."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return await asyncio.wait_for(process.wait(), 5)


@dataclass
class AuthzProcess:
    """`python -m authz_service --config FILE` running as a subprocess."""

    process: asyncio.subprocess.Process
    port: int  # the listener it was waited for
    log: Path
    config: Path


class EnvoyProcess:
    """The devstack's running Envoy, read the way the tests read it (authz health, access log)."""

    def __init__(self, envoy: Envoy, authz_host: str) -> None:
        self.envoy = envoy
        self.authz_host = authz_host
        self.url = envoy.url
        self.process = envoy.child.process
        self.log = envoy.child.log
        self.access_log = envoy.access_log

    async def admin(self, session: aiohttp.ClientSession, path: str) -> tuple[int, str]:
        """GET an admin endpoint: (status, body)."""
        return await self.envoy.admin_get(session, path)

    async def authz_health_flags(self, session: aiohttp.ClientSession) -> str:
        """The authz host's health flags (e.g. `healthy`)."""
        return (await self.envoy.health_flags(session, "authz")).get(self.authz_host, "")

    def access_log_entries(self) -> list[dict[str, Any]]:
        """The JSON access log lines written so far."""
        try:
            text = self.access_log.read_text()
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def envoy_config(authz_port: int, upstream_port: int, listener_port: int, admin_port: int) -> dict[str, Any]:
    """The shipped envoy/envoy.yaml with only its ports (and loopback addresses) replaced."""
    return on_loopback(
        load_config(ENVOY_YAML),
        listener=listener_port,
        admin=admin_port,
        clusters={"authz": authz_port, "upstream": upstream_port},
    )


@pytest.fixture
async def echo() -> AsyncIterator[EchoUpstream]:
    async with EchoUpstream() as upstream:
        yield upstream


@asynccontextmanager
async def run_authz(idp: DevIdentityProvider, workdir: Path, drain_delay: float = 0.0) -> AsyncIterator[AuthzProcess]:
    """The service as a subprocess, trusting the IdP's JWKS and its introspection endpoint, until
    the block ends."""
    port = free_port()
    config = {
        "server": {"grpc_address": f"127.0.0.1:{port}", "admin_address": None, "drain_delay": drain_delay},
        # `access_token` in the query is a token source too (WebSocket and download links).
        "introspectors": [jwks_introspector(idp, from_params=["access_token"]), opaque_introspector(idp)],
        # Any verified token, as with no policies; named, so the access log can show which allowed.
        "policies": [{"id": "signed-in", "engine": "allow", "introspectors": ["idp", "opaque"]}],
    }
    path = workdir / "authz.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / "authz.log"
    process = await run_service(path, log)
    try:
        await wait_serving(port, process, START_TIMEOUT, log)
        yield AuthzProcess(process, port, log, path)
    finally:
        await stop_process(process)


@asynccontextmanager
async def run_http_service(
    config: dict[str, Any], workdir: Path, session: aiohttp.ClientSession
) -> AsyncIterator[AuthzProcess]:
    """The service as a subprocess on this config (written to workdir/authz.yaml), yielded once its
    HTTP listener (`server.http_address`) is ready; it must exit 0 when the block ends."""
    port = int(config["server"]["http_address"].rpartition(":")[2])
    path = workdir / "authz.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / "authz.log"
    process = await run_service(path, log)
    try:

        async def serving() -> bool:
            assert process.returncode is None, tail(log)
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(serving, START_TIMEOUT, "the HTTP listener to be ready")
        yield AuthzProcess(process, port, log, path)
    finally:
        assert await stop_process(process) == 0


@pytest.fixture
async def authz(
    idp: DevIdentityProvider, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[AuthzProcess]:
    """The service as a subprocess (run_authz), for one test.

    No drain on SIGTERM unless a test asks for one (ENVOY_DRAIN_DELAY costs every stop that much):
    `@pytest.mark.parametrize("authz", [ENVOY_DRAIN_DELAY], indirect=True)`.
    """
    async with run_authz(idp, tmp_path, float(getattr(request, "param", 0.0))) as process:
        yield process


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for Envoy's listener and admin endpoints."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@asynccontextmanager
async def run_envoy(
    config: dict[str, Any], workdir: Path, session: aiohttp.ClientSession, cluster: str
) -> AsyncIterator[Envoy]:
    """Run Envoy with this config until the block ends; yields once LIVE with `cluster`'s host healthy."""
    envoy = Envoy.start(config, workdir)
    try:
        try:
            await envoy.wait_ready(session, {cluster: 1}, START_TIMEOUT)
        except StartError as err:
            pytest.fail(f"{err}:\n{envoy.child.tail(30)}")
        yield envoy
    finally:
        await envoy.stop()


@asynccontextmanager
async def launch_envoy(
    config: dict[str, Any], authz_host: str, session: aiohttp.ClientSession, tmp_path: Path
) -> AsyncIterator[EnvoyProcess]:
    """Run Envoy with this config until the block ends; yields once LIVE with the authz cluster healthy."""
    async with run_envoy(config, tmp_path, session, "authz") as envoy:
        yield EnvoyProcess(envoy, authz_host)


@pytest.fixture
async def envoy(
    authz: AuthzProcess, echo: EchoUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> AsyncIterator[EnvoyProcess]:
    """Envoy with the shipped config, ready and with the authz cluster healthy."""
    config = envoy_config(authz.port, echo.port, free_port(), free_port())
    async with launch_envoy(config, f"127.0.0.1:{authz.port}", session, tmp_path) as proxy:
        yield proxy
