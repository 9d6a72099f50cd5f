"""Shared fixtures: a real identity provider and real services on 127.0.0.1."""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping

import pytest

from authz_service.idp import DevIdentityProvider
from tests.harness import Harness, config_from, start_harness

StartService = Callable[[Mapping[str, Any]], Awaitable[Harness]]


@pytest.fixture
async def idp() -> AsyncIterator[DevIdentityProvider]:
    async with DevIdentityProvider() as provider:
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
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; run the suite through ./dev test")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="authz-redis-")
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", workdir, "--loglevel", "warning"],
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
