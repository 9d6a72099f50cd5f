"""The verified-token cache: a hash lookup instead of a signature check, never past exp or the keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from authz_service.devstack.idp import DevIdentityProvider
from authz_service.tokens.jwks import JwksKeySource
from authz_service.tokens.keys import VerificationKey
from tests.conftest import StartService, jwks_introspector, sleep_past
from tests.harness import Harness


def _jwks(service: Harness, introspector: str = "idp") -> JwksKeySource:
    source = service.service.engine.built[introspector].jwks
    assert source is not None, f"{introspector} has no JWKS key source"
    return source


async def test_repeated_token_is_verified_once(
    idp: DevIdentityProvider, start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    source = _jwks(service)
    token = idp.mint({"sub": "alice"})
    calls = 0
    original = source.keys_for

    async def counting(kid: str | None, alg: str) -> Sequence[VerificationKey]:
        nonlocal calls
        calls += 1
        return await original(kid, alg)

    monkeypatch.setattr(source, "keys_for", counting)  # every signature check asks for its keys
    answers = [await service.check(token=token) for _ in range(10)]
    assert all(a.allowed for a in answers)
    assert all(a.headers["x-user-id"] == "alice" for a in answers)
    assert calls == 1
    assert service.service.engine.verified.hits == 9


@pytest.mark.slow  # waits out an expiry on the wall clock (clock-driven: tests/unit/test_verified.py)
async def test_exp_is_checked_on_every_hit(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp, jwt={"leeway": 0})]})
    expires = time.time() + 1
    token = idp.mint({"exp": expires})
    assert (await service.check(token=token)).allowed
    assert (await service.check(token=token)).allowed
    assert service.service.engine.verified.hits == 1  # the second answer came from the cache
    await sleep_past(expires)
    answer = await service.check(token=token)
    assert answer.http_status == 401
    assert answer.response.status.message == "expired"


@pytest.mark.slow  # waits out an expiry on the wall clock (clock-driven: tests/unit/test_verified.py)
async def test_entries_do_not_outlive_the_keys(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp, cache_ttl=1)]})
    token = idp.mint()
    assert (await service.check(token=token)).allowed
    await idp.go_offline()
    await sleep_past(_jwks(service).trusted_until())  # the keys' cache_ttl (1 s) from their fetch at start-up
    # The keys expired and cannot be refreshed: the once-verified token is not vouched for any more.
    assert (await service.check(token=token)).http_status == 503


async def test_rotation_invalidates_entries(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    old = idp.mint()
    assert (await service.check(token=old)).allowed
    await asyncio.to_thread(idp.rotate, "RS256")  # a new RSA key: generated off the loop
    assert (await service.check(token=idp.mint())).allowed  # unknown kid -> refetch -> new key set
    answer = await service.check(token=old)
    assert answer.http_status == 401
    assert answer.response.status.message == "unknown_key"


async def test_cache_is_bounded(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"cache": {"max_entries": 20}, "introspectors": [jwks_introspector(idp)]})
    for _ in range(60):
        assert (await service.check(token=idp.mint(alg="ES256"))).allowed
    assert len(service.service.engine.verified) == 20
