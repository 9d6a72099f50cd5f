"""Opaque tokens (RFC 7662) and the token cache, against the real IdP, with memory and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as redis  # here, not in the fixture: a first import there blocks the loop ~0.7 s

from authz_service.tokens.cache import BoundedMemoryCache
from authz_service.tokens.opaque import CachedIntrospector
from tests.conftest import StartService, jwks_introspector, new_idp, opaque_introspector, sleep_past
from tests.harness import Answer, Harness
from tests.hostile_idp import HostileIdentityProvider


@pytest.fixture(params=["memory", "redis"])
def cache_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each caching test runs against the bounded memory cache and a real Redis."""
    if request.param == "memory":
        return {"backend": "memory", "max_entries": 1000}
    return {"backend": "redis", "url": request.getfixturevalue("redis_url")}


async def _flush(config: dict[str, Any]) -> None:
    if config["backend"] == "redis":
        client = redis.from_url(config["url"])
        await client.flushdb()
        await client.aclose()


OpaqueService = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def opaque_service(
    idp: HostileIdentityProvider, start_service: StartService, cache_config: dict[str, Any]
) -> OpaqueService:
    """Start a service with one opaque introspector (keyword overrides) and this test's token cache."""
    await _flush(cache_config)

    async def start(**overrides: Any) -> Harness:
        return await start_service({"cache": cache_config, "introspectors": [opaque_introspector(idp, **overrides)]})

    return start


async def test_active_token_allowed_with_result_as_claims(
    idp: HostileIdentityProvider, opaque_service: OpaqueService
) -> None:
    service = await opaque_service()
    token = idp.issue_opaque({"sub": "pat-1", "scope": "read"})
    answer = await service.check(token=token)
    assert answer.allowed, answer.body
    assert answer.headers["x-user-id"] == "pat-1"
    assert answer.claims()["scope"] == "read"
    assert answer.claims()["active"] is True
    assert answer.metadata == {"user_id": "pat-1", "introspector": "opaque"}
    sent = idp.last_introspection
    assert sent is not None
    assert sent["form"] == {"token": token, "token_type_hint": "access_token"}
    assert sent["headers"]["Authorization"] == idp.introspection_authorization
    assert sent["headers"]["Accept"] == "application/json"


async def test_username_when_no_sub(idp: HostileIdentityProvider, opaque_service: OpaqueService) -> None:
    service = await opaque_service()
    answer = await service.check(token=idp.issue_opaque({"sub": None, "username": "jdoe"}))
    assert answer.allowed
    assert answer.headers["x-user-id"] == "jdoe"


async def test_inactive_and_unknown_tokens_are_401(idp: HostileIdentityProvider, opaque_service: OpaqueService) -> None:
    service = await opaque_service()
    revoked = idp.issue_opaque()
    idp.revoke(revoked)
    for token in (revoked, "never-issued-token"):
        answer = await service.check(token=token)
        assert (answer.code, answer.http_status, answer.response.status.message) == (16, 401, "inactive")
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]


async def test_result_is_cached(
    idp: HostileIdentityProvider,
    opaque_service: OpaqueService,
    start_service: StartService,
    cache_config: dict[str, Any],
) -> None:
    service = await opaque_service()
    token = idp.issue_opaque()
    for _ in range(10):
        assert (await service.check(token=token)).allowed
    assert idp.hits["introspect"] == 1
    counts = service.service.caches.stats.counts
    # Repeats are answered by the in-process verified-token cache, in front of the token cache.
    assert counts[("verified", "hit")] == 9
    assert counts[("opaque", "miss")] == 1
    # A reload keeps the verified-token cache: still no second introspection.
    await service.service.reload(service.service.config)
    assert (await service.check(token=token)).allowed
    assert idp.hits["introspect"] == 1
    # Another worker or replica on the same cache config (a second service here):
    other = await start_service({"cache": cache_config, "introspectors": [opaque_introspector(idp)]})
    assert (await other.check(token=token)).allowed
    other_counts = other.service.caches.stats.counts
    if cache_config["backend"] == "redis":
        # ... finds the answer in Redis and does not ask the IdP.
        assert other_counts[("opaque", "hit")] == 1
        assert idp.hits["introspect"] == 1
    else:
        # ... has its own memory: the answer is held once, in the verified cache of the process
        # that asked for it (issue #15), so the other process asks for itself.
        assert other_counts[("opaque", "miss")] == 1
        assert idp.hits["introspect"] == 2


