"""jwks: a JWKS URI's keys, cached per introspector, driven by a fake clock and a fake IdP client.

Cold start waits for one shared fetch (failure: 503); past 80% of cache_ttl a background refresh
starts and nobody waits; expired keys are served up to max_stale while the IdP is down; an unknown
kid causes at most one refetch per 5 s; the generation changes whenever the keys do. Without
keys, the source retries in the background with backoff capped at 5 s; every failed fetch is
logged once, naming the introspector and the URL without its userinfo or query.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from authz_service.config.model import JwtIntrospectorConfig
from authz_service.errors import TokenRejected, UpstreamUnavailable
from authz_service.model import Reason
from authz_service.registries import validate_config
from authz_service.tokens.base import Credential
from authz_service.tokens.discovery import OidcDiscovery
from authz_service.tokens.jwks import (
    FAILURE_LOG_EVERY,
    REFRESH_AHEAD,
    RETRY_CAP,
    JwksKeySource,
    KeySet,
    parse_jwks,
    retry_delay,
)
from authz_service.tokens.jwt import JwtIntrospector
from authz_service.tokens.keys import load_jwk
from authz_service.upstream import UpstreamClient
from tests.unit.fakes import CannedIdp, EcSigner, FakeClock, FakeIdpClient, Gate, jwks, settle

URI = "https://idp.example/.well-known/jwks.json"
K1 = EcSigner("k1")
K2 = EcSigner("k2")
TTL = 100.0


def source(client: FakeIdpClient, clock: FakeClock, *, ttl: float = TTL, max_stale: float = 0.0) -> JwksKeySource:
    return JwksKeySource(URI, client, ttl=ttl, max_stale=max_stale, clock=clock)


class Setup:
    def __init__(self, *signers: EcSigner, max_stale: float = 0.0) -> None:
        self.clock = FakeClock(0.0)  # JwksKeySource's clock is monotonic: any origin will do
        self.idp = FakeIdpClient(jwks(*(signers or (K1,))))
        self.keys = source(self.idp, self.clock, max_stale=max_stale)

    @property
    def fetches(self) -> int:
        return len(self.idp.calls)

    async def kids(self, kid: str | None = "k1", alg: str = "ES256") -> list[str | None]:
        return [k.kid for k in await self.keys.keys_for(kid, alg)]

    async def rejection(self, kid: str | None, alg: str = "ES256") -> Reason:
        with pytest.raises(TokenRejected) as caught:
            await self.keys.keys_for(kid, alg)
        return caught.value.reason

    def publish(self, *signers: EcSigner) -> None:
        self.idp.document = jwks(*signers)


# --------------------------------------------------------------------------- parse_jwks, KeySet


@pytest.mark.parametrize(
    ("document", "outcome"),
    [
        ([], "invalid_document"),
        ({"keys": "none"}, "invalid_document"),
        ({}, "invalid_document"),
        ({"keys": []}, "no_usable_keys"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "no_usable_keys"),  # symmetric keys are never published keys
        ({"keys": [{**K1.jwk(), "use": "enc"}]}, "no_usable_keys"),
        ({"keys": [{"kty": "RSA"}, "junk"]}, "no_usable_keys"),
    ],
)
def test_documents_without_usable_keys_are_a_failed_fetch(document: Any, outcome: str) -> None:
    # A failed fetch keeps the old keys; an empty set would turn an IdP mistake into our outage.
    with pytest.raises(UpstreamUnavailable) as caught:
        parse_jwks(document)
    assert caught.value.endpoint == "jwks"
    assert caught.value.outcome == outcome


def test_unusable_keys_are_skipped() -> None:
    document = {"keys": [{"kty": "oct", "k": "c2VjcmV0"}, K1.jwk(), {"kty": "RSA"}, K2.jwk()]}
    assert [k.kid for k in parse_jwks(document)] == ["k1", "k2"]


def test_keyset_lookup_by_kid_and_alg() -> None:
    keys = [k for k in (load_jwk(K1.jwk()), load_jwk(K2.jwk())) if k is not None]
    keyset = KeySet.build(keys, fetched_at=10.0, ttl=TTL)
    assert keyset.expires_at == 10.0 + TTL
    assert [k.kid for k in keyset.lookup("k2", "ES256")] == ["k2"]
    assert [k.kid for k in keyset.lookup(None, "ES256")] == ["k1", "k2"]
    assert keyset.lookup("k3", "ES256") == ()
    assert keyset.lookup("k1", "RS256") == ()


# --------------------------------------------------------------------------- cold start


async def test_cold_start_fetches_once() -> None:
    s = Setup()
    assert await s.kids("k1") == ["k1"]
    assert await s.kids("k1") == ["k1"]
    assert s.idp.calls == [("jwks", URI)]


async def test_cold_start_with_the_idp_down_is_a_503_and_recovers_with_it() -> None:
    s = Setup()
    s.idp.failure = "connect_error"
    with pytest.raises(UpstreamUnavailable) as caught:
        await s.keys.keys_for("k1", "ES256")
    assert caught.value.outcome == "connect_error"
    assert s.keys.keyset is None
    assert s.keys.trusted_until() == 0.0
    s.idp.failure = None
    assert await s.kids("k1") == ["k1"]  # the next request tries again: no lock-out


async def test_concurrent_cold_misses_share_one_fetch() -> None:
    s = Setup()
    gate = s.idp.hang()
    waiters = [asyncio.ensure_future(s.keys.keys_for("k1", "ES256")) for _ in range(20)]
    await gate.reached(1)
    await settle()  # every waiter has joined the fetch
    gate.open()
    results = await asyncio.gather(*waiters)
    assert all(len(keys) == 1 for keys in results)
    assert s.fetches == 1


async def test_a_waiter_giving_up_does_not_cancel_the_shared_fetch() -> None:
    s = Setup()
    gate = s.idp.hang()
    impatient = asyncio.ensure_future(s.keys.keys_for("k1", "ES256"))
    patient = asyncio.ensure_future(s.keys.keys_for("k1", "ES256"))
    await gate.reached(1)
    impatient.cancel()
    await asyncio.wait([impatient])
    gate.open()
    assert [k.kid for k in await patient] == ["k1"]
    assert impatient.cancelled()
    assert s.fetches == 1


async def test_concurrent_cold_misses_share_one_failure() -> None:
    s = Setup()
    s.idp.failure = "timeout"
    gate = s.idp.hang()
    waiters = [asyncio.ensure_future(s.keys.keys_for("k1", "ES256")) for _ in range(5)]
    await gate.reached(1)
    await settle()  # every waiter has joined the fetch
    gate.open()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, UpstreamUnavailable) for r in results)
    assert s.fetches == 1


async def test_warm_up_reports_success_or_failure_without_raising() -> None:
    s = Setup()
    s.idp.failure = "http_503"
    assert await s.keys.warm_up() is False
    s.idp.failure = None
    assert await s.keys.warm_up() is True
    assert s.keys.keyset is not None


# --------------------------------------------------------------------------- no keys yet: retries with backoff


def test_retries_double_from_half_a_second_and_are_capped_at_5_seconds() -> None:
    assert [retry_delay(n, 0.0) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert retry_delay(10_000, 0.0) == RETRY_CAP  # no overflow however long the IdP stays down
    # Jitter spreads replicas out by shortening a wait, never by lengthening it past the cap.
    assert all(4.0 <= retry_delay(n, 0.999) <= RETRY_CAP for n in range(4, 40))
    assert retry_delay(0, 0.5) == pytest.approx(0.45)


class SteppedSleep:
    """The retry loop's sleep: records each wait and returns at once (no wall-clock wait)."""

    def __init__(self, idp: FakeIdpClient, recover_after: int) -> None:
        self.waits: list[float] = []
        self._idp = idp
        self._recover_after = recover_after

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if len(self.waits) == self._recover_after:
            self._idp.failure = None  # the IdP is back for the next attempt
        await asyncio.sleep(0)


