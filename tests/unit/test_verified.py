"""verified: SHA-256(token) -> shaped identity, for as long as its introspector trusts the verification.

An entry lives until `introspector.trusted_until(identity)` (a JWT: min(exp + leeway, the keys'
trust)), dies with any key rotation of its introspector, and is never reused for a credential
bound to another introspector. A hit pokes its JWKS key source's refresh once one is due, so
tokens served from memory keep the keys fresh (checked against a real JWKS server on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
from collections.abc import AsyncIterator, Sequence

import pytest
import pytest_asyncio

from authz_service.config.model import JwtIntrospectorConfig
from authz_service.errors import TokenRejected, UpstreamUnavailable
from authz_service.model import Identity, Reason
from authz_service.registries import validate_config
from authz_service.tokens.base import Credential
from authz_service.tokens.jwks import REFRESH_AHEAD, JwksKeySource
from authz_service.tokens.jwt import JwtIntrospector, StaticKeySource
from authz_service.tokens.keys import VerificationKey
from authz_service.tokens.router import IntrospectorRouter
from authz_service.tokens.verified import VerifiedTokens, token_digest
from authz_service.upstream import UpstreamClient
from tests.unit.fakes import EPOCH, CannedIdp, EcSigner, FakeClock, FakeIntrospector, hs_token, jwks


class Shaper:
    """The shape callback: marks identities and counts how often it ran."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, identity: Identity) -> Identity:
        self.calls += 1
        return dataclasses.replace(identity, headers=("x-user-id", identity.user_id or ""))

    def unshaped(self, identity: Identity) -> Identity | None:
        # The fake keeps the claims as they were: shaping only added headers.
        return dataclasses.replace(identity, headers=())


class Refusing(Shaper):
    """A shaper that finds every identity unfit for headers (a control character in the user id)."""

    def __call__(self, identity: Identity) -> Identity:
        raise TokenRejected(Reason.BAD_CLAIMS)


class Setup:
    def __init__(self, max_entries: int = 100) -> None:
        self.clock = FakeClock()
        self.ext = FakeIntrospector("ext")
        self.other = FakeIntrospector("other")
        self.shape = Shaper()
        self.events: list[tuple[str, str]] = []
        self.verified = VerifiedTokens(
            IntrospectorRouter([self.ext, self.other]),
            self.shape,
            max_entries,
            clock=self.clock,
            on_event=lambda cache, event: self.events.append((cache, event)),
        )

    async def check(self, token: str, introspector: str | None = None) -> Identity:
        return await self.verified.introspect(Credential(token, introspector))


def test_entries_are_keyed_by_the_tokens_sha256() -> None:
    assert token_digest("t0k") == int(hashlib.sha256(b"t0k").hexdigest(), 16)
    assert token_digest("t0k") != token_digest("t0K")


async def test_second_check_is_served_from_memory() -> None:
    s = Setup()
    s.ext.vouch("t1", "user-1")
    s.ext.deadline = EPOCH + 60
    first = await s.check("t1")
    second = await s.check("t1")
    assert second == first
    assert len(s.ext.calls) == 1
    assert s.shape.calls == 1  # headers built once per verification, not per request
    assert (s.verified.misses, s.verified.hits) == (1, 1)
    assert s.events == [("verified", "miss"), ("verified", "hit")]


async def test_the_identity_returned_is_the_shaped_one() -> None:
    s = Setup()
    s.ext.vouch("t1", "user-1")
    assert (await s.check("t1")).headers == ("x-user-id", "user-1")


async def test_entry_lives_until_the_introspectors_deadline() -> None:
    s = Setup()
    s.ext.vouch("t1")
    s.ext.deadline = EPOCH + 60
    await s.check("t1")
    s.clock.advance(59.9)
    await s.check("t1")
    assert len(s.ext.calls) == 1
    s.clock.advance(0.1)  # now == deadline: dead
    await s.check("t1")
    assert len(s.ext.calls) == 2


async def test_an_identity_already_past_its_deadline_is_not_remembered() -> None:
    s = Setup()
    s.ext.vouch("t1")
    s.ext.deadline = EPOCH
    await s.check("t1")
    await s.check("t1")
    assert len(s.ext.calls) == 2
    assert len(s.verified) == 0


async def test_a_key_rotation_invalidates_the_introspectors_entries() -> None:
    s = Setup()
    s.ext.vouch("t1")
    s.other.vouch("t2")
    await s.check("t1")
    await s.check("t2", "other")
    s.ext.rotate()
    await s.check("t1")
    await s.check("t2", "other")
    assert len(s.ext.calls) == 2  # verified again with the new keys
    assert len(s.other.calls) == 1  # another introspector's entries are unaffected


