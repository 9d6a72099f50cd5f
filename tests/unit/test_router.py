"""router: which introspector may judge a credential.

Bound credential -> its introspector only; a JWT -> the introspector of its `iss`; a JWT no
issuer claims -> only the opaque introspectors that accept JWTs (`accepts_jwt`), else 401
unknown_issuer with no call; anything else -> the introspectors without an issuer (opaque), in
config order; 503 if one could not answer and none vouched.
"""

from __future__ import annotations

import pytest

from authz_service.errors import TokenRejected, UpstreamUnavailable
from authz_service.model import Reason
from authz_service.tokens.base import Credential
from authz_service.tokens.jws import MAX_TOKEN_BYTES
from authz_service.tokens.router import IntrospectorRouter
from tests.unit.fakes import FakeIntrospector, compact

ISS_A = "https://a.example"
ISS_B = "https://b.example"
OPAQUE = "2YotnFZFEjr1zCsicMWpAA"


def jwt_of(iss: str | None, **claims: object) -> str:
    """A JWT-shaped token (the router reads, never verifies: the introspector does)."""
    payload = {"sub": "user-1", "exp": 2_000_000_000, **claims}
    if iss is not None:
        payload["iss"] = iss
    return compact({"alg": "HS256", "typ": "JWT"}, payload)


class Setup:
    """Two jwt introspectors (by issuer) and two opaque ones, in this config order."""

    def __init__(self, accepts_jwt: tuple[str, ...] = ()) -> None:
        self.a = FakeIntrospector("a", issuer=ISS_A)
        self.b = FakeIntrospector("b", issuer=ISS_B)
        self.first = FakeIntrospector("first")
        self.second = FakeIntrospector("second")
        self.router = IntrospectorRouter([self.a, self.first, self.b, self.second], accepts_jwt=accepts_jwt)

    def asked(self) -> dict[str, int]:
        return {i.id: len(i.calls) for i in (self.a, self.b, self.first, self.second) if i.calls}


async def rejection(router: IntrospectorRouter, credential: Credential) -> Reason:
    with pytest.raises(TokenRejected) as caught:
        await router.introspect(credential)
    return caught.value.reason


def test_members_by_id() -> None:
    s = Setup()
    assert list(s.router.members) == ["a", "first", "b", "second"]
    assert s.router.members["b"] is s.b


# --------------------------------------------------------------------------- JWTs go by issuer


async def test_jwt_goes_to_the_introspector_of_its_issuer_only() -> None:
    s = Setup()
    token = jwt_of(ISS_B)
    s.b.vouch(token, "user-b", kind="jwt")
    identity = await s.router.introspect(Credential(token))
    assert identity.introspector == "b"
    assert s.asked() == {"b": 1}


async def test_the_issuer_introspector_gets_the_parsed_token() -> None:
    s = Setup()
    token = jwt_of(ISS_A)
    s.a.vouch(token, kind="jwt")
    await s.router.introspect(Credential(token))
    [credential] = s.a.calls
    assert credential.jwt is not None
    assert credential.jwt.issuer == ISS_A


async def test_a_rejected_jwt_is_not_offered_to_anyone_else() -> None:
    s = Setup()
    token = jwt_of(ISS_A)
    s.a.reject(token, Reason.BAD_SIGNATURE)
    s.first.vouch(token)  # an opaque IdP that would say yes must never be asked
    assert await rejection(s.router, Credential(token)) is Reason.BAD_SIGNATURE
    assert s.asked() == {"a": 1}


async def test_an_unavailable_issuer_is_a_503() -> None:
    s = Setup()
    token = jwt_of(ISS_A)
    s.a.fail(token)
    with pytest.raises(UpstreamUnavailable):
        await s.router.introspect(Credential(token))
    assert s.asked() == {"a": 1}


@pytest.mark.parametrize("iss", ["https://unknown.example", None])
async def test_jwt_of_an_unknown_issuer_is_never_sent_to_opaque_introspectors(iss: str | None) -> None:
    # Two opaque introspectors that would vouch: neither may see a JWT no issuer claims.
    s = Setup()
    token = jwt_of(iss)
    s.first.vouch(token)
    s.second.vouch(token)
    assert await rejection(s.router, Credential(token)) is Reason.UNKNOWN_ISSUER
    assert s.asked() == {}


@pytest.mark.parametrize("iss", ["https://unknown.example", None])
async def test_jwt_of_an_unknown_issuer_goes_only_to_introspectors_that_accept_jwts(iss: str | None) -> None:
    s = Setup(accepts_jwt=("second",))
    token = jwt_of(iss)
    s.first.vouch(token, "never")
    s.second.vouch(token, "user-second")
    assert (await s.router.introspect(Credential(token))).user_id == "user-second"
    assert s.asked() == {"second": 1}


async def test_introspectors_that_accept_jwts_still_take_opaque_tokens_in_config_order() -> None:
    s = Setup(accepts_jwt=("second",))
    s.first.reject(OPAQUE)
    s.second.vouch(OPAQUE, "user-second")
    assert (await s.router.introspect(Credential(OPAQUE))).user_id == "user-second"
    assert s.asked() == {"first": 1, "second": 1}


async def test_a_jwt_an_issuer_claims_never_goes_to_introspectors_that_accept_jwts() -> None:
    s = Setup(accepts_jwt=("first", "second"))
    token = jwt_of(ISS_A)
    s.a.reject(token, Reason.EXPIRED)
    s.first.vouch(token)
    assert await rejection(s.router, Credential(token)) is Reason.EXPIRED
    assert s.asked() == {"a": 1}