async def test_without_keys_the_source_retries_with_backoff_until_they_arrive() -> None:
    idp = FakeIdpClient(jwks(K1))
    idp.failure = "http_404"
    sleep = SteppedSleep(idp, recover_after=7)
    keys = JwksKeySource(URI, idp, ttl=TTL, clock=FakeClock(0.0), sleep=sleep, jitter=lambda: 0.0)
    assert await keys.warm_up() is False
    keys.retry_in_background()
    keys.retry_in_background()  # one loop, however often asked
    async with asyncio.timeout(2):
        await keys.keys_arrived.wait()
    assert sleep.waits == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert len(idp.calls) == 1 + 7  # the warm-up, then one fetch after each wait
    assert keys.keyset is not None
    assert keys.status() == "ready"
    keys.retry_in_background()  # with keys: nothing to do
    await settle()
    assert len(idp.calls) == 8


async def test_retries_stop_when_keys_come_from_a_request_meanwhile() -> None:
    idp = FakeIdpClient(jwks(K1))
    waiting = asyncio.Event()
    resume = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waiting.set()
        await resume.wait()

    keys = JwksKeySource(URI, idp, ttl=TTL, clock=FakeClock(0.0), sleep=sleep)
    keys.retry_in_background()
    await waiting.wait()
    assert [k.kid for k in await keys.keys_for("k1", "ES256")] == ["k1"]  # a request fetched them
    resume.set()
    await settle()
    assert len(idp.calls) == 1  # the loop saw the keys and made no fetch of its own