@pytest.mark.slow  # waits out a TTL on the wall clock (clock-driven: tests/unit/test_opaque.py)
async def test_cache_bounded_by_token_exp(idp: HostileIdentityProvider, opaque_service: OpaqueService) -> None:
    service = await opaque_service(cache_ttl=300)
    token = idp.issue_opaque(ttl=1)
    expires = idp.introspect(token)["exp"]  # exactly 1 s after issue (no longer cut to the whole second)
    assert (await service.check(token=token)).allowed
    await sleep_past(expires)
    answer = await service.check(token=token)
    assert answer.http_status == 401
    assert idp.hits["introspect"] == 2  # the entry died with the token; the IdP was asked again


@pytest.mark.slow  # waits out a TTL on the wall clock (clock-driven: tests/unit/test_opaque.py)
async def test_cache_bounded_by_cache_ttl_so_revocation_is_seen(
    idp: HostileIdentityProvider, opaque_service: OpaqueService
) -> None:
    service = await opaque_service(cache_ttl=1)
    token = idp.issue_opaque(ttl=300)
    assert (await service.check(token=token)).allowed
    idp.revoke(token)
    assert (await service.check(token=token)).allowed  # still cached: revocation latency <= cache_ttl
    await asyncio.sleep(1.1)  # the behaviour under test: cache_ttl passing in real time
    answer = await service.check(token=token)
    assert answer.http_status == 401
    assert answer.response.status.message == "inactive"


async def test_outage_with_and_without_cache(idp: HostileIdentityProvider, opaque_service: OpaqueService) -> None:
    service = await opaque_service()
    cached = idp.issue_opaque()
    fresh = idp.issue_opaque()
    assert (await service.check(token=cached)).allowed
    await idp.go_offline()
    assert (await service.check(token=cached)).allowed
    answer = await service.check(token=fresh)
    assert (answer.code, answer.http_status) == (14, 503)
    assert answer.body["error"] == "temporarily_unavailable"


async def test_slow_idp_hits_the_timeout(idp: HostileIdentityProvider, opaque_service: OpaqueService) -> None:
    service = await opaque_service(timeout=0.3)
    idp.delay = 5
    started = time.monotonic()
    answer = await service.check(token=idp.issue_opaque())
    assert answer.http_status == 503
    assert time.monotonic() - started < 1.5  # well inside Envoy's deadline


async def test_single_flight_for_concurrent_checks(idp: HostileIdentityProvider, opaque_service: OpaqueService) -> None:
    service = await opaque_service()
    token = idp.issue_opaque()
    idp.delay = 0.2
    answers = await asyncio.gather(*(service.check(token=token) for _ in range(50)))
    assert all(a.allowed for a in answers)
    assert idp.hits["introspect"] == 1


@pytest.mark.parametrize(
    "mode", ["down", "html", "notjson", "redirect", "huge", "no_active", "active_string", "error500", "hang"]
)
async def test_unusable_answers_are_503_and_not_cached(
    idp: HostileIdentityProvider, start_service: StartService, mode: str
) -> None:
    service = await start_service({"introspectors": [opaque_introspector(idp, timeout=0.3)]})
    token = idp.issue_opaque()
    idp.introspect_mode = mode
    for expected_hits in (1, 2):
        answer = await service.check(token=token)
        assert (answer.code, answer.http_status) == (14, 503), mode
        assert idp.hits["introspect"] == expected_hits, mode  # not cached: asked again
    assert idp.hits["introspect_redirected"] == 0
    idp.introspect_mode = "ok"
    assert (await service.check(token=token)).allowed


async def test_expired_or_not_yet_valid_results_are_401(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    service = await start_service({"introspectors": [opaque_introspector(idp)]})
    now = int(time.time())
    idp.introspect_mode = "ok"
    future = idp.issue_opaque({"nbf": now + 600})
    answer = await service.check(token=future)
    assert answer.http_status == 401
    assert answer.response.status.message == "not_yet_valid"


async def test_cookie_source(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [opaque_introspector(idp, cookie="ASPXAUTH")]})
    token = idp.issue_opaque({"sub": "cookie-user"})
    # curl -H "Cookie: theme=dark; ASPXAUTH=$TOKEN" http://api.example.com/
    answer = await service.check(headers={"cookie": f"theme=dark; ASPXAUTH={token}"})
    assert answer.allowed
    assert answer.headers["x-user-id"] == "cookie-user"
    answer = await service.check(headers={"cookie": "theme=dark"})
    assert answer.http_status == 401
    assert answer.response.status.message == "missing_token"


