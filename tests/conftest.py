"""Shared fixtures: a real identity provider and real services on 127.0.0.1."""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

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
