"""Dry-run AccessPolicies (`mode: dry-run`): asked after the enforcing ones, never deciding.

The config field, the Authorizer's split, the answers on the Decision, the decision line's
`dry_run` and `authz_policy_dry_run_total`, both ways of counting.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from authz_service.config.model import PolicyConfig
from authz_service.decisionlog import decision_fields
from authz_service.errors import ConfigError, PolicyTimeout
from authz_service.metrics import Metrics
from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.registries import parse_config
from tests.unit.test_decide import TOKEN, Seen, Setup, is_admin, public_path, vouched

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def watched(ident: str, predicate: Any, introspectors: set[str] | None = None) -> PolicyConfig:
    scope = frozenset(introspectors) if introspectors is not None else None
    return PolicyConfig(ident, "test", None, predicate, scope, mode="dry-run")


def enforcing(ident: str, predicate: Any) -> PolicyConfig:
    return PolicyConfig(ident, "test", None, predicate)


def config_text(*policies: dict[str, Any]) -> str:
    raw = {
        "introspectors": [{"id": "idp", "type": "jwt", "jwt": {"iss": "https://idp.example.com", "secret": SECRET}}],
        "policies": list(policies),
    }
    return yaml.safe_dump(raw, sort_keys=False)


def matcho(ident: str, **extra: Any) -> dict[str, Any]:
    return {"id": ident, "engine": "matcho", "matcho": {"uri": "/public"}, **extra}


# --------------------------------------------------------------------------- config


def test_mode_defaults_to_enforce_and_dry_run_is_read() -> None:
    config = parse_config(config_text(matcho("old"), matcho("new", mode="dry-run"), matcho("x", mode="enforce")), {})
    assert [(p.id, p.mode, p.dry_run) for p in config.policies] == [
        ("old", "enforce", False),
        ("new", "dry-run", True),
        ("x", "enforce", False),
    ]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("dryrun", "policy 'new': mode must be one of enforce, dry-run, got 'dryrun'"),
        ("Dry-Run", "policy 'new': mode must be one of enforce, dry-run, got 'Dry-Run'"),
        (True, "policy 'new': mode"),  # a YAML boolean: one problem (its type), naming the field
    ],
)
def test_a_bad_mode_names_the_policy_and_the_field(mode: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_text(matcho("new", mode=mode)), {})
    problems = [str(problem) for problem in caught.value.problems]
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected)


# --------------------------------------------------------------------------- deciding


def test_the_split_is_made_once_and_absent_without_dry_run_policies() -> None:
    assert Setup(enforcing("a", public_path)).authorizer._dry_run is None
    s = Setup(watched("w", public_path), enforcing("a", public_path))
    # Every policy is still listed (test-policy and explain report them all), in config order.
    assert [p.id for p in s.authorizer.policies] == ["w", "a"]
    assert [p.id for p in s.authorizer._policies] == ["a"]


async def test_no_dry_run_policies_no_answers() -> None:
    s = Setup(enforcing("admins", is_admin))
    vouched(s, {"sub": "user-1", "roles": ["admin"]})
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.dry_run) == (Outcome.ALLOW, ())


async def test_an_allow_stays_an_allow_when_the_dry_run_policy_would_deny() -> None:
    s = Setup(enforcing("admins", is_admin), watched("nobody", Seen(False)))
    identity = vouched(s, {"sub": "user-1", "roles": ["admin"]})
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason, decision.policy) == (Outcome.ALLOW, Reason.ALLOWED, "admins")
    assert decision.headers == identity.headers
    assert decision.dry_run == (("nobody", "deny"),)


async def test_a_deny_stays_a_deny_when_the_dry_run_policy_would_allow() -> None:
    s = Setup(enforcing("admins", is_admin), watched("everyone", Seen(True)))
    vouched(s, {"sub": "user-1", "roles": ["reader"]})
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason, decision.policy) == (Outcome.FORBIDDEN, Reason.FORBIDDEN, None)
    assert decision.headers == ()
    assert decision.dry_run == (("everyone", "allow"),)


async def test_dry_run_policies_are_asked_after_the_enforcing_ones_on_the_same_context() -> None:
    order: list[str] = []

    def recording(name: str, answer: bool, seen: list[Mapping[str, Any]]) -> Any:
        def predicate(context: Mapping[str, Any]) -> bool:
            order.append(name)
            seen.append(context)
            return answer

        return predicate

    contexts: list[Mapping[str, Any]] = []
    s = Setup(
        watched("w1", recording("w1", True, contexts)),
        enforcing("e1", recording("e1", False, contexts)),
        watched("w2", recording("w2", False, contexts)),
        enforcing("e2", recording("e2", True, contexts)),
    )
    vouched(s)
    decision = await s.check(token=TOKEN)
    # Enforcing first (e2 allows: the OR stops there), then every dry-run policy, in config order.
    assert order == ["e1", "e2", "w1", "w2"]
    assert all(context is contexts[0] for context in contexts)  # built once per check
    assert (decision.policy, decision.dry_run) == ("e2", (("w1", "allow"), ("w2", "deny")))


async def test_a_dry_run_policy_is_scoped_like_any_policy() -> None:
    s = Setup(enforcing("e", Seen(True)), watched("ext-only", Seen(True), introspectors={"ext"}))
    vouched(s)  # verified by `idp`
    assert (await s.check(token=TOKEN)).dry_run == (("ext-only", "deny"),)


async def test_anonymous_checks_reach_dry_run_policies() -> None:
    s = Setup(enforcing("public", public_path), watched("docs", lambda c: c["uri"].startswith("/docs")))
    decision = await s.check("/docs/index.html")
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN)
    assert decision.dry_run == (("docs", "allow"),)
    allowed = await s.check("/public/logo.png")
    assert (allowed.outcome, allowed.reason, allowed.dry_run) == (Outcome.ALLOW, Reason.ANONYMOUS, (("docs", "deny"),))


async def test_only_dry_run_policies_decide_as_no_policies() -> None:
    # Without authentication-only mode, no enforcing policy means nothing is allowed (as in Aidbox).
    s = Setup(watched("everyone", Seen(True)))
    vouched(s)
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason) == (Outcome.FORBIDDEN, Reason.NO_POLICIES)
    assert decision.dry_run == (("everyone", "allow"),)
    anonymous = await s.check("/x")
    assert (anonymous.outcome, anonymous.dry_run) == (Outcome.UNAUTHENTICATED, (("everyone", "allow"),))


async def test_only_dry_run_policies_in_authentication_only_mode_allow_every_valid_token() -> None:
    s = Setup(watched("admins", is_admin), authentication_only=True)
    identity = vouched(s, {"sub": "user-1", "roles": ["reader"]})
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason, decision.policy) == (Outcome.ALLOW, Reason.ALLOWED, None)
    assert decision.headers == identity.headers
    assert decision.dry_run == (("admins", "deny"),)


async def test_only_dry_run_policies_do_not_refuse_unrouted_paths() -> None:
    # `not_a_route` (400) is for requests enforcing policies would judge: none here.
    s = Setup(watched("w", Seen(False)), authentication_only=True)
    vouched(s)
    decision = await s.check("/fhir/Patient/a;b", token=TOKEN)
    assert decision.outcome is Outcome.ALLOW
    enforced = Setup(enforcing("e", Seen(True)), watched("w", Seen(False)))
    vouched(enforced)
    refused = await enforced.check("/fhir/Patient/a;b", token=TOKEN)
    assert (refused.outcome, refused.reason, refused.dry_run) == (Outcome.INVALID_REQUEST, Reason.NOT_A_ROUTE, ())


@pytest.mark.parametrize("error", [PolicyTimeout("w", "matcho.uri"), KeyError("jwt"), RecursionError()])
async def test_a_failing_dry_run_policy_counts_as_would_deny_and_never_changes_the_answer(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(context: Mapping[str, Any]) -> bool:
        raise error

    s = Setup(enforcing("e", Seen(True)), watched("broken", broken), watched("fine", Seen(True)))
    vouched(s)
    with caplog.at_level(logging.WARNING):
        decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.policy) == (Outcome.ALLOW, "e")  # never a 503, never a 403
    assert decision.dry_run == (("broken", "deny"), ("fine", "allow"))
    [record] = [r for r in caplog.records if "dry-run" in r.getMessage()]
    assert record.fields["policy"] == "broken"  # type: ignore[attr-defined]
    assert TOKEN not in caplog.text


async def test_a_failing_enforcing_policy_still_ends_the_check() -> None:
    def broken(context: Mapping[str, Any]) -> bool:
        raise PolicyTimeout("e", "matcho.uri")

    s = Setup(enforcing("e", broken), watched("w", Seen(True)))
    vouched(s)
    decision = await s.check(token=TOKEN)
    assert (decision.outcome, decision.reason, decision.dry_run) == (Outcome.FORBIDDEN, Reason.POLICY_TIMEOUT, ())


async def test_an_invalid_token_never_reaches_dry_run_policies() -> None:
    seen = Seen(True)
    s = Setup(enforcing("e", Seen(True)), watched("w", seen))
    decision = await s.check(token="not-vouched-for")
    assert decision.outcome is Outcome.UNAUTHENTICATED
    assert (decision.dry_run, seen.contexts) == ((), [])


def test_decide_for_a_given_identity_reports_dry_run_too() -> None:
    s = Setup(enforcing("admins", is_admin), watched("everyone", Seen(True)))
    identity = vouched(s, {"sub": "user-1", "roles": []})
    decision = s.authorizer.decide(HttpRequest(path="/x"), identity)
    assert (decision.outcome, decision.dry_run) == (Outcome.FORBIDDEN, (("everyone", "allow"),))


def test_trying_policies_splits_them_too() -> None:
    s = Setup(enforcing("e", Seen(True)))
    trial = s.authorizer.with_policies([watched("w", Seen(True))])
    assert trial._policies == ()
    assert [p.id for p in trial.policies] == ["w"]


# --------------------------------------------------------------------------- the decision line


def test_the_decision_line_carries_dry_run_only_when_asked() -> None:
    request = HttpRequest(path="/x", request_id="r")
    plain = decision_fields(request, Decision(Outcome.ALLOW, Reason.ANONYMOUS, policy="p"), 0.001, "grpc")
    assert "dry_run" not in plain
    assert list(plain)[-1] == "policy"  # a line without dry-run policies is unchanged
    watched_fields = decision_fields(
        request,
        Decision(Outcome.ALLOW, Reason.ANONYMOUS, policy="p", dry_run=(("a", "allow"), ("b", "deny"))),
        0.001,
        "grpc",
    )
    assert list(watched_fields)[-1] == "dry_run"  # an optional field, last
    assert json.loads(json.dumps(watched_fields))["dry_run"] == [
        {"policy": "a", "would": "allow"},
        {"policy": "b", "would": "deny"},
    ]


# --------------------------------------------------------------------------- the metric

BOTH_WAYS = pytest.mark.parametrize("in_files", [False, True], ids=["plain", "prometheus-client"])


@BOTH_WAYS
def test_dry_run_answers_are_counted_for_configured_dry_run_policies_only(in_files: bool) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, in_files=in_files)
    metrics.set_policies(["enforced", "new"], dry_run=["new"])

    def count(policy: str, would: str) -> float | None:
        return registry.get_sample_value("authz_policy_dry_run_total", {"policy": policy, "would": would})

    assert (count("new", "allow"), count("new", "deny")) == (0, 0)  # both series exist from the start
    assert count("enforced", "allow") is None
    for answer in ("allow", "allow", "deny"):
        metrics.observe(Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, dry_run=(("new", answer),)), 0.001)
    metrics.observe(Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, dry_run=(("unknown", "allow"),)), 0.001)
    assert (count("new", "allow"), count("new", "deny")) == (2, 1)
    assert count("unknown", "allow") is None  # ids come from the config, never from a decision
    # Reloaded as enforce: its dry-run series go; another dry-run policy starts at 0.
    metrics.set_policies(["enforced", "new", "newer"], dry_run=["newer"])
    metrics.observe(Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, dry_run=(("new", "allow"),)), 0.001)
    assert (count("new", "allow"), count("newer", "deny")) == (None, 0)