async def test_jwt_and_opaque_side_by_side(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [jwks_introspector(idp), opaque_introspector(idp)]})
    answer = await service.check(token=idp.mint({"sub": "jwt-user"}))
    assert answer.allowed
    assert answer.metadata["introspector"] == "idp"
    answer = await service.check(token=idp.issue_opaque({"sub": "opaque-user"}))
    assert answer.allowed
    assert answer.metadata["introspector"] == "opaque"
    assert idp.hits["introspect"] == 1
    # A JWT no jwt introspector claims is never posted to the opaque introspector (it takes no JWTs).
    foreign = (await new_idp(issuer="https://elsewhere.example")).mint()
    answer = await service.check(token=foreign)
    assert (answer.http_status, answer.response.status.message) == (401, "unknown_issuer")
    assert idp.hits["introspect"] == 1
    # A JWT our jwt introspector claims but that fails verification is never sent anywhere.
    answer = await service.check(token=idp.mint({"exp": int(time.time()) - 3600}))
    assert answer.response.status.message == "expired"
    assert idp.hits["introspect"] == 1


async def test_a_jwt_of_an_unknown_issuer_never_reaches_the_introspection_endpoint(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    # An opaque introspector alone, as a deployment of reference tokens has it: a JWT (here one
    # the IdP itself would find active) is a 401 decided without a network call.
    service = await start_service({"introspectors": [opaque_introspector(idp)]})
    foreign = await new_idp(issuer="https://elsewhere.example")
    cases = {
        "another issuer": (foreign.mint(), "unknown_issuer"),
        "the IdP's own JWT": (idp.issue_opaque(token=idp.mint()), "unknown_issuer"),
        "no iss": (foreign.mint({"iss": None}), "unknown_issuer"),
        "JWT-shaped garbage": ("eyJub3QganNvbg.x.y", "malformed"),
    }
    for name, (token, reason) in cases.items():
        answer = await service.check(token=token)
        assert (answer.http_status, answer.response.status.message) == (401, reason), name
    assert idp.hits["introspect"] == 0
    assert (await service.check(token=idp.issue_opaque())).allowed  # opaque tokens still go there
    assert idp.hits["introspect"] == 1


async def test_accepts_jwt_lets_an_introspector_take_jwts_no_issuer_claims(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    takes_jwts = opaque_introspector(idp, id="takes-jwts", accepts_jwt=True)
    service = await start_service({"introspectors": [opaque_introspector(idp, id="plain"), takes_jwts]})
    token = idp.issue_opaque({"sub": "jwt-by-introspection"}, token=idp.mint())  # the IdP vouches for it
    answer = await service.check(token=token)
    assert answer.allowed, answer.response.status.message
    assert answer.metadata == {"user_id": "jwt-by-introspection", "introspector": "takes-jwts"}
    assert idp.hits["introspect"] == 1  # only the introspector that accepts JWTs was asked


@pytest.mark.parametrize(("mode", "status"), [("invalid_token", 401), ("unsupported_token_type", 401)])
async def test_a_400_about_the_token_is_a_401(
    idp: HostileIdentityProvider, start_service: StartService, mode: str, status: int
) -> None:
    service = await start_service({"introspectors": [opaque_introspector(idp)]})
    token = idp.issue_opaque()
    idp.introspect_mode = mode
    for _ in range(2):
        answer = await service.check(token=token)
        assert (answer.code, answer.http_status, answer.response.status.message) == (16, status, "inactive")
    assert idp.hits["introspect"] == 1  # remembered like `active: false` (at most 10 s)
    assert service.service.client.calls[("introspection", "invalid_token")] == 1


async def test_a_400_about_the_request_stays_a_503_and_is_not_cached(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    service = await start_service({"introspectors": [opaque_introspector(idp)]})
    token = idp.issue_opaque()
    idp.introspect_mode = "invalid_request"
    for expected in (1, 2):
        assert (await service.check(token=token)).http_status == 503
        assert idp.hits["introspect"] == expected
    assert service.service.client.calls[("introspection", "http_400")] == 2


async def test_aud_of_an_opaque_introspector(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service({"introspectors": [opaque_introspector(idp, aud=["fhir-api", "other-api"])]})
    accepted: list[Any] = ["fhir-api", ["x", "other-api"]]
    for aud in accepted:
        assert (await service.check(token=idp.issue_opaque({"aud": aud}))).allowed, aud
    refused: list[Any] = ["someone-else", ["x", "y"], None]
    for aud in refused:
        answer = await service.check(token=idp.issue_opaque({"aud": aud}))
        assert (answer.http_status, answer.response.status.message) == (401, "bad_audience"), aud


async def test_a_sender_constrained_opaque_token_is_refused_as_a_bearer(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    service = await start_service({"introspectors": [opaque_introspector(idp)]})
    for cnf, reason, scheme in (
        ({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}, "dpop_required", "DPoP "),
        ({"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}, "no_client_certificate", "Bearer "),
    ):
        answer = await service.check(token=idp.issue_opaque({"cnf": cnf}))
        assert (answer.http_status, answer.response.status.message) == (401, reason)
        assert answer.headers["www-authenticate"].startswith(scheme)
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]


async def test_opaque_introspectors_in_config_order(idp: HostileIdentityProvider, start_service: StartService) -> None:
    async with await new_idp() as second:
        service = await start_service(
            {
                "introspectors": [
                    opaque_introspector(idp, id="first"),
                    opaque_introspector(second, id="second"),
                ]
            }
        )
        answer = await service.check(token=second.issue_opaque({"sub": "from-second"}))
        assert answer.allowed
        assert answer.metadata["introspector"] == "second"
        assert idp.hits["introspect"] == 1
        assert second.hits["introspect"] == 1
        await idp.go_offline()
        # The first cannot answer and the second says inactive: we cannot know, so 503.
        assert (await service.check(token="unknown-token")).http_status == 503


@pytest.mark.slow  # 300 introspections, ~2 s in debug mode
async def test_unique_token_flood_keeps_cache_bounded(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    service = await start_service({"cache": {"max_entries": 50}, "introspectors": [opaque_introspector(idp)]})
    tokens = [idp.issue_opaque() for _ in range(300)]
    for token in tokens:
        assert (await service.check(token=token)).allowed
    # Each token is held once, in the verified-token cache, bounded by max_entries; the memory
    # token cache keeps only negative answers.
    assert len(service.service.engine.verified) == 50
    introspector = service.service.engine.introspectors["opaque"]
    assert isinstance(introspector, CachedIntrospector)
    memory = introspector.cache.backend
    assert isinstance(memory, BoundedMemoryCache)
    assert len(memory) == 0
    revoked = tokens[-1]
    idp.revoke(revoked)
    assert (await service.check(token=revoked)).allowed  # still verified: revocation latency is cache_ttl
    assert (await service.check(token=idp.issue_opaque() + "x")).http_status == 401
    assert len(memory) == 1  # the negative answer


# --------------------------------------------------------------------------- issue 16, item 5
# (formerly tests/integration/test_token_hardening.py)


def reason(answer: Answer) -> str:
    return str(answer.response.status.message)


@pytest.mark.parametrize("content_type", ["text/plain", "application/jsonp", "text/html"])
async def test_an_introspection_answer_not_labelled_json_is_a_503_and_not_cached(
    idp: HostileIdentityProvider, start_service: StartService, content_type: str
) -> None:
    service = await start_service({"introspectors": [opaque_introspector(idp)]})
    token = idp.issue_opaque({"sub": "opaque-user"})
    idp.introspect_content_type = content_type
    for _ in range(2):
        answer = await service.check(token=token)
        assert (answer.code, answer.http_status, reason(answer)) == (14, 503, "idp_unavailable")
    assert idp.hits["introspect"] == 2  # never cached
    upstream = service.service.client.calls
    assert upstream[("introspection", "bad_content_type")] == 2
    idp.introspect_content_type = "application/json"
    assert (await service.check(token=token)).allowed
    assert (await service.check(token=token)).allowed
    assert idp.hits["introspect"] == 3  # the good answer is cached
