"""Where tokens come from: Bearer, `from_headers`, `from_params`, cookies and `type: aspxauth`.

Each source is bound to its introspector; Bearer comes first, then each introspector's own
sources in config order. Tokens from query parameters never reach the upstream.
"""

from __future__ import annotations

from typing import Any

import pytest

from authz_service.errors import ConfigError
from authz_service.registries import parse_config
from tests.conftest import StartService, jwks_introspector, new_idp, opaque_introspector
from tests.hostile_idp import HostileIdentityProvider


def _iap(idp: HostileIdentityProvider) -> dict[str, Any]:
    return jwks_introspector(idp, id="iap", from_headers=[{"name": "x-goog-iap-jwt-assertion"}])


async def test_named_header_without_prefix(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [_iap(idp)]})
    answer = await service.check(headers={"x-goog-iap-jwt-assertion": idp.mint({"sub": "iap-user"})})
    assert answer.allowed
    assert answer.headers["x-user-id"] == "iap-user"
    assert answer.metadata["introspector"] == "iap"


async def test_named_header_with_its_own_prefix(idp: HostileIdentityProvider, start_service: StartService) -> None:
    config = jwks_introspector(idp, from_headers=[{"name": "X-Api-Token", "prefix": "Token "}])
    service = await start_service({"introspectors": [config]})
    token = idp.mint({"sub": "api-client"})
    assert (await service.check(headers={"x-api-token": f"Token {token}"})).allowed
    # The prefix is matched case-insensitively, as HTTP auth schemes are.
    assert (await service.check(headers={"x-api-token": f"token {token}"})).allowed
    # Without the prefix the header holds no token for this source: anonymous, so 401 missing_token.
    bare = await service.check(headers={"x-api-token": token})
    assert (bare.http_status, bare.response.status.message) == (401, "missing_token")


async def test_query_parameter_token_is_removed_upstream(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    config = jwks_introspector(idp, from_params=["access_token"])
    service = await start_service({"introspectors": [config]})
    answer = await service.check(f"/download?file=a.pdf&access_token={idp.mint({'sub': 'ws'})}")
    assert answer.allowed
    assert answer.headers["x-user-id"] == "ws"
    assert list(answer.response.ok_response.query_parameters_to_remove) == ["access_token"]


async def test_two_values_of_a_token_parameter_are_400(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp, from_params=["access_token"])]})
    answer = await service.check(f"/x?access_token={idp.mint()}&access_token={idp.mint()}")
    assert answer.http_status == 400
    assert answer.body["error"] == "invalid_request"


async def test_a_source_is_bound_to_its_introspector(idp: HostileIdentityProvider, start_service: StartService) -> None:
    # The IAP header belongs to `iap`; a valid token of the other issuer sent there is refused
    # (its iss is not iap's), never handed to the introspector that claims that iss.
    other = await new_idp("https://other.example")
    async with other:
        config = {
            "introspectors": [
                {**_iap(idp), "jwt": {"iss": idp.issuer, "aud": "authz-service"}},
                jwks_introspector(other, id="other"),
            ]
        }
        service = await start_service(config)
        assert (await service.check(token=other.mint())).allowed
        answer = await service.check(headers={"x-goog-iap-jwt-assertion": other.mint()})
        assert answer.http_status == 401
        assert answer.response.status.message == "untrusted_issuer"


async def test_sources_are_read_in_config_order(idp: HostileIdentityProvider, start_service: StartService) -> None:
    second = await new_idp("https://second.example")
    async with second:
        config = {
            "introspectors": [
                jwks_introspector(idp, id="first", from_headers=[{"name": "x-first"}]),
                jwks_introspector(second, id="second", from_params=["t"], cookie="sid"),
            ]
        }
        service = await start_service(config)
        both = await service.check(
            f"/x?t={second.mint({'sub': 'b'})}", headers={"x-first": idp.mint({"sub": "a"}), "cookie": "sid=zzz"}
        )
        assert both.allowed
        assert both.headers["x-user-id"] == "a"
        # Within `second`: its query parameter comes before its cookie.
        query_then_cookie = await service.check(f"/x?t={second.mint({'sub': 'b'})}", headers={"cookie": "sid=zzz"})
        assert query_then_cookie.allowed
        assert query_then_cookie.headers["x-user-id"] == "b"


async def test_aspxauth_reads_the_aspxauth_cookie(idp: HostileIdentityProvider, start_service: StartService) -> None:
    config = {**opaque_introspector(idp, id="aspx"), "type": "aspxauth"}
    service = await start_service({"introspectors": [config]})
    token = idp.issue_opaque({"sub": "forms-user"})
    answer = await service.check(headers={"cookie": f"theme=dark; .ASPXAUTH={token}"})
    assert answer.allowed
    assert answer.headers["x-user-id"] == "forms-user"
    assert idp.last_introspection is not None
    assert idp.last_introspection["form"]["token"] == token
    assert (await service.check(headers={"cookie": f"other={token}"})).http_status == 401


async def test_aspxauth_cookie_name_can_be_changed(idp: HostileIdentityProvider, start_service: StartService) -> None:
    config = {**opaque_introspector(idp, id="aspx"), "type": "aspxauth", "cookie": "AUTHCOOKIE"}
    service = await start_service({"introspectors": [config]})
    token = idp.issue_opaque()
    assert (await service.check(headers={"cookie": f"AUTHCOOKIE={token}"})).allowed
    assert (await service.check(headers={"cookie": f".ASPXAUTH={token}"})).http_status == 401


@pytest.mark.parametrize(
    ("introspector", "expected"),
    [
        ({"from_headers": [{"name": "bad header"}]}, "from_headers[0].name must be an HTTP header name"),
        ({"from_headers": [{"name": "cookie"}]}, "use cookie: for cookies"),
        ({"from_headers": [{"name": "authorization"}]}, "Authorization: Bearer is always read"),
        ({"from_headers": [{"name": "x-t", "prefx": "a"}]}, "from_headers[0].prefx is not a known field"),
        ({"from_headers": ["x-t"]}, "from_headers[0] must be a mapping"),
        ({"from_params": ["a b"]}, "from_params[0] must be a query parameter name"),
        ({"from_params": "access_token"}, "from_params must be a list"),
    ],
)
def test_bad_sources_are_config_errors(introspector: dict[str, Any], expected: str) -> None:
    resource = {"id": "j", "type": "jwt", "jwt": {"iss": "https://i.example", "secret": "s" * 32}, **introspector}
    with pytest.raises(ConfigError) as err:
        parse_config(f"introspectors: [{resource!r}]\n".replace("'", '"'), {})
    assert any(expected in str(problem) for problem in err.value.problems), err.value.problems
    assert all(str(problem).startswith("introspector 'j': ") for problem in err.value.problems)


def test_a_source_read_by_two_introspectors_is_a_config_error() -> None:
    secret = "s" * 32
    text = f"""
introspectors:
  - {{id: a, type: jwt, jwt: {{iss: "https://a.example", secret: "{secret}"}}, from_params: [access_token]}}
  - {{id: b, type: jwt, jwt: {{iss: "https://b.example", secret: "{secret}"}}, from_params: [access_token]}}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, {})
    assert [str(p) for p in err.value.problems] == [
        "introspector 'b': from_params 'access_token' is already read by introspector 'a'"
    ]
