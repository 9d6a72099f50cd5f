"""Hostile identity-provider documents and hostile token locations (issue #11's catalogue).

- a discovery document that points `jwks_uri` at another host: allowed, logged at info with both hosts;
- a discovery document over 64 KiB, a redirect, HTML, non-JSON, an `issuer` that is a prefix of
  `jwt.iss` or another issuer, no `jwks_uri`, an IdP answering 503: 503, nothing cached, keys never fetched;
- a token in both the Authorization header and the query: the header wins, the parameter is still removed;
- a malformed, empty, oversized or doubled token in a query parameter: 401 (400 when doubled).
"""

from __future__ import annotations

import logging

import pytest

from tests.conftest import StartService, jwks_introspector
from tests.hostile_idp import HostileIdentityProvider
from tests.integration.test_discovery import discovering


@pytest.mark.parametrize(
    "mode", ["issuer_prefix", "wrong_issuer", "no_jwks_uri", "huge", "html", "notjson", "redirect", "down"]
)
async def test_an_unusable_document_is_503_and_nothing_is_cached(
    idp: HostileIdentityProvider, start_service: StartService, mode: str
) -> None:
    idp.discovery_mode = mode
    service = await start_service({"introspectors": [discovering(idp)]})
    first = await service.check(token=idp.mint())
    assert (first.code, first.http_status) == (14, 503), mode
    assert idp.hits["jwks"] == 0, "keys must not be fetched from a document we did not accept"
    assert idp.hits["discovery_redirected"] == 0, "redirects are never followed"
    # Nothing was cached: once the document is right, the next unknown-key fetch succeeds.
    idp.discovery_mode = "ok"
    engine = service.service.engine
    source = engine.built["oidc"].jwks
    assert source is not None
    assert source.keyset is None
    await engine.warm_up()
    assert (await service.check(token=idp.mint())).allowed


async def test_keys_on_another_host_are_allowed_and_logged_with_both_hosts(
    idp: HostileIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    idp.discovery_mode = "other_host"
    with caplog.at_level(logging.INFO, logger="authz_service.tokens.discovery"):
        service = await start_service({"introspectors": [discovering(idp)]})
        assert (await service.check(token=idp.mint())).allowed
    records = [r for r in caplog.records if r.name == "authz_service.tokens.discovery"]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    fields = records[0].__dict__["fields"]
    assert fields == {"issuer_host": f"127.0.0.1:{idp.port}", "jwks_host": f"localhost:{idp.port}"}


async def test_bearer_wins_over_the_query_and_the_query_token_is_still_removed(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    config = jwks_introspector(idp, from_params=["access_token"])
    service = await start_service({"introspectors": [config]})
    query_token = idp.mint({"sub": "from-query"})
    answer = await service.check(f"/x?access_token={query_token}", token=idp.mint({"sub": "from-header"}))
    assert answer.allowed
    assert answer.headers["x-user-id"] == "from-header"
    assert list(answer.response.ok_response.query_parameters_to_remove) == ["access_token"]


async def test_a_bad_token_in_the_header_is_not_rescued_by_the_query(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    config = jwks_introspector(idp, from_params=["access_token"])
    service = await start_service({"introspectors": [config]})
    answer = await service.check(f"/x?access_token={idp.mint()}", token="not-a-token")
    assert answer.http_status == 401


@pytest.mark.parametrize(
    "path",
    ["/x?access_token=", "/x?access_token=a%20b", "/x?access_token=" + "a" * 9000],
    ids=["empty", "space", "too-large"],
)
async def test_a_malformed_token_from_a_source_is_401(
    idp: HostileIdentityProvider, start_service: StartService, path: str
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp, from_params=["access_token"])]})
    answer = await service.check(path)
    assert answer.http_status == 401
    assert answer.body["error"] == "invalid_token"
