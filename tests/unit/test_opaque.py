"""opaque: RFC 7662 introspection over real HTTP, and the cache that wraps it on an injected clock.

Only `"active": true` passes; a result lives min(cache_ttl, exp - now), an inactive one
min(cache_ttl, 10 s); failures are never cached; concurrent misses for a token make one call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote_plus, unquote_plus

import pytest
import pytest_asyncio

from authz_service.config.model import OpaqueIntrospectorConfig
from authz_service.errors import TokenRejected, UpstreamUnavailable
from authz_service.model import Confirmation, Identity, Reason
from authz_service.registries import validate_config
from authz_service.tokens.base import CLIENT_AUTH_FAILED, INVALID_TOKEN, Credential, IdpErrorAnswer
from authz_service.tokens.cache import BoundedMemoryCache, CacheStats, TokenCache, token_key
from authz_service.tokens.opaque import (
    CLIENT_AUTH_LOG_INTERVAL,
    NEGATIVE_TTL,
    CachedIntrospector,
    OpaqueIntrospector,
    client_secret_basic,
)
from authz_service.upstream import UpstreamClient
from tests.unit.fakes import EPOCH, CannedIdp, FakeClock, FakeIdpClient

TOKEN = "2YotnFZFEjr1zCsicMWpAA"
BASIC = "Basic YXV0aHotc2VydmljZTpzZWNyZXQ="
NOW = EPOCH


@pytest_asyncio.fixture
async def idp() -> AsyncIterator[CannedIdp]:
    async with CannedIdp() as server:
        server.answer({"active": False})
        yield server


def opaque_config(idp: CannedIdp, **overrides: Any) -> OpaqueIntrospectorConfig:
    """A `type: opaque` TokenIntrospector, validated as the service validates it."""
    endpoint = {"url": idp.url + "/introspect", "authorization": BASIC}
    resource = {"id": "ext", "type": "opaque", "introspection_endpoint": endpoint, **overrides}
    [config] = validate_config({"introspectors": [resource]}, None).introspectors
    assert isinstance(config, OpaqueIntrospectorConfig)
    return config


def active(**fields: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"active": True, "sub": "user-1", "scope": "read", "exp": NOW + 300}
    answer.update(fields)
    return {k: v for k, v in answer.items() if v is not None}


class Cached:
    """A CachedIntrospector over the canned IdP, its cache and itself on one fake clock."""

    def __init__(self, idp: CannedIdp, client: UpstreamClient, **config: Any) -> None:
        self.idp = idp
        self.clock = FakeClock()
        self.cache = TokenCache(BoundedMemoryCache(100, clock=self.clock), "ext", None, CacheStats())
        self.introspector = CachedIntrospector(
            OpaqueIntrospector(opaque_config(idp, **config), client), self.cache, clock=self.clock
        )

    async def check(self, token: str = TOKEN) -> Identity:
        return await self.introspector.introspect(Credential(token))

    async def rejection(self, token: str = TOKEN) -> Reason:
        with pytest.raises(TokenRejected) as caught:
            await self.check(token)
        return caught.value.reason

    @property
    def calls(self) -> int:
        return len(self.idp.seen)


# --------------------------------------------------------------------------- OpaqueIntrospector: RFC 7662


async def test_the_request_is_an_rfc7662_post(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active())
    await OpaqueIntrospector(opaque_config(idp), client).fetch(TOKEN)
    [seen] = idp.seen
    assert (seen.method, seen.path) == ("POST", "/introspect")
    assert seen.form == {"token": TOKEN, "token_type_hint": "access_token"}
    assert seen.headers["Authorization"] == BASIC


async def test_no_authorization_header_unless_configured(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active())
    resource = {"id": "ext", "type": "opaque", "introspection_endpoint": {"url": idp.url}}
    [config] = validate_config({"introspectors": [resource]}, None).introspectors
    assert isinstance(config, OpaqueIntrospectorConfig)
    await OpaqueIntrospector(config, client).fetch(TOKEN)
    assert "Authorization" not in idp.seen[0].headers


@pytest.mark.parametrize(
    ("answer", "user_id"),
    [
        (active(), "user-1"),
        (active(sub=None, username="alice"), "alice"),  # username when there is no sub
        (active(box_user="box-1"), "box-1"),  # Aidbox's box_user first
        (active(sub=None), None),  # a client credential: no user
    ],
)
async def test_an_active_answer_is_an_identity(
    idp: CannedIdp, client: UpstreamClient, answer: dict[str, Any], user_id: str | None
) -> None:
    idp.answer(answer)
    identity = await Cached(idp, client).check()
    assert identity.user_id == user_id
    assert identity.kind == "opaque"
    assert identity.introspector == "ext"
    assert dict(identity.claims) == answer
    assert identity.expires_at == answer.get("exp")


async def test_inactive_is_a_401(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer({"active": False})
    assert await Cached(idp, client).rejection() is Reason.INACTIVE


@pytest.mark.parametrize(
    "answer",
    [
        {"active": "true"},  # only the JSON literal true passes
        {"active": 1},
        {"active": None},
        {"sub": "user-1"},  # no active at all
        [{"active": True}],
        active(exp="tomorrow"),
        active(nbf=True),
        active(iat=[1]),
    ],
)
async def test_an_answer_we_do_not_understand_is_an_outage_not_an_allow(
    idp: CannedIdp, client: UpstreamClient, answer: Any
) -> None:
    idp.answer(answer)
    with pytest.raises(UpstreamUnavailable) as caught:
        await Cached(idp, client).check()
    assert caught.value.endpoint == "introspection"
    assert caught.value.outcome == "invalid_answer"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (active(exp=NOW), Reason.EXPIRED),
        (active(exp=NOW - 10), Reason.EXPIRED),
        (active(nbf=NOW + 10), Reason.NOT_YET_VALID),
        (active(sub=42), Reason.BAD_CLAIMS),
        (active(username=["a"]), Reason.BAD_CLAIMS),
    ],
)
async def test_active_but_unusable_is_a_401(
    idp: CannedIdp, client: UpstreamClient, answer: dict[str, Any], reason: Reason
) -> None:
    idp.answer(answer)
    assert await Cached(idp, client).rejection() is reason


# --------------------------------------------------------------------------- the cache


async def test_a_cached_answer_is_not_asked_again(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active())
    s = Cached(idp, client)
    await s.check()
    await s.check()
    assert s.calls == 1


async def test_cache_life_is_bounded_by_the_tokens_exp(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active(exp=NOW + 60))
    s = Cached(idp, client, cache_ttl=300)
    identity = await s.check()
    assert s.introspector.trusted_until(identity) == NOW + 60
    s.clock.advance(59)
    await s.check()
    assert s.calls == 1
    s.clock.advance(1)
    assert await s.rejection() is Reason.EXPIRED


async def test_cache_life_is_bounded_by_cache_ttl(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active(exp=NOW + 3600))
    s = Cached(idp, client, cache_ttl=30)
    identity = await s.check()
    assert identity.answer_until == NOW + 30
    assert s.introspector.trusted_until(identity) == NOW + 30
    s.clock.advance(29.9)
    await s.check()
    assert s.calls == 1
    s.clock.advance(0.1)
    await s.check()
    assert s.calls == 2


async def test_an_answer_without_exp_lives_cache_ttl(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active(exp=None))
    s = Cached(idp, client, cache_ttl=120)
    identity = await s.check()
    assert s.introspector.trusted_until(identity) == NOW + 120


@pytest.mark.parametrize(("cache_ttl", "remembered"), [(300, NEGATIVE_TTL), (5, 5)])
async def test_inactive_answers_are_remembered_briefly(
    idp: CannedIdp, client: UpstreamClient, cache_ttl: int, remembered: float
) -> None:
    # A token that becomes active later (a race with its issuance) must not stay refused long.
    idp.answer({"active": False})
    s = Cached(idp, client, cache_ttl=cache_ttl)
    assert await s.rejection() is Reason.INACTIVE
    s.clock.advance(remembered - 0.1)
    assert await s.rejection() is Reason.INACTIVE
    assert s.calls == 1
    s.clock.advance(0.1)
    idp.answer(active())
    assert (await s.check()).user_id == "user-1"
    assert s.calls == 2


def test_negative_ttl_is_10_seconds() -> None:
    assert NEGATIVE_TTL == 10


async def test_failures_are_never_cached(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer({"error": "server_error"}, status=500)
    s = Cached(idp, client)
    with pytest.raises(UpstreamUnavailable) as caught:
        await s.check()
    assert caught.value.outcome == "http_500"
    idp.answer(active())
    assert (await s.check()).user_id == "user-1"
    assert s.calls == 2


async def test_an_outage_changes_nothing_while_the_answer_is_cached(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active())
    s = Cached(idp, client)
    await s.check()
    await idp.stop()
    s.clock.advance(200)
    assert (await s.check()).user_id == "user-1"


async def test_an_outage_with_nothing_cached_is_a_503(idp: CannedIdp, client: UpstreamClient) -> None:
    s = Cached(idp, client)
    await idp.stop()
    with pytest.raises(UpstreamUnavailable) as caught:
        await s.check()
    assert caught.value.outcome == "connect_error"


async def test_concurrent_misses_for_one_token_make_one_call(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active())
    s = Cached(idp, client)
    gate = idp.hang()
    checks = [asyncio.ensure_future(s.check()) for _ in range(10)]
    other = asyncio.ensure_future(s.check("another-token"))
    await gate.reached(2)  # both calls reached the IdP
    gate.open()
    identities = await asyncio.gather(*checks)
    await other
    assert {i.user_id for i in identities} == {"user-1"}
    assert sorted(s.form["token"] for s in idp.seen) == sorted([TOKEN, "another-token"])


async def test_a_caller_giving_up_does_not_cancel_the_shared_call(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active())
    s = Cached(idp, client)
    gate = idp.hang()
    impatient = asyncio.ensure_future(s.check())
    patient = asyncio.ensure_future(s.check())
    await gate.reached(1)
    impatient.cancel()
    await asyncio.wait([impatient])
    gate.open()
    assert (await patient).user_id == "user-1"
    assert impatient.cancelled()
    assert s.calls == 1


async def test_entries_are_keyed_by_the_tokens_hash(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active())
    s = Cached(idp, client)
    await s.check()
    assert await s.cache.get(token_key(TOKEN)) is not None
    assert await s.cache.get(TOKEN) is None


async def test_an_entry_of_another_shape_is_a_miss(idp: CannedIdp, client: UpstreamClient) -> None:
    # E.g. written by an older version into a shared Redis: never read as an identity.
    idp.answer({"active": False})
    s = Cached(idp, client)
    await s.cache.set(token_key(TOKEN), {"active": True, "sub": "admin"}, ttl=60)
    assert await s.rejection() is Reason.INACTIVE
    assert s.calls == 1


async def test_opaque_introspectors_are_asked_in_config_order_not_by_issuer(
    idp: CannedIdp, client: UpstreamClient
) -> None:
    s = Cached(idp, client)
    assert s.introspector.issuer is None
    assert s.introspector.key_generation == 0
    assert s.introspector.id == "ext"


def test_trusted_until_never_passes_the_tokens_exp() -> None:
    resource = {"id": "ext", "type": "opaque", "introspection_endpoint": {"url": "https://idp.example/introspect"}}
    [config] = validate_config({"introspectors": [resource]}, None).introspectors
    assert isinstance(config, OpaqueIntrospectorConfig)
    cache = TokenCache(BoundedMemoryCache(10), "ext", None, CacheStats())
    introspector = CachedIntrospector(OpaqueIntrospector(config, FakeIdpClient()), cache)
    identity = Identity("u", {}, "ext", "opaque", expires_at=NOW + 10, answer_until=NOW + 300)
    assert introspector.trusted_until(identity) == NOW + 10
    assert introspector.trusted_until(Identity("u", {}, "ext", "opaque", answer_until=NOW + 300)) == NOW + 300
    assert introspector.trusted_until(Identity("u", {}, "ext", "opaque")) == 0.0  # never reused


# --------------------------------------------------------------------------- OAuth error answers


@pytest.mark.parametrize("error", ["invalid_token", "unsupported_token_type"])
async def test_a_400_about_the_token_is_inactive_and_remembered_as_such(
    idp: CannedIdp, client: UpstreamClient, error: str
) -> None:
    # Some servers answer this instead of `active: false` (e.g. a JWT sent to an opaque-only endpoint).
    idp.answer({"error": error, "error_description": "token is invalid"}, status=400)
    s = Cached(idp, client)
    assert await s.rejection() is Reason.INACTIVE
    assert await s.rejection() is Reason.INACTIVE
    assert s.calls == 1  # remembered like `active: false`
    assert client.calls[("introspection", INVALID_TOKEN)] == 1


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (400, {"error": "invalid_request"}, "http_400"),
        (400, {"error": "some_vendor_code"}, "http_400"),
        (400, "not an object", "http_400"),
        (403, {"error": "invalid_token"}, "http_403"),  # only a 400 says "not this token"
        (500, {"error": "invalid_token"}, "http_500"),
    ],
)
async def test_other_error_answers_stay_outages(
    idp: CannedIdp, client: UpstreamClient, status: int, body: Any, outcome: str
) -> None:
    idp.answer(body, status=status)
    s = Cached(idp, client)
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable) as caught:
            await s.check()
        assert caught.value.outcome == outcome
    assert s.calls == 2  # never cached


# --------------------------------------------------------------------------- aud, cnf


@pytest.mark.parametrize("aud", ["api", ["other", "api"]])
async def test_an_answer_naming_a_configured_audience_passes(idp: CannedIdp, client: UpstreamClient, aud: Any) -> None:
    idp.answer(active(aud=aud))
    assert (await Cached(idp, client, aud=["api", "api2"]).check()).user_id == "user-1"


@pytest.mark.parametrize("aud", ["other", ["other", "third"], None, [], 42, ["api", 1]])
async def test_an_answer_without_a_configured_audience_is_a_401(
    idp: CannedIdp, client: UpstreamClient, aud: Any
) -> None:
    idp.answer(active(aud=aud))
    assert await Cached(idp, client, aud="api").rejection() is Reason.BAD_AUDIENCE


async def test_without_aud_configured_any_audience_passes(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active(aud="whoever"))
    assert (await Cached(idp, client).check()).user_id == "user-1"


async def test_a_sender_constrained_answer_keeps_its_confirmation(idp: CannedIdp, client: UpstreamClient) -> None:
    jkt = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    idp.answer(active(cnf={"jkt": jkt}))
    assert (await Cached(idp, client).check()).confirmation == Confirmation(jkt=jkt)


async def test_a_required_sender_constraint_refuses_an_answer_without_cnf(
    idp: CannedIdp, client: UpstreamClient
) -> None:
    idp.answer(active())
    assert await Cached(idp, client, sender_constraint="required").rejection() is Reason.SENDER_CONSTRAINT_REQUIRED


async def test_an_answer_with_a_confirmation_we_cannot_check_is_refused(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active(cnf={"jwk": {"kty": "EC"}}))
    assert await Cached(idp, client).rejection() is Reason.UNSUPPORTED_CNF


# --------------------------------------------------------------------------- client authentication

# RFC 6749 2.3.1: each of id and secret is form-urlencoded, then "id:secret" is base64-encoded.
TRICKY_ID = "svc:a+b c"
TRICKY_SECRET = "p%20ss:w+rd /é"


def test_client_secret_basic_encodes_before_base64() -> None:
    header = client_secret_basic(TRICKY_ID, TRICKY_SECRET)
    assert header.startswith("Basic ")
    pair = base64.b64decode(header.removeprefix("Basic ")).decode()
    assert pair == "svc%3Aa%2Bb+c:p%2520ss%3Aw%2Brd+%2F%C3%A9"
    client_id, _, secret = pair.partition(":")  # exactly one ':' is left: the separator
    assert (unquote_plus(client_id), unquote_plus(secret)) == (TRICKY_ID, TRICKY_SECRET)


def _client_auth(idp: CannedIdp, method: str | None) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"url": idp.url + "/introspect", "client_id": TRICKY_ID, "client_secret": TRICKY_SECRET}
    if method is not None:
        endpoint["auth_method"] = method
    return endpoint


@pytest.mark.parametrize("method", [None, "client_secret_basic"])
async def test_client_secret_basic_sends_the_encoded_pair(
    idp: CannedIdp, client: UpstreamClient, method: str | None
) -> None:
    idp.answer(active())
    await Cached(idp, client, introspection_endpoint=_client_auth(idp, method)).check()
    [seen] = idp.seen
    assert seen.headers["Authorization"] == client_secret_basic(TRICKY_ID, TRICKY_SECRET)
    assert seen.form == {"token": TOKEN, "token_type_hint": "access_token"}


async def test_client_secret_post_sends_the_credentials_in_the_form(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(active())
    await Cached(idp, client, introspection_endpoint=_client_auth(idp, "client_secret_post")).check()
    [seen] = idp.seen
    assert "Authorization" not in seen.headers
    assert seen.form == {
        "token": TOKEN,
        "token_type_hint": "access_token",
        "client_id": TRICKY_ID,
        "client_secret": TRICKY_SECRET,
    }


@pytest.mark.parametrize(
    ("status", "body"),
    [(401, {"error": "invalid_client"}), (401, "no json at all"), (400, {"error": "invalid_client"})],
)
async def test_the_idp_refusing_our_credentials_is_a_503_of_its_own_logged_without_the_secret(
    idp: CannedIdp, client: UpstreamClient, caplog: pytest.LogCaptureFixture, status: int, body: Any
) -> None:
    idp.answer(body, status=status)
    s = Cached(idp, client, introspection_endpoint=_client_auth(idp, "client_secret_post"))
    caplog.set_level(logging.INFO, logger="authz_service")
    for _ in range(3):
        with pytest.raises(IdpErrorAnswer) as caught:
            await s.check()
        assert caught.value.outcome == CLIENT_AUTH_FAILED
        assert caught.value.reason is Reason.INTROSPECTION_CLIENT_AUTH
        assert str(caught.value) == "introspection endpoint unavailable: client_auth_failed"
    assert s.calls == 3  # never cached
    assert client.calls[("introspection", CLIENT_AUTH_FAILED)] == 3
    [record] = [r for r in caplog.records if r.getMessage() == "introspection client authentication failed"]
    assert record.levelno == logging.ERROR
    assert record.fields["introspector"] == "ext"  # type: ignore[attr-defined]
    logged = caplog.text + json.dumps(record.fields, default=str)  # type: ignore[attr-defined]
    for secret in (TRICKY_SECRET, quote_plus(TRICKY_SECRET), TOKEN):
        assert secret not in logged


async def test_the_client_auth_failure_line_is_repeated_once_a_minute(
    idp: CannedIdp, client: UpstreamClient, caplog: pytest.LogCaptureFixture
) -> None:
    idp.answer({"error": "invalid_client"}, status=401)
    clock = FakeClock()
    inner = OpaqueIntrospector(opaque_config(idp), client, clock=clock)
    caplog.set_level(logging.INFO, logger="authz_service")

    async def fail() -> None:
        with pytest.raises(IdpErrorAnswer):
            await inner.fetch(TOKEN)

    def lines() -> int:
        return sum(r.getMessage() == "introspection client authentication failed" for r in caplog.records)

    await fail()
    clock.advance(CLIENT_AUTH_LOG_INTERVAL - 1)
    await fail()
    assert lines() == 1
    clock.advance(1)
    await fail()
    assert lines() == 2
