"""The verified-token cache: a hash lookup instead of a signature check, never past exp or the keys."""

from __future__ import annotations

import asyncio
import time

from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import StartService, jwks_introspector


def _cache(service: object) -> object:
    return service.service.engine.verified  # type: ignore[attr-defined]


async def test_repeated_token_is_verified_once(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    source = service.service.engine.built["idp"].jwks
    token = idp.mint({"sub": "alice"})
    calls = 0
    original = source.keys_for

    async def counting(kid: object, alg: str) -> object:
        nonlocal calls
        calls += 1
        return await original(kid, alg)

    source.keys_for = counting  # type: ignore[method-assign]
    answers = [await service.check(token=token) for _ in range(10)]
    assert all(a.allowed and a.headers["x-user-id"] == "alice" for a in answers)
    assert calls == 1
    assert _cache(service).hits == 9  # type: ignore[attr-defined]


async def test_exp_is_checked_on_every_hit(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp, jwt={"leeway": 0})]})
    token = idp.mint({"exp": int(time.time()) + 2})
    assert (await service.check(token=token)).allowed
    assert (await service.check(token=token)).allowed
    await asyncio.sleep(max(0.0, int(time.time()) + 2 - time.time()) + 1.1)
    answer = await service.check(token=token)
    assert answer.http_status == 401 and answer.response.status.message == "expired"


async def test_entries_do_not_outlive_the_keys(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp, cache_ttl=1)]})
    token = idp.mint()
    assert (await service.check(token=token)).allowed
    await idp.go_offline()
    await asyncio.sleep(1.1)
    # The keys expired and cannot be refreshed: the once-verified token is not vouched for any more.
    assert (await service.check(token=token)).http_status == 503


async def test_rotation_invalidates_entries(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp)]})
    old = idp.mint()
    assert (await service.check(token=old)).allowed
    idp.rotate("RS256")
    assert (await service.check(token=idp.mint())).allowed  # unknown kid -> refetch -> new key set
    answer = await service.check(token=old)
    assert answer.http_status == 401 and answer.response.status.message == "unknown_key"


async def test_cache_is_bounded(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"cache": {"max_entries": 20}, "introspectors": [jwks_introspector(idp)]})
    for _ in range(60):
        assert (await service.check(token=idp.mint(alg="ES256"))).allowed
    assert len(_cache(service)) == 20  # type: ignore[arg-type]
