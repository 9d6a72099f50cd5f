"""engine: one validated Config in, one Engine out; unchanged introspectors survive a reload.

Driven through the IdpClient seam (a fake client) and the public Engine: authorizer, responses,
verified cache, introspectors, warm_up and staleness.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import pytest

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_service.config.model import Config, ResponseConfig
from authz_service.engine import Engine, IdentityShaper, build_engine
from authz_service.model import HttpRequest, Identity, Outcome, Reason, header_pairs
from authz_service.registries import validate_config
from authz_service.tokens.cache import CacheFactory
from authz_service.tokens.discovery import OidcDiscovery
from authz_service.tokens.jwks import JwksKeySource
from authz_service.tokens.jwt import JwtIntrospector
from authz_service.tokens.opaque import CachedIntrospector
from tests.unit.fakes import EcSigner, FakeIdpClient, hs_token, jwks

ISS = "https://idp.example"
SECRET = "an-hmac-secret-of-at-least-32-bytes!"
FAR_FUTURE = 4_000_000_000  # exp: the engine's introspectors read the real clock
SIGNER = EcSigner("k1")

HMAC = {"id": "hmac", "type": "jwt", "jwt": {"iss": ISS, "secret": SECRET}}
JWKS = {"id": "keys", "type": "jwt", "jwks_uri": "https://keys.example/jwks", "jwt": {"iss": "https://keys.example"}}
OPAQUE = {
    "id": "ext",
    "type": "opaque",
    "introspection_endpoint": {"url": "https://ext.example/introspect"},
    "from_params": ["access_token"],
}


def config(*introspectors: Mapping[str, Any], **rest: Any) -> Config:
    # Authentication-only unless the test brings policies: these tests are about tokens.
    rest.setdefault("authentication_only", not rest.get("policies"))
    return validate_config({"introspectors": list(introspectors), **rest}, None)


def engine(cfg: Config, client: FakeIdpClient | None = None, previous: Engine | None = None) -> Engine:
    return build_engine(cfg, client or FakeIdpClient(), CacheFactory(cfg.cache), previous)


def bearer(token: str, path: str = "/") -> HttpRequest:
    # curl -H "Authorization: Bearer $TOKEN" http://api.example.com$PATH
    return HttpRequest(method="GET", path=path, host="api.example.com", headers={"authorization": f"Bearer {token}"})


def decode(value: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))


# --------------------------------------------------------------------------- IdentityShaper


def test_shaper_builds_headers_from_the_full_claims_and_trims_claims_for_policies() -> None:
    response = ResponseConfig(claim_headers=(("email", "x-user-email"),))
    identity = Identity("u", {"sub": "u", "email": "a@example.com", "roles": [], "org": {}}, "idp", "jwt")
    shaped = IdentityShaper(response, keep_claims=True)(identity)
    assert dict(shaped.claims) == {"sub": "u", "email": "a@example.com"}  # empty values removed, as Aidbox does
    headers = dict(header_pairs(shaped.headers))
    assert headers["x-user-id"] == "u"
    assert headers["x-user-email"] == "a@example.com"
    assert decode(headers["x-auth-claims"]) == identity.claims


def test_without_policies_no_claims_are_kept_but_the_header_has_them_all() -> None:
    identity = Identity("u", {"sub": "u", "scope": "read"}, "idp", "jwt")
    shaped = IdentityShaper(ResponseConfig(), keep_claims=False)(identity)
    assert dict(shaped.claims) == {}
    assert decode(dict(header_pairs(shaped.headers))["x-auth-claims"]) == {"sub": "u", "scope": "read"}


# --------------------------------------------------------------------------- build_engine


def test_one_introspector_per_resource_in_config_order() -> None:
    built = engine(config(OPAQUE, HMAC, JWKS))
    assert list(built.introspectors) == ["ext", "hmac", "keys"]
    assert isinstance(built.introspectors["ext"], CachedIntrospector)
    assert isinstance(built.introspectors["hmac"], JwtIntrospector)
    assert built.built["keys"].jwks is not None
    assert built.built["hmac"].jwks is None


async def test_a_jwt_is_decided_end_to_end() -> None:
    built = engine(config(HMAC))
    decision = await built.authorizer.check(
        bearer(hs_token({"iss": ISS, "sub": "user-1", "exp": FAR_FUTURE}, SECRET.encode()))
    )
    assert (decision.outcome, decision.reason) == (Outcome.ALLOW, Reason.ALLOWED)
    assert dict(header_pairs(decision.headers))["x-user-id"] == "user-1"
    response = pb.CheckResponse.FromString(built.responses.encode(decision))
    assert response.status.code == 0


async def test_checks_go_through_the_verified_cache() -> None:
    built = engine(config(HMAC))
    request = bearer(hs_token({"iss": ISS, "sub": "user-1", "exp": FAR_FUTURE}, SECRET.encode()))
    await built.authorizer.check(request)
    await built.authorizer.check(request)
    assert (built.verified.misses, built.verified.hits) == (1, 1)


async def test_an_opaque_token_is_introspected_through_the_client() -> None:
    client = FakeIdpClient({"active": True, "sub": "user-9", "exp": FAR_FUTURE})
    built = engine(config(OPAQUE), client)
    decision = await built.authorizer.check(bearer("2YotnFZFEjr1zCsicMWpAA"))
    assert decision.outcome is Outcome.ALLOW
    assert client.calls == [("introspection", "https://ext.example/introspect")]
    assert client.forms == [{"token": "2YotnFZFEjr1zCsicMWpAA", "token_type_hint": "access_token"}]


async def test_query_tokens_are_removed_upstream() -> None:
    client = FakeIdpClient({"active": True, "sub": "user-9", "exp": FAR_FUTURE})
    built = engine(config(OPAQUE), client)
    decision = await built.authorizer.check(HttpRequest(path="/download?access_token=2YotnFZFEjr1zCsicMWpAA"))
    assert decision.outcome is Outcome.ALLOW
    ok = pb.CheckResponse.FromString(built.responses.encode(decision)).ok_response
    assert list(ok.query_parameters_to_remove) == ["access_token"]


async def test_policies_see_trimmed_claims_and_decide() -> None:
    admins = {"id": "admins", "engine": "matcho", "matcho": {"jwt": {"roles": {"$contains": "admin"}}}}
    built = engine(config(HMAC, policies=[admins]))
    admin = hs_token({"iss": ISS, "sub": "a", "roles": ["admin"], "exp": FAR_FUTURE}, SECRET.encode())
    reader = hs_token({"iss": ISS, "sub": "r", "roles": ["reader"], "exp": FAR_FUTURE}, SECRET.encode())
    assert (await built.authorizer.check(bearer(admin))).outcome is Outcome.ALLOW
    assert (await built.authorizer.check(bearer(reader))).outcome is Outcome.FORBIDDEN


async def test_a_signed_token_whose_claims_cannot_be_sent_upstream_is_a_401_not_a_503() -> None:
    # `"\ud800"` is a JSON escape of a lone surrogate: valid JSON syntax, but not Unicode text; no
    # header can carry it. A token the IdP signed with it is unusable (401), not an outage (503).
    payload = json.dumps({"iss": ISS, "sub": "user-1", "name": "NAME", "exp": FAR_FUTURE})
    token = hs_token(payload.replace('"NAME"', '"\\ud800"'), SECRET.encode())
    decision = await engine(config(HMAC)).authorizer.check(bearer(token))
    assert decision.outcome is Outcome.UNAUTHENTICATED


# --------------------------------------------------------------------------- reload


def test_an_unchanged_introspector_survives_a_reload() -> None:
    first = engine(config(HMAC, JWKS, OPAQUE))
    changed = {**OPAQUE, "cache_ttl": 60}
    second = engine(config(HMAC, JWKS, changed), previous=first)
    assert second.introspectors["hmac"] is first.introspectors["hmac"]
    assert second.built["keys"].jwks is first.built["keys"].jwks  # its fetched keys with it
    assert second.introspectors["ext"] is not first.introspectors["ext"]
    assert second.verified is not first.verified


def test_a_removed_introspector_is_gone_after_a_reload() -> None:
    first = engine(config(HMAC, OPAQUE))
    second = engine(config(HMAC), previous=first)
    assert list(second.introspectors) == ["hmac"]


# --------------------------------------------------------------------------- JWKS: warm-up, staleness, discovery


async def test_warm_up_fetches_every_jwks_once() -> None:
    client = FakeIdpClient(jwks(SIGNER))
    built = engine(config(HMAC, JWKS), client)
    await built.warm_up()
    await built.warm_up()  # keys already there: no second fetch
    assert client.calls == [("jwks", "https://keys.example/jwks")]
    assert built.jwks_staleness() == {"keys": 0.0}


async def test_warm_up_survives_an_idp_outage() -> None:
    client = FakeIdpClient(jwks(SIGNER))
    client.failure = "connect_error"
    built = engine(config(JWKS), client)
    await built.warm_up()
    source = built.built["keys"].jwks
    assert source is not None
    assert source.keyset is None


async def test_discovery_finds_the_keys_under_the_issuer() -> None:
    discovering = {"id": "oidc", "type": "jwt", "discovery": True, "jwt": {"iss": "https://login.example/tenant"}}
    client = FakeIdpClient()
    client.by_url = {
        "https://login.example/tenant/.well-known/openid-configuration": {
            "issuer": "https://login.example/tenant",
            "jwks_uri": "https://login.example/keys",
        },
        "https://login.example/keys": jwks(SIGNER),
    }
    built = engine(config(discovering), client)
    source = built.built["oidc"].jwks
    assert isinstance(source, JwksKeySource)
    assert isinstance(source.location, OidcDiscovery)
    await built.warm_up()
    assert [url for _, url in client.calls] == [
        "https://login.example/tenant/.well-known/openid-configuration",
        "https://login.example/keys",
    ]
    assert source.keyset is not None


@pytest.mark.parametrize("issuer", ["https://login.example/tenant/", "https://login.example/other", None])
async def test_discovery_with_another_issuer_is_a_failed_fetch(issuer: str | None) -> None:
    discovering = {"id": "oidc", "type": "jwt", "discovery": True, "jwt": {"iss": "https://login.example/tenant"}}
    document: dict[str, Any] = {"jwks_uri": "https://login.example/keys"}
    if issuer is not None:
        document["issuer"] = issuer
    client = FakeIdpClient(jwks(SIGNER))
    client.by_url = {"https://login.example/tenant/.well-known/openid-configuration": document}
    built = engine(config(discovering), client)
    await built.warm_up()
    source = built.built["oidc"].jwks
    assert source is not None
    assert source.keyset is None  # never a silent accept
    assert [url for _, url in client.calls] == ["https://login.example/tenant/.well-known/openid-configuration"]


# --------------------------------------------------------------------------- readiness


async def test_readiness_waits_for_the_keys_of_every_required_jwks_introspector() -> None:
    client = FakeIdpClient(jwks(SIGNER))
    client.failure = "http_404"
    optional = {**JWKS, "id": "spare", "jwt": {"iss": "https://spare.example"}, "optional": True}
    built = engine(config(HMAC, OPAQUE, JWKS, optional), client)
    await built.warm_up()
    readiness = built.readiness()
    assert not readiness.ready
    assert readiness.introspectors == {
        "hmac": "ready",  # static keys: ready at once
        "ext": "ready",  # opaque: nothing to fetch first
        "keys": "no keys yet: http_404 from https://keys.example/jwks",
        "spare": "no keys yet: http_404 from https://keys.example/jwks (optional: readiness does not wait for it)",
    }
    assert [source.name for source in built.keys_pending()] == ["keys"]
    client.failure = None
    keys = built.built["keys"].jwks
    assert keys is not None
    assert await keys.warm_up()
    assert built.readiness().ready  # the optional one still has none
    assert built.readiness().introspectors["keys"] == "ready"


def test_static_keys_and_opaque_introspectors_are_ready_at_once() -> None:
    readiness = engine(config(HMAC, OPAQUE)).readiness()
    assert readiness.ready
    assert readiness.introspectors == {"hmac": "ready", "ext": "ready"}


async def test_a_reload_stops_the_retries_of_replaced_key_sources_only() -> None:
    client = FakeIdpClient(jwks(SIGNER))
    client.failure = "connect_error"
    other = {**JWKS, "id": "other", "jwt": {"iss": "https://other.example"}}
    first = engine(config(JWKS, other), client)
    first.retry_missing_keys()
    kept, replaced = first.built["keys"].jwks, first.built["other"].jwks
    assert kept is not None
    assert replaced is not None
    second = engine(config(JWKS, {**other, "cache_ttl": 60}), client, previous=first)
    assert second.built["keys"].jwks is kept
    first.stop_retries(successor=second)
    assert kept.retrying  # the introspector the reload kept keeps trying
    assert not replaced.retrying
    second.stop_retries()
    assert not kept.retrying
