"""decide: the Check path as a pure function of the request, the identity source and the policies.

Denials are values (Check never raises); an invalid token is never downgraded to anonymous; an
IdP outage is 503 even where anonymous access would be allowed; any unexpected error denies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from authz_service.config.model import PolicyConfig
from authz_service.decide import Authorizer
from authz_service.model import Confirmation, Decision, HttpRequest, Identity, Outcome, Reason
from authz_service.registries import validate_config
from authz_service.tokens.jws import MAX_TOKEN_BYTES
from authz_service.tokens.router import IntrospectorRouter
from authz_service.tokens.sources import CredentialFinder
from tests.unit.fakes import FakeIntrospector

TOKEN = "2YotnFZFEjr1zCsicMWpAA"


def policy(
    ident: str, predicate: Callable[[Mapping[str, Any]], bool], introspectors: set[str] | None = None
) -> PolicyConfig:
    return PolicyConfig(ident, "test", None, predicate, frozenset(introspectors) if introspectors is not None else None)


class Seen:
    """A policy predicate that records the contexts it was shown."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.contexts: list[Mapping[str, Any]] = []

    def __call__(self, context: Mapping[str, Any]) -> bool:
        self.contexts.append(context)
        return self.answer


def public_path(context: Mapping[str, Any]) -> bool:
    return bool(context["uri"].startswith("/public"))


def is_admin(context: Mapping[str, Any]) -> bool:
    return "admin" in context.get("jwt", context.get("token", {})).get("roles", [])


class Setup:
    def __init__(
        self,
        *policies: PolicyConfig,
        users: Mapping[str, Mapping[str, Any]] | None = None,
        finder: CredentialFinder | None = None,
        authentication_only: bool = False,
    ) -> None:
        self.idp = FakeIntrospector("idp")
        self.ext = FakeIntrospector("ext")
        self.authorizer = Authorizer(
            finder or CredentialFinder(),
            IntrospectorRouter([self.idp, self.ext]),
            policies,
            users,
            authentication_only=authentication_only,
        )

    async def check(self, path: str = "/", token: str | None = None, **headers: str) -> Decision:
        all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        return await self.authorizer.check(
            HttpRequest(method="GET", path=path, host="api.example.com", headers=all_headers)
        )


def vouched(s: Setup, claims: Mapping[str, Any] | None = None, user_id: str = "user-1", kind: str = "jwt") -> Identity:
    identity = s.idp.vouch(TOKEN, user_id, claims or {"sub": user_id}, kind=kind)
    return identity


# --------------------------------------------------------------------------- no token


async def test_no_token_and_no_policies_is_401() -> None:
    # curl http://api.example.com/
    decision = await Setup().check()
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN)


async def test_no_token_and_a_policy_allowing_anonymous_access() -> None:
    # curl http://api.example.com/public/logo.png
    decision = await Setup(policy("public", public_path)).check("/public/logo.png")
    assert (decision.outcome, decision.reason) == (Outcome.ALLOW, Reason.ANONYMOUS)
    assert decision.identity is None
    assert decision.headers == ()


async def test_no_token_and_no_policy_allowing_it_is_401_not_403() -> None:
    decision = await Setup(policy("public", public_path)).check("/private")
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN)


async def test_anonymous_context_has_no_identity() -> None:
    seen = Seen(False)
    await Setup(policy("p", seen)).check("/x?a=1", x_trace="t")
    [context] = seen.contexts
    assert not {"jwt", "token", "user", "introspector"} & set(context)
    assert context["uri"] == "/x"
    assert context["params"] == {"a": "1"}


async def test_a_policy_bound_to_an_introspector_never_allows_anonymous() -> None:
    always = policy("idp-only", lambda context: True, introspectors={"idp"})
    decision = await Setup(always).check("/public")
    assert decision.outcome is Outcome.UNAUTHENTICATED


# --------------------------------------------------------------------------- with a token


async def test_valid_token_in_authentication_only_mode_is_allowed_with_its_headers() -> None:
    # curl -H "Authorization: Bearer $TOKEN" http://api.example.com/
    s = Setup(authentication_only=True)
    identity = s.idp.vouch(TOKEN, "user-1", kind="jwt")
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason) == (Outcome.ALLOW, Reason.ALLOWED)
    assert decision.identity == identity
    assert decision.headers == identity.headers