async def test_jwt_of_an_unknown_issuer_without_opaque_introspectors_is_unknown_issuer() -> None:
    a = FakeIntrospector("a", issuer=ISS_A)
    router = IntrospectorRouter([a])
    assert await rejection(router, Credential(jwt_of("https://unknown.example"))) is Reason.UNKNOWN_ISSUER
    assert a.calls == []


async def test_jwt_shaped_garbage_is_malformed_unless_an_introspector_accepts_jwts() -> None:
    token = "eyJub3QganNvbg.x.y"  # starts like a JWT, is not one
    s = Setup()
    s.first.vouch(token)
    assert await rejection(s.router, Credential(token)) is Reason.MALFORMED
    assert s.asked() == {}
    s = Setup(accepts_jwt=("first",))
    s.first.vouch(token)
    assert (await s.router.introspect(Credential(token))).introspector == "first"


async def test_jwt_shaped_garbage_without_opaque_introspectors_is_malformed() -> None:
    a = FakeIntrospector("a", issuer=ISS_A)
    assert await rejection(IntrospectorRouter([a]), Credential("eyJub3QganNvbg.x.y")) is Reason.MALFORMED
    assert a.calls == []


async def test_too_large_never_goes_to_opaque_introspectors() -> None:
    s = Setup()
    token = jwt_of(ISS_A, pad="p" * MAX_TOKEN_BYTES)
    assert await rejection(s.router, Credential(token)) is Reason.TOO_LARGE
    assert s.asked() == {}


# --------------------------------------------------------------------------- opaque: config order


async def test_not_a_jwt_goes_to_opaque_introspectors_in_config_order() -> None:
    s = Setup()
    s.first.vouch(OPAQUE, "user-first")
    s.second.vouch(OPAQUE, "user-second")
    identity = await s.router.introspect(Credential(OPAQUE))
    assert identity.user_id == "user-first"
    assert s.asked() == {"first": 1}  # the first that vouches wins; the next is not asked


async def test_a_later_introspector_may_vouch_after_a_rejection() -> None:
    s = Setup()
    s.first.reject(OPAQUE)
    s.second.vouch(OPAQUE, "user-second")
    assert (await s.router.introspect(Credential(OPAQUE))).user_id == "user-second"
    assert s.asked() == {"first": 1, "second": 1}


async def test_an_unavailable_introspector_does_not_stop_a_later_one_vouching() -> None:
    s = Setup()
    s.first.fail(OPAQUE)
    s.second.vouch(OPAQUE, "user-second")
    assert (await s.router.introspect(Credential(OPAQUE))).user_id == "user-second"


@pytest.mark.parametrize("unavailable", ["first", "second"])
async def test_one_unavailable_and_none_vouching_is_a_503(unavailable: str) -> None:
    # Nobody said yes, and one could not answer: it might have. Fail closed, but not with a 401.
    s = Setup()
    for intro in (s.first, s.second):
        if intro.id == unavailable:
            intro.fail(OPAQUE, "timeout")
        else:
            intro.reject(OPAQUE)
    with pytest.raises(UpstreamUnavailable) as caught:
        await s.router.introspect(Credential(OPAQUE))
    assert caught.value.outcome == "timeout"


async def test_all_rejecting_is_a_401() -> None:
    s = Setup()
    s.first.reject(OPAQUE, Reason.INACTIVE)
    s.second.reject(OPAQUE, Reason.EXPIRED)
    assert await rejection(s.router, Credential(OPAQUE)) in {Reason.INACTIVE, Reason.EXPIRED}


async def test_jwt_introspectors_never_see_opaque_tokens() -> None:
    s = Setup()
    await rejection(s.router, Credential(OPAQUE))
    assert s.a.calls == []
    assert s.b.calls == []


async def test_opaque_token_without_opaque_introspectors_is_malformed() -> None:
    a = FakeIntrospector("a", issuer=ISS_A)
    assert await rejection(IntrospectorRouter([a]), Credential(OPAQUE)) is Reason.MALFORMED
    assert a.calls == []


# --------------------------------------------------------------------------- bound credentials


async def test_bound_credential_goes_to_its_introspector_only() -> None:
    s = Setup()
    s.second.vouch(OPAQUE, "from-cookie")
    s.first.vouch(OPAQUE, "never")
    assert (await s.router.introspect(Credential(OPAQUE, "second"))).user_id == "from-cookie"
    assert s.asked() == {"second": 1}


async def test_bound_credential_is_not_routed_by_its_issuer() -> None:
    s = Setup()
    token = jwt_of(ISS_A)
    s.a.vouch(token, kind="jwt")
    s.b.reject(token, Reason.UNTRUSTED_ISSUER)
    assert await rejection(s.router, Credential(token, "b")) is Reason.UNTRUSTED_ISSUER
    assert s.asked() == {"b": 1}


async def test_bound_credential_rejected_is_not_offered_to_others() -> None:
    s = Setup()
    s.first.reject(OPAQUE)
    s.second.vouch(OPAQUE)
    assert await rejection(s.router, Credential(OPAQUE, "first")) is Reason.INACTIVE
    assert s.asked() == {"first": 1}


async def test_a_jwt_from_a_bound_source_of_an_opaque_introspector_needs_accepts_jwt() -> None:
    s = Setup()
    token = jwt_of(ISS_A)
    s.second.vouch(token)
    assert await rejection(s.router, Credential(token, "second")) is Reason.UNKNOWN_ISSUER
    assert s.asked() == {}
    s = Setup(accepts_jwt=("second",))
    s.second.vouch(token, "from-cookie")
    assert (await s.router.introspect(Credential(token, "second"))).user_id == "from-cookie"
    assert s.asked() == {"second": 1}