@pytest.mark.parametrize("failure", [TokenRejected(Reason.INACTIVE), UpstreamUnavailable("introspection", "timeout")])
async def test_failures_are_never_remembered(failure: Exception) -> None:
    s = Setup()
    s.ext.explode("t1", failure)
    for _ in range(2):
        with pytest.raises(type(failure)):
            await s.check("t1")
    assert len(s.ext.calls) == 2
    assert len(s.verified) == 0


async def test_a_shape_rejection_is_not_remembered() -> None:
    s = Setup()
    s.ext.vouch("t1", "user-1")

    verified = VerifiedTokens(IntrospectorRouter([s.ext]), Refusing(), 10, clock=s.clock)
    for _ in range(2):
        with pytest.raises(TokenRejected):
            await verified.introspect(Credential("t1"))
    assert len(verified) == 0


async def test_an_entry_never_vouches_for_a_credential_bound_elsewhere() -> None:
    # The token was verified by `ext`; presented in `other`'s cookie, only `other` may judge it.
    s = Setup()
    s.ext.vouch("t1", "from-ext")
    s.other.reject("t1")
    await s.check("t1")
    with pytest.raises(TokenRejected):
        await s.check("t1", "other")
    assert len(s.other.calls) == 1


async def test_an_entry_serves_a_credential_bound_to_its_own_introspector() -> None:
    s = Setup()
    s.ext.vouch("t1")
    await s.check("t1", "ext")
    await s.check("t1", "ext")
    await s.check("t1")
    assert len(s.ext.calls) == 1


async def test_memory_is_bounded_least_recently_used_first() -> None:
    s = Setup(max_entries=2)
    for token in ("t1", "t2", "t3"):
        s.ext.vouch(token)
    await s.check("t1")
    await s.check("t2")
    await s.check("t1")  # t1 is now the most recently used
    await s.check("t3")  # evicts t2
    assert len(s.verified) == 2
    asked_before = len(s.ext.calls)
    await s.check("t1")
    await s.check("t3")
    assert len(s.ext.calls) == asked_before
    await s.check("t2")
    assert len(s.ext.calls) == asked_before + 1


# --------------------------------------------------------------------------- with a real JwtIntrospector

ISS = "https://idp.example"
SECRET = b"an-hmac-secret-of-at-least-32-bytes!"


class RotatingKeys:
    """A KeySource over one HMAC key whose trust and generation the test moves."""

    def __init__(self, config: JwtIntrospectorConfig, trusted: float = math.inf) -> None:
        inner = StaticKeySource.from_config(config)
        assert inner is not None
        self._inner = inner
        self.trusted = trusted
        self.generation = 1

    def trusted_until(self) -> float:
        return self.trusted

    async def keys_for(self, kid: str | None, alg: str) -> Sequence[VerificationKey]:
        return await self._inner.keys_for(kid, alg)

    async def keys_after_bad_signature(
        self, kid: str | None, alg: str, tried: Sequence[VerificationKey]
    ) -> Sequence[VerificationKey]:
        return await self._inner.keys_after_bad_signature(kid, alg, tried)


def jwt_setup(trusted: float = math.inf) -> tuple[FakeClock, RotatingKeys, VerifiedTokens]:
    resource = {"id": "idp", "type": "jwt", "jwt": {"iss": ISS, "secret": SECRET.decode(), "leeway": 30}}
    [config] = validate_config({"introspectors": [resource]}, None).introspectors
    assert isinstance(config, JwtIntrospectorConfig)
    clock = FakeClock()
    keys = RotatingKeys(config, trusted)
    introspector = JwtIntrospector(config, keys, clock=clock)
    return clock, keys, VerifiedTokens(IntrospectorRouter([introspector]), Shaper(), 10, clock=clock)


def token(exp: float) -> str:
    return hs_token({"iss": ISS, "sub": "user-1", "exp": exp}, SECRET)


async def test_jwt_entry_dies_at_exp_plus_leeway_and_the_token_is_then_expired() -> None:
    clock, _, verified = jwt_setup()
    t = token(EPOCH + 100)
    await verified.introspect(Credential(t))
    clock.advance(129.9)
    await verified.introspect(Credential(t))
    assert verified.hits == 1
    clock.advance(0.1)
    with pytest.raises(TokenRejected) as caught:
        await verified.introspect(Credential(t))
    assert caught.value.reason is Reason.EXPIRED


async def test_jwt_entry_dies_when_the_keys_stop_being_trusted_if_that_is_sooner() -> None:
    clock, _, verified = jwt_setup(trusted=EPOCH + 50)
    t = token(EPOCH + 1000)
    await verified.introspect(Credential(t))
    clock.advance(49)
    await verified.introspect(Credential(t))
    clock.advance(1)
    await verified.introspect(Credential(t))
    assert (verified.hits, verified.misses) == (1, 2)


async def test_jwt_entry_dies_with_a_key_rotation() -> None:
    _, keys, verified = jwt_setup()
    t = token(EPOCH + 1000)
    await verified.introspect(Credential(t))
    keys.generation += 1
    await verified.introspect(Credential(t))
    assert (verified.hits, verified.misses) == (0, 2)