async def test_no_policies_without_the_declared_mode_allows_nothing() -> None:
    # An empty policy set (a half-written file, the last API policy deleted) never means "allow all".
    s = Setup()
    identity = s.idp.vouch(TOKEN, "user-1", kind="jwt")
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason) == (Outcome.FORBIDDEN, Reason.NO_POLICIES)
    assert decision.identity == identity
    assert decision.headers == ()
    assert (await s.check()).outcome is Outcome.UNAUTHENTICATED


async def test_valid_token_no_policy_matching_is_403() -> None:
    s = Setup(policy("admins", is_admin))
    vouched(s, {"sub": "user-1", "roles": ["reader"]})
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason) == (Outcome.FORBIDDEN, Reason.FORBIDDEN)
    assert decision.identity is not None
    assert decision.headers == ()


async def test_policies_are_ored() -> None:
    s = Setup(policy("nobody", lambda context: False), policy("admins", is_admin))
    vouched(s, {"sub": "user-1", "roles": ["admin"]})
    assert (await s.check(token=TOKEN)).outcome is Outcome.ALLOW


async def test_jwt_claims_are_the_jwt_in_the_context() -> None:
    seen = Seen(True)
    s = Setup(policy("p", seen))
    vouched(s, {"sub": "user-1", "roles": ["admin"]})
    await s.check(token=TOKEN)
    [context] = seen.contexts
    assert context["jwt"] == {"sub": "user-1", "roles": ["admin"]}
    assert context["introspector"] == "idp"
    assert "token" not in context


async def test_opaque_results_are_the_token_in_the_context() -> None:
    seen = Seen(True)
    s = Setup(policy("p", seen))
    vouched(s, {"active": True, "sub": "user-1"}, kind="opaque")
    await s.check(token=TOKEN)
    [context] = seen.contexts
    assert context["token"] == {"active": True, "sub": "user-1"}
    assert "jwt" not in context


async def test_the_users_resource_joins_the_context() -> None:
    seen = Seen(True)
    users = {"user-1": {"id": "user-1", "roles": [{"value": "doctor"}]}}
    s = Setup(policy("p", seen), users=users)
    vouched(s)
    await s.check(token=TOKEN)
    assert seen.contexts[0]["user"] == users["user-1"]


async def test_an_unknown_user_has_no_user_in_the_context() -> None:
    seen = Seen(True)
    s = Setup(policy("p", seen), users={"someone-else": {"id": "someone-else"}})
    vouched(s)
    await s.check(token=TOKEN)
    assert "user" not in seen.contexts[0]


async def test_a_policy_bound_to_another_introspector_does_not_apply() -> None:
    s = Setup(policy("ext-only", lambda context: True, introspectors={"ext"}))
    vouched(s)
    assert (await s.check(token=TOKEN)).outcome is Outcome.FORBIDDEN


# --------------------------------------------------------------------------- denials


@pytest.mark.parametrize("reason", [Reason.BAD_SIGNATURE, Reason.EXPIRED, Reason.INACTIVE])
async def test_an_invalid_token_is_401_with_its_reason(reason: Reason) -> None:
    s = Setup()
    s.idp.reject(TOKEN, reason)
    s.ext.reject(TOKEN, reason)
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, reason)


async def test_an_invalid_token_is_never_downgraded_to_anonymous() -> None:
    # The public path would let an anonymous request through; a bad token must not.
    s = Setup(policy("public", public_path))
    s.idp.reject(TOKEN, Reason.EXPIRED)
    s.ext.reject(TOKEN, Reason.EXPIRED)
    decision = await s.check("/public/logo.png", token=TOKEN)
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, Reason.EXPIRED)


async def test_a_token_over_8_kib_is_401_and_no_introspector_sees_it() -> None:
    s = Setup()
    decision = await s.check(token="a" * (MAX_TOKEN_BYTES + 1))
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, Reason.TOO_LARGE)
    assert s.idp.calls == []
    assert s.ext.calls == []


async def test_two_authorization_values_are_400() -> None:
    # curl -H "Authorization: Bearer a" -H "Authorization: Bearer b" ...
    s = Setup(policy("public", public_path))
    decision = await s.check("/public", authorization="Bearer a,Bearer b")
    assert (decision.outcome, decision.reason) == (Outcome.INVALID_REQUEST, Reason.MULTIPLE_CREDENTIALS)
    assert s.idp.calls == []