async def test_stop_retrying_ends_the_loop() -> None:
    idp = FakeIdpClient(jwks(K1))
    idp.failure = "connect_error"
    waiting = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waiting.set()
        await asyncio.Event().wait()  # forever: only the cancellation ends it

    keys = JwksKeySource(URI, idp, ttl=TTL, clock=FakeClock(0.0), sleep=sleep)
    keys.retry_in_background()
    await waiting.wait()
    keys.stop_retrying()  # the introspector was replaced by a reload
    idp.failure = None
    await settle()
    assert idp.calls == []
    assert keys.keyset is None


async def test_a_failed_fetch_is_logged_with_the_introspector_and_the_url_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="authz_service")
    idp = FakeIdpClient(jwks(K1))
    idp.failure = "http_404"
    uri = "https://svc:pa55word@idp.example:8443/tenant/jwks?api_key=s3cr3t#frag"
    keys = JwksKeySource(uri, idp, ttl=TTL, clock=FakeClock(0.0), name="idp")
    assert await keys.warm_up() is False
    [record] = [r for r in caplog.records if r.getMessage() == "JWKS fetch failed"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["introspector"] == "idp"
    assert fields["url"] == "https://idp.example:8443/tenant/jwks"
    assert (fields["endpoint"], fields["outcome"], fields["keys"]) == ("jwks", "http_404", "none")
    logged = caplog.text + json.dumps(fields)
    for secret in ("pa55word", "s3cr3t", "svc:", "frag"):
        assert secret not in logged
    assert keys.status() == "no keys yet: http_404 from https://idp.example:8443/tenant/jwks"
    assert idp.calls == [("jwks", uri)]  # the request itself goes to the URL as configured


async def test_an_ongoing_failure_is_logged_again_at_most_every_30_seconds(caplog: pytest.LogCaptureFixture) -> None:
    # Without keys every request fetches: a down IdP under traffic must not flood the log.
    caplog.set_level(logging.INFO, logger="authz_service")
    clock = FakeClock(0.0)
    idp = FakeIdpClient(jwks(K1))
    idp.failure = "connect_error"
    keys = JwksKeySource(URI, idp, ttl=TTL, clock=clock, name="idp")
    for _ in range(50):
        await keys.warm_up()
    idp.failure = "timeout"  # another failure: logged at once
    await keys.warm_up()
    clock.advance(FAILURE_LOG_EVERY)
    await keys.warm_up()  # the same failure, 30 s later
    idp.failure = None
    await keys.warm_up()

    def lines() -> list[tuple[str, Any, Any]]:
        return [
            (r.getMessage(), r.fields.get("outcome"), r.fields.get("unlogged_failures"))  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage().startswith("JWKS fetch")
        ]

    assert lines() == [
        ("JWKS fetch failed", "connect_error", 0),
        ("JWKS fetch failed", "timeout", 49),
        ("JWKS fetch failed", "timeout", 0),
        ("JWKS fetch recovered", None, None),
    ]


async def test_a_failed_discovery_names_the_discovery_document() -> None:
    idp = FakeIdpClient()
    idp.by_url = {"https://login.example/t/.well-known/openid-configuration": {"issuer": "https://other.example"}}
    location = OidcDiscovery("https://login.example/t", idp, 1.0)
    keys = JwksKeySource(location, idp, ttl=TTL, clock=FakeClock(0.0), name="oidc")
    assert await keys.warm_up() is False
    assert keys.status() == "no keys yet: issuer_mismatch from https://login.example/t/.well-known/openid-configuration"


async def test_status_says_fresh_stale_or_expired_and_why() -> None:
    clock = FakeClock(0.0)
    idp = FakeIdpClient(jwks(K1))
    keys = JwksKeySource(URI, idp, ttl=TTL, max_stale=50, clock=clock)
    assert keys.status() == "no keys yet: first fetch under way"
    await keys.warm_up()
    assert keys.status() == "ready"
    idp.failure = "http_503"
    clock.advance(TTL * REFRESH_AHEAD)
    assert await keys.warm_up() is False  # a refresh that failed: the keys stay
    assert keys.status() == f"ready (last refresh failed: http_503 from {URI})"
    clock.advance(TTL * (1 - REFRESH_AHEAD) + 10)
    assert keys.status() == f"serving stale keys, 10 s past cache_ttl: http_503 from {URI}"
    clock.advance(45)
    assert keys.status() == f"keys expired, 55 s past cache_ttl: http_503 from {URI}"
    idp.failure = None
    await keys.warm_up()
    assert keys.status() == "ready"


# --------------------------------------------------------------------------- refresh ahead


async def test_no_refetch_before_80_percent_of_the_ttl() -> None:
    s = Setup()
    await s.kids()
    s.clock.advance(TTL * REFRESH_AHEAD - 0.1)
    await s.kids()
    await settle()
    assert s.fetches == 1


async def test_past_80_percent_a_background_refresh_starts_and_nobody_waits() -> None:
    s = Setup()
    await s.kids()
    gate = s.idp.hang()  # the IdP now takes forever
    s.clock.advance(TTL * REFRESH_AHEAD)
    assert await s.kids() == ["k1"]  # answered from memory while the refresh hangs
    await gate.reached(1)
    assert s.fetches == 2
    s.clock.advance(1)
    assert await s.kids() == ["k1"]
    await settle()
    assert s.fetches == 2  # one refresh in flight at a time
    gate.open()
    await settle()
    s.clock.advance(1)
    await s.kids()
    await settle()
    assert s.fetches == 2  # refreshed: fresh again until 80% of the new ttl
    assert REFRESH_AHEAD == 0.8


async def test_a_failed_background_refresh_keeps_the_keys_and_retries_later_not_per_request() -> None:
    s = Setup()
    await s.kids()
    s.idp.failure = "timeout"
    s.clock.advance(80)
    assert await s.kids() == ["k1"]
    await settle()
    assert s.fetches == 2
    s.clock.advance(1)
    assert await s.kids() == ["k1"]
    await settle()
    assert s.fetches == 2  # not on every request...
    s.clock.advance(4)
    assert await s.kids() == ["k1"]
    await settle()
    assert s.fetches == 3  # ...but again a few seconds later


async def test_an_empty_key_set_from_the_idp_does_not_replace_good_keys() -> None:
    s = Setup()
    await s.kids()
    generation = s.keys.generation
    s.idp.document = {"keys": []}
    s.clock.advance(80)
    await s.kids()
    await settle()
    assert s.fetches == 2
    assert await s.kids() == ["k1"]
    assert s.keys.generation == generation


# --------------------------------------------------------------------------- expiry and max_stale


async def test_expired_keys_are_not_used_without_max_stale() -> None:
    s = Setup()
    await s.kids()
    s.idp.failure = "connect_error"
    s.clock.advance(TTL)
    with pytest.raises(UpstreamUnavailable):
        await s.keys.keys_for("k1", "ES256")


async def test_expired_keys_are_refetched_in_the_foreground() -> None:
    s = Setup()
    await s.kids()
    s.clock.advance(TTL + 1)
    s.publish(K2)
    assert await s.kids("k2") == ["k2"]
    assert s.fetches == 2


async def test_max_stale_serves_the_last_good_keys_while_the_idp_is_down() -> None:
    s = Setup(max_stale=50)
    await s.kids()
    s.idp.failure = "connect_error"
    s.clock.advance(TTL + 10)
    assert await s.kids() == ["k1"]
    assert s.keys.staleness() == 10
    assert s.keys.stale_answers == 1
    s.clock.advance(39.9)
    assert await s.kids() == ["k1"]
    s.clock.advance(0.1)  # expires_at + max_stale: nothing usable any more
    with pytest.raises(UpstreamUnavailable):
        await s.keys.keys_for("k1", "ES256")


async def test_max_stale_with_the_idp_up_answers_from_the_expired_keys_until_one_refresh_lands() -> None:
    # What max_stale does exactly (docs/identity-providers.md): past cache_ttl the last good keys
    # keep verifying while a refresh runs in the background, whether the IdP is up or not; with
    # the IdP up, only the requests during that one refresh see them. Without max_stale the same
    # request waits for the fetch instead.
    s = Setup(max_stale=50)
    await s.kids()
    s.publish(K2)  # the IdP dropped k1
    gate = s.idp.hang()
    s.clock.advance(TTL + 1)
    assert await s.kids("k1") == ["k1"]  # answered at once from the expired keys
    assert s.keys.stale_answers == 1
    await gate.reached(1)
    assert s.fetches == 2  # ... while one refresh runs
    assert await s.kids("k1") == ["k1"]  # still in flight: still the expired keys
    assert s.fetches == 2
    gate.open()
    await settle()
    assert await s.rejection("k1") is Reason.UNKNOWN_KEY  # the refresh landed: k1 is gone
    assert await s.kids("k2") == ["k2"]
    assert s.keys.staleness() == 0


async def test_max_stale_retries_a_down_idp_at_most_every_5_seconds() -> None:
    s = Setup(max_stale=50)
    await s.kids()
    s.idp.failure = "connect_error"
    s.clock.advance(TTL)
    for _ in range(10):
        assert await s.kids() == ["k1"]
        await settle()
    assert s.fetches == 2  # one background attempt, not one per request
    s.clock.advance(5)
    assert await s.kids() == ["k1"]
    await settle()
    assert s.fetches == 3
    s.idp.failure = None
    s.clock.advance(5)
    await s.kids()
    await settle()
    assert s.keys.staleness() == 0  # back up: fresh keys, no longer stale


async def test_staleness_is_zero_while_fresh_or_empty() -> None:
    s = Setup()
    assert s.keys.staleness() == 0
    await s.kids()
    s.clock.advance(TTL - 1)
    assert s.keys.staleness() == 0


async def test_trusted_until_is_the_keys_expiry_plus_max_stale_in_epoch_seconds() -> None:
    s = Setup(max_stale=50)
    await s.kids()
    s.clock.advance(30)
    # The key source counts on a monotonic clock; trusted_until answers in epoch seconds.
    expected = time.time() + (TTL + 50 - 30)
    assert abs(s.keys.trusted_until() - expected) < 1.0


# --------------------------------------------------------------------------- unknown kid


async def test_unknown_kid_refetches_once_and_finds_a_rotated_key() -> None:
    s = Setup()
    await s.kids()
    s.publish(K1, K2)
    s.clock.advance(1)
    assert await s.kids("k2") == ["k2"]
    assert s.fetches == 2


async def test_unknown_kid_refetch_is_rate_limited_to_one_per_5_seconds() -> None:
    s = Setup()
    await s.kids()
    s.clock.advance(1)
    assert await s.rejection("bogus-1") is Reason.UNKNOWN_KEY
    assert s.fetches == 2
    s.clock.advance(4.9)
    assert await s.rejection("bogus-2") is Reason.UNKNOWN_KEY
    assert s.fetches == 2
    s.clock.advance(0.1)
    assert await s.rejection("bogus-3") is Reason.UNKNOWN_KEY
    assert s.fetches == 3


async def test_a_flood_of_invented_kids_costs_the_idp_one_request() -> None:
    s = Setup()
    await s.kids()
    s.clock.advance(10)
    results = await asyncio.gather(
        *(s.keys.keys_for(f"bogus-{i}", "ES256") for i in range(100)), return_exceptions=True
    )
    assert all(isinstance(r, TokenRejected) for r in results)
    assert s.fetches == 2


async def test_a_known_kid_never_causes_a_refetch() -> None:
    s = Setup()
    await s.kids()
    s.clock.advance(10)
    assert await s.rejection("k1", alg="RS256") is Reason.BAD_ALGORITHM
    assert s.fetches == 1


async def test_an_algorithm_no_key_has_is_a_bad_algorithm() -> None:
    s = Setup()
    assert await s.rejection(None, alg="HS256") is Reason.BAD_ALGORITHM
    assert await s.rejection(None, alg="none") is Reason.BAD_ALGORITHM


async def test_token_without_kid_is_tried_against_every_key() -> None:
    s = Setup(K1, K2)
    assert await s.kids(None) == ["k1", "k2"]


# --------------------------------------------------------------------------- a key without kid


class Verifying:
    """A JwtIntrospector over the fake IdP's keys: signature failures may refetch (rate-limited)."""

    ISS = "https://idp.example"

    def __init__(self, *published: EcSigner) -> None:
        self.s = Setup(*published)
        resource = {"id": "idp", "type": "jwt", "jwks_uri": URI, "jwt": {"iss": self.ISS}}
        [config] = validate_config({"introspectors": [resource]}, None).introspectors
        assert isinstance(config, JwtIntrospectorConfig)
        self.token_clock = FakeClock()
        self.introspector = JwtIntrospector(config, self.s.keys, clock=self.token_clock)

    def token(self, signer: EcSigner, kid: str | None = None) -> str:
        claims = {"iss": self.ISS, "sub": "user-1", "exp": self.token_clock.now + 600}
        return signer.sign(claims, kid=kid) if kid is not None else signer.sign(claims)

    async def user(self, token: str) -> str | None:
        return (await self.introspector.introspect(Credential(token))).user_id

    async def rejection(self, token: str) -> Reason:
        with pytest.raises(TokenRejected) as caught:
            await self.introspector.introspect(Credential(token))
        return caught.value.reason


KIDLESS_OLD = EcSigner(None)
KIDLESS_NEW = EcSigner(None)


@pytest.mark.parametrize("new_key", [K2, KIDLESS_NEW], ids=["published-with-kid", "published-without-kid"])
async def test_a_key_without_kid_does_not_hide_a_rotation(new_key: EcSigner) -> None:
    # A kid-less key stands in for every kid; a token of a newly published key must not get
    # bad_signature until the next refresh: the failure refetches once, as an unknown kid does.
    v = Verifying(KIDLESS_OLD)
    assert await v.user(v.token(KIDLESS_OLD, kid="k-old")) == "user-1"
    v.s.publish(new_key)
    v.s.clock.advance(1)
    assert await v.user(v.token(new_key, kid="k2")) == "user-1"
    assert v.s.fetches == 2


async def test_a_token_without_kid_after_a_rotation_refetches_once() -> None:
    v = Verifying(K1)
    await v.user(v.token(K1))
    v.s.publish(K2)
    v.s.clock.advance(1)
    no_kid = EcSigner(None, K2.private)  # K2's key, its tokens without a kid header
    assert await v.user(v.token(no_kid)) == "user-1"
    assert v.s.fetches == 2


async def test_bad_signatures_against_a_key_without_kid_share_the_unknown_kid_rate_limit() -> None:
    v = Verifying(KIDLESS_OLD)
    await v.user(v.token(KIDLESS_OLD, kid="k-old"))
    v.s.clock.advance(10)
    forger = EcSigner(None)
    assert await v.rejection(v.token(forger, kid="forged-1")) is Reason.BAD_SIGNATURE
    assert v.s.fetches == 2  # one refetch
    for i in range(20):  # a flood inside the interval: no more fetches
        assert await v.rejection(v.token(forger, kid=f"forged-{i}")) is Reason.BAD_SIGNATURE
    assert v.s.fetches == 2
    v.s.clock.advance(5)
    assert await v.rejection(v.token(forger, kid="forged-x")) is Reason.BAD_SIGNATURE
    assert v.s.fetches == 3


async def test_a_bad_signature_under_a_published_kid_never_refetches() -> None:
    v = Verifying(K1, KIDLESS_OLD)
    await v.user(v.token(K1))
    v.s.clock.advance(10)
    assert await v.rejection(EcSigner("k1").sign({"iss": Verifying.ISS, "exp": v.token_clock.now + 60})) is (
        Reason.BAD_SIGNATURE
    )
    assert v.s.fetches == 1


async def test_a_refetch_after_a_bad_signature_that_fails_is_a_503() -> None:
    # As for an unknown kid: while the IdP is down we cannot tell a rotation from a forgery.
    v = Verifying(KIDLESS_OLD)
    await v.user(v.token(KIDLESS_OLD, kid="k-old"))
    v.s.idp.failure = "connect_error"
    v.s.clock.advance(10)
    with pytest.raises(UpstreamUnavailable):
        await v.introspector.introspect(Credential(v.token(EcSigner(None), kid="k-new")))


# --------------------------------------------------------------------------- generation


async def test_generation_changes_when_the_kids_change() -> None:
    s = Setup()
    assert s.keys.generation == 0
    await s.kids()
    first = s.keys.generation
    assert first != 0
    s.clock.advance(TTL)
    await s.kids()
    assert s.keys.generation == first  # the same keys again: verified tokens stay valid
    s.publish(K2)
    s.clock.advance(TTL)
    await s.kids("k2")
    assert s.keys.generation != first


async def test_generation_changes_when_a_key_is_replaced_under_the_same_kid() -> None:
    # A rotation that reuses the kid (or publishes keys without kids) is a rotation too: tokens
    # verified with the retired key must not live on in the verified-token cache.
    s = Setup()
    await s.kids()
    first = s.keys.generation
    s.publish(EcSigner("k1"))
    s.clock.advance(TTL)
    await s.kids()
    assert s.keys.generation != first


async def test_generation_changes_when_keys_without_kid_are_replaced() -> None:
    s = Setup(EcSigner(None))
    await s.kids(None)
    first = s.keys.generation
    s.publish(EcSigner(None))
    s.clock.advance(TTL)
    await s.kids(None)
    assert s.keys.generation != first


# --------------------------------------------------------------------------- over real HTTP


@pytest_asyncio.fixture
async def canned() -> AsyncIterator[CannedIdp]:
    async with CannedIdp() as server:
        yield server


async def test_verifies_a_token_with_keys_fetched_over_http(canned: CannedIdp, client: UpstreamClient) -> None:
    canned.answer(jwks(K1))
    iss = "https://idp.example"
    resource = {"id": "idp", "type": "jwt", "jwks_uri": canned.url + "/jwks", "jwt": {"iss": iss}}
    [config] = validate_config({"introspectors": [resource]}, None).introspectors
    assert isinstance(config, JwtIntrospectorConfig)
    keys = JwksKeySource(canned.url + "/jwks", client, ttl=TTL, clock=FakeClock(0.0))
    clock = FakeClock()
    introspector = JwtIntrospector(config, keys, clock=clock)
    token = K1.sign({"iss": iss, "sub": "user-1", "exp": clock.now + 60})
    assert (await introspector.introspect(Credential(token))).user_id == "user-1"
    assert canned.paths() == ["/jwks"]
    assert client.calls[("jwks", "ok")] == 1


async def test_an_idp_error_on_cold_start_is_a_503(canned: CannedIdp, client: UpstreamClient) -> None:
    canned.answer({"error": "temporarily_unavailable"}, status=503)
    keys = JwksKeySource(canned.url + "/jwks", client, ttl=TTL, clock=FakeClock(0.0))
    with pytest.raises(UpstreamUnavailable) as caught:
        await keys.keys_for("k1", "ES256")
    assert caught.value.outcome == "http_503"


async def test_a_hanging_idp_is_a_503_after_the_timeout(canned: CannedIdp, client: UpstreamClient) -> None:
    gate: Gate = canned.hang()
    keys = JwksKeySource(canned.url + "/jwks", client, ttl=TTL, timeout=0.05, clock=FakeClock(0.0))
    with pytest.raises(UpstreamUnavailable) as caught:
        await keys.keys_for("k1", "ES256")
    assert caught.value.outcome == "timeout"
    gate.open()
