"""`discovery: true`: the JWKS URI from the issuer's OpenID Provider metadata, with jwks_uri's outage rules."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from authz_service.devstack.idp import DevIdentityProvider
from authz_service.errors import ConfigError
from authz_service.registries import parse_config
from tests.conftest import StartService, free_port


def discovering(idp: DevIdentityProvider, **overrides: Any) -> dict[str, Any]:
    """A jwt introspector whose keys come from discovery under the IdP's issuer."""
    return {"id": "oidc", "type": "jwt", "discovery": True, "jwt": {"iss": idp.issuer}, **overrides}


async def test_keys_come_from_the_discovered_jwks_uri(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [discovering(idp)]})
    answer = await service.check(token=idp.mint({"sub": "alice"}, alg="ES256"))
    assert answer.allowed
    assert answer.headers["x-user-id"] == "alice"
    assert idp.hits["discovery"] == 1
    assert idp.hits["jwks"] == 1
    upstream = service.service.client.calls
    assert upstream[("discovery", "ok")] == 1
    assert upstream[("jwks", "ok")] == 1


async def test_a_trailing_slash_in_iss_is_not_doubled(start_service: StartService) -> None:
    # Auth0-style issuers end in "/": the document is at <iss without the slash>/.well-known/...
    port = free_port()
    made = await asyncio.to_thread(DevIdentityProvider, f"http://127.0.0.1:{port}/", "127.0.0.1", port)
    async with made as idp:
        service = await start_service({"introspectors": [discovering(idp)]})
        assert (await service.check(token=idp.mint())).allowed
        assert idp.hits["discovery"] == 1


async def test_cold_start_unreachable_is_503_then_cached_keys_survive_an_outage(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    await idp.go_offline()
    service = await start_service({"introspectors": [discovering(idp, cache_ttl=1)]})
    assert (await service.check(token=idp.mint())).http_status == 503
    await idp.go_online()
    await service.service.engine.warm_up()
    token = idp.mint()
    assert (await service.check(token=token)).allowed
    await idp.go_offline()
    # Within cache_ttl the cached keys keep serving a new token.
    assert (await service.check(token=idp.mint())).allowed


async def test_max_stale_keeps_serving_discovered_keys(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [discovering(idp, cache_ttl=1, max_stale=600)]})
    assert (await service.check(token=idp.mint())).allowed
    await idp.go_offline()
    await asyncio.sleep(1.1)
    assert (await service.check(token=idp.mint())).allowed


async def test_document_and_keys_are_fetched_once_for_concurrent_cold_checks(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    idp.delay = 0.2
    await idp.go_offline()
    service = await start_service({"introspectors": [discovering(idp)]})
    await idp.go_online()
    answers = await asyncio.gather(*(service.check(token=idp.mint({"sub": f"u{i}"})) for i in range(20)))
    assert all(a.allowed for a in answers)
    assert idp.hits["discovery"] == 1
    assert idp.hits["jwks"] == 1


async def test_the_document_is_refreshed_with_the_keys(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [discovering(idp, cache_ttl=1)]})
    assert (await service.check(token=idp.mint())).allowed
    await asyncio.sleep(1.05)
    # Expired keys: the next check fetches document and keys again (before answering).
    assert (await service.check(token=idp.mint())).allowed
    assert idp.hits["discovery"] == 2
    assert idp.hits["jwks"] == 2


@pytest.mark.parametrize(
    ("introspector", "expected"),
    [
        (
            {"discovery": True, "jwks_uri": "https://i.example/jwks"},
            "jwt needs exactly one key source: jwt.secret, jwks_uri, jwt.keys or discovery: true "
            "(found jwks_uri, discovery)",
        ),
        ({"discovery": "yes"}, "discovery must be true or false, got a string"),
        ({"discovery": True, "jwt": {"iss": "urn:my-issuer"}}, "jwt.iss must be an http:// or https:// URL"),
    ],
)
def test_check_config_validates_discovery(introspector: dict[str, Any], expected: str) -> None:
    resource: dict[str, Any] = {"id": "d", "type": "jwt", "jwt": {"iss": "https://i.example"}, **introspector}
    with pytest.raises(ConfigError) as err:
        parse_config(f"introspectors: [{resource!r}]\n".replace("'", '"').replace("True", "true"), {})
    assert any(expected in str(p) for p in err.value.problems), err.value.problems


def test_discovery_alone_is_a_valid_key_source() -> None:
    config = parse_config(
        'introspectors: [{id: d, type: jwt, discovery: true, jwt: {iss: "https://i.example/"}}]\n', {}
    )
    (introspector,) = config.introspectors
    assert introspector.kind == "jwt"
    assert getattr(introspector, "discovery", False) is True