async def test_idp_unavailable_is_503_never_anonymous() -> None:
    s = Setup(policy("public", public_path))
    s.idp.fail(TOKEN)
    s.ext.reject(TOKEN)
    decision = await s.check("/public", token=TOKEN)
    assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, Reason.IDP_UNAVAILABLE)


async def test_an_unexpected_error_denies_and_logs_no_token(caplog: pytest.LogCaptureFixture) -> None:
    s = Setup()
    s.idp.explode(TOKEN, RuntimeError(f"boom while reading {TOKEN}"))
    with caplog.at_level(logging.ERROR):
        decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)
    assert "RuntimeError" in caplog.text
    assert TOKEN not in caplog.text


async def test_a_failing_policy_denies() -> None:
    def broken(context: Mapping[str, Any]) -> bool:
        raise KeyError("jwt")

    s = Setup(policy("broken", broken))
    vouched(s)
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR)


async def test_a_bound_credential_goes_to_its_introspector() -> None:
    # curl -b "sid=$TOKEN" ...  (the `ext` introspector reads the sid cookie)
    resource = {"id": "ext", "type": "opaque", "introspection_endpoint": {"url": "https://x"}, "cookie": "sid"}
    finder = CredentialFinder(validate_config({"introspectors": [resource]}, None).introspectors)
    s = Setup(finder=finder)
    s.ext.vouch(TOKEN, "cookie-user")
    s.idp.vouch(TOKEN, "never")
    decision = await s.check(cookie=f"sid={TOKEN}")
    assert decision.identity is not None
    assert decision.identity.user_id == "cookie-user"
    assert s.idp.calls == []


# --------------------------------------------------------------------------- who judged (the decision log)


async def test_a_policy_deny_names_the_introspector_that_verified_the_token() -> None:
    s = Setup(policy("admins", is_admin))
    vouched(s)
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.introspector) == (Outcome.FORBIDDEN, "idp")
    no_policies = Setup()
    vouched(no_policies)
    decision = await no_policies.check(token=TOKEN)
    assert (decision.reason, decision.introspector) == (Reason.NO_POLICIES, "idp")


async def test_an_allow_names_its_introspector() -> None:
    s = Setup(policy("everyone", Seen(True)))
    vouched(s)
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.policy, decision.introspector) == (Outcome.ALLOW, "everyone", "idp")


def cookie_setup() -> Setup:
    # curl -b "sid=$TOKEN" ...  (the `ext` introspector reads the sid cookie, so it alone judges it)
    resource = {"id": "ext", "type": "opaque", "introspection_endpoint": {"url": "https://x"}, "cookie": "sid"}
    return Setup(
        policy("everyone", Seen(True)),
        finder=CredentialFinder(validate_config({"introspectors": [resource]}, None).introspectors),
    )


async def test_a_refused_bound_token_names_the_introspector_that_refused_it() -> None:
    s = cookie_setup()
    s.ext.reject(TOKEN, Reason.INACTIVE)
    decision = await s.check(cookie=f"sid={TOKEN}")
    assert (decision.outcome, decision.reason, decision.introspector) == (
        Outcome.UNAUTHENTICATED,
        Reason.INACTIVE,
        "ext",
    )
    assert decision.identity is None


async def test_an_unavailable_idp_behind_a_bound_source_is_named() -> None:
    s = cookie_setup()
    s.ext.fail(TOKEN)
    decision = await s.check(cookie=f"sid={TOKEN}")
    assert (decision.outcome, decision.introspector) == (Outcome.UNAVAILABLE, "ext")


async def test_an_anonymous_request_names_no_introspector() -> None:
    s = Setup(policy("public", public_path))
    assert (await s.check("/public")).introspector is None
    assert (await s.check("/private")).introspector is None


# --------------------------------------------------------------------------- sender-constrained tokens


async def test_a_bound_identity_without_a_proof_checker_is_refused() -> None:
    # Fail closed: an Authorizer built without SenderConstraints never lets a bound token through.
    s = Setup(authentication_only=True)
    s.idp.vouch(TOKEN, confirmation=Confirmation(jkt="0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"))
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason, decision.introspector) == (
        Outcome.UNAUTHENTICATED,
        Reason.DPOP_UNBOUND_TOKEN,
        "idp",
    )
    assert decision.identity is None  # an unproven identity is never reported as the caller