async def test_entries_outlive_a_reload_and_are_reshaped_by_the_new_shaper() -> None:
    s = Setup()
    s.ext.vouch("t1", "user-1")
    s.ext.deadline = EPOCH + 60
    first = await s.check("t1")
    # A reload: a new cache over the same entries, the same introspector, another shaper.
    reshaper = Shaper()
    after = VerifiedTokens(
        IntrospectorRouter([s.ext, s.other]), reshaper, 100, clock=s.clock, entries=s.verified.carried_over()
    )
    second = await after.introspect(Credential("t1"))
    assert len(s.ext.calls) == 1  # not asked again
    assert reshaper.calls == 1  # reshaped once, from the kept entry
    assert second.headers == first.headers
    third = await after.introspect(Credential("t1"))
    assert third is second  # and kept reshaped
    assert reshaper.calls == 1


async def test_entries_of_a_replaced_introspector_die_at_the_reload() -> None:
    s = Setup()
    s.ext.vouch("t1", "user-1")
    s.ext.deadline = EPOCH + 60
    await s.check("t1")
    replacement = FakeIntrospector("ext")  # same id, new object: its config changed
    replacement.vouch("t1", "user-1")
    replacement.deadline = EPOCH + 60
    after = VerifiedTokens(
        IntrospectorRouter([replacement]), s.shape, 100, clock=s.clock, entries=s.verified.carried_over()
    )
    await after.introspect(Credential("t1"))
    assert len(replacement.calls) == 1


async def test_concurrent_misses_share_one_verification() -> None:
    s = Setup()
    s.ext.vouch("t1", "user-1")
    s.ext.deadline = EPOCH + 60
    answers = await asyncio.gather(*(s.check("t1") for _ in range(10)))
    assert len(s.ext.calls) == 1
    assert all(answer is answers[0] for answer in answers)


# --------------------------------------------------------------------------- hits keep JWKS keys fresh


class Clocks:
    """The monotonic clock of the key source and the wall clock of deadlines, moving together."""

    def __init__(self) -> None:
        self.monotonic = FakeClock(0.0)
        self.wall = FakeClock()

    def advance(self, seconds: float) -> None:
        self.monotonic.advance(seconds)
        self.wall.advance(seconds)


@pytest_asyncio.fixture
async def canned() -> AsyncIterator[CannedIdp]:
    async with CannedIdp() as server:
        yield server


async def test_a_hit_starts_the_due_key_refresh_so_the_next_miss_never_waits(
    canned: CannedIdp, client: UpstreamClient
) -> None:
    ttl = 100.0
    signer = EcSigner("k1")
    canned.answer(jwks(signer))
    clocks = Clocks()
    resource = {"id": "idp", "type": "jwt", "jwks_uri": canned.url + "/jwks", "jwt": {"iss": ISS}}
    [config] = validate_config({"introspectors": [resource]}, None).introspectors
    assert isinstance(config, JwtIntrospectorConfig)
    keys = JwksKeySource(config.jwks_uri or "", client, ttl=ttl, clock=clocks.monotonic, wall_clock=clocks.wall)
    verified = VerifiedTokens(
        IntrospectorRouter([JwtIntrospector(config, keys, clock=clocks.wall)]),
        Shaper(),
        10,
        clock=clocks.wall,
        key_refresh={"idp": keys},
    )
    credential = Credential(signer.sign({"iss": ISS, "sub": "user-1", "exp": clocks.wall.now + 10 * ttl}))
    await verified.introspect(credential)  # a miss: the first fetch; the entry lives as long as these keys
    assert canned.paths() == ["/jwks"]

    clocks.advance(ttl * REFRESH_AHEAD - 1)
    await verified.introspect(credential)
    assert verified.hits == 1
    assert canned.paths() == ["/jwks"]  # not due yet: a hit costs a comparison, nothing more

    clocks.advance(2)  # past 80% of cache_ttl: due
    gate = canned.hang()
    await asyncio.wait_for(verified.introspect(credential), 1)  # answered while the IdP holds the refresh
    assert verified.hits == 2
    await gate.reached(1)
    gate.open()
    await keys.warm_up()  # joins the refresh in flight: it has landed once this returns
    assert canned.paths() == ["/jwks", "/jwks"]

    clocks.advance(ttl * (1 - REFRESH_AHEAD))  # past the first keys' cache_ttl: the entry died with them
    held = canned.hang()  # a fetch now would hang: the check below must need none
    identity = await asyncio.wait_for(verified.introspect(credential), 1)
    held.open()
    assert identity.user_id == "user-1"
    assert (verified.hits, verified.misses) == (2, 2)
    assert canned.paths() == ["/jwks", "/jwks"]  # verified again with the refreshed keys, at once
