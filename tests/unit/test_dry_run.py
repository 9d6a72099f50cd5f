"""Dry-run AccessPolicies (`mode: dry-run`): asked after the enforcing ones, never deciding.

The config field, the Authorizer's split, the answers on the Decision, the decision line's
`dry_run` and `authz_policy_dry_run_total`, both ways of counting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from authz_service.config.model import PolicyConfig
from authz_service.decisionlog import decision_fields
from authz_service.engine import build_engine
from authz_service.errors import ConfigError, PolicyTimeout
from authz_service.metrics import Metrics
from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.policy.explain import Redactor, explain_policies
from authz_service.policytest import FileCase, PolicyTestError, describe, parse_policy_test, run_policy_test
from authz_service.registries import parse_config
from authz_service.tokens.cache import CacheFactory
from authz_service.upstream import UpstreamClient
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
    # The answers are set on each check's own Decision: the first one's are still its own.
    assert decision.dry_run == (("docs", "allow"),)
    assert allowed is not decision


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


# --------------------------------------------------------------------------- test-policy and explain

EXPLAIN_CONFIG = f"""
introspectors:
  - id: idp
    type: jwt
    jwt: {{iss: "https://idp.example.com", secret: {SECRET}}}
policies:
  - {{id: public, engine: matcho, matcho: {{uri: '#^/public/'}}}}
  - {{id: reports, mode: dry-run, engine: matcho, matcho: {{uri: '#^/reports/', jwt: {{sub: present?}}}}}}
"""


def run_case(body: Mapping[str, Any], config_text: str = EXPLAIN_CONFIG) -> tuple[Any, dict[str, Any]]:
    config = parse_config(config_text, {})
    engine = build_engine(config, UpstreamClient(), CacheFactory(config.cache))
    test = parse_policy_test(body, config)
    return test, asyncio.run(run_policy_test(engine.authorizer, config, test))


def test_test_policy_marks_dry_run_policies_and_reports_what_they_would_do() -> None:
    body = {"request": {"path": "/reports/1"}, "identity": {"introspector": "idp", "claims": {"sub": "alice"}}}
    test, answer = run_case(body)
    assert (answer["decision"], answer["policy"]) == ("forbidden", None)
    assert answer["dry_run"] == [{"policy": "reports", "would": "allow"}]
    assert answer["policies"] == [
        {"id": "public", "matched": False, "why": [answer["policies"][0]["why"][0]]},
        {"id": "reports", "matched": True, "why": [], "mode": "dry-run"},
    ]
    text = describe(FileCase("reports", body, "forbidden"), test, answer, verbose=True).splitlines()
    assert text[0] == "reports: GET /reports/1 -> forbidden (forbidden); dry-run 'reports' would allow  ok"
    assert "  policy reports (dry-run): would allow" in text
    assert "  policy public: not matched" in text


def test_test_policy_without_dry_run_policies_answers_as_before() -> None:
    body = {"request": {"path": "/public/x"}}
    _, answer = run_case(body, EXPLAIN_CONFIG.replace("mode: dry-run, ", ""))
    assert "dry_run" not in answer
    assert all("mode" not in policy for policy in answer["policies"])


def test_tried_policies_may_be_dry_run_and_a_bad_mode_is_422() -> None:
    tried = [{"id": "try", "mode": "dry-run", "engine": "allow"}]
    _, answer = run_case({"request": {"path": "/x"}, "policies": tried})
    # Only a dry-run policy tried: nothing enforces, so nothing is allowed (a missing token: 401).
    assert (answer["decision"], answer["dry_run"]) == ("unauthenticated", [{"policy": "try", "would": "allow"}])
    with pytest.raises(PolicyTestError) as caught:
        run_case({"request": {"path": "/x"}, "policies": [{"id": "try", "mode": "on", "engine": "allow"}]})
    assert caught.value.status == 422
    assert "policy 'try': mode must be one of enforce, dry-run, got 'on'" in caught.value.problems


def test_a_dry_run_policy_past_its_regex_budget_is_explained_as_would_deny() -> None:
    def stalls(context: Mapping[str, Any]) -> bool:
        raise PolicyTimeout("slow", "matcho.uri")

    slow = PolicyConfig("slow", "matcho", {"uri": "x"}, stalls, mode="dry-run")
    redactor = Redactor((), (), {})
    [explained] = explain_policies([slow], {"uri": "/"}, None, redactor)
    assert (explained.matched, explained.dry_run) == (False, True)
    assert explained.why[0].endswith("counts as would deny")
    assert explained.as_json()["mode"] == "dry-run"


def test_explain_json_is_still_a_list_and_marks_dry_run(tmp_path: Path) -> None:
    config, cases = tmp_path / "config.yaml", tmp_path / "cases.yaml"
    config.write_text(EXPLAIN_CONFIG)
    cases.write_text(
        "request: {path: /reports/1}\nidentity: {introspector: idp, claims: {sub: alice}}\nexpect: forbidden\n"
    )
    command = [sys.executable, "-m", "authz_service", "explain", "-c", str(config), "-r", str(cases)]
    result = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    [answer] = json.loads(result.stdout)
    assert answer["dry_run"] == [{"policy": "reports", "would": "allow"}]
    assert by_id(answer["policies"])["reports"]["mode"] == "dry-run"
    text = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert text.stdout.strip() == "case 1: GET /reports/1 -> forbidden (forbidden); dry-run 'reports' would allow  ok"


def by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in items}


def test_the_rollout_body_in_the_docs_is_a_valid_dry_run_policy() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "policies.md").read_text(encoding="utf-8")
    rollout = docs[docs.index("### The rollout") :]
    body = rollout[rollout.index("--data-binary '") + len("--data-binary '") :]
    resource = yaml.safe_load(body[: body.index("'\n")])
    config = parse_config(config_text({"id": "practitioners-read", **resource}), {})
    [policy] = config.policies
    assert policy.dry_run
    assert "mode: enforce" in rollout  # and the way back to enforcing


AUTH_ONLY = "authentication_only: true\n"


def test_authentication_only_goes_with_dry_run_policies_only() -> None:
    config = parse_config(AUTH_ONLY + config_text(matcho("watched", mode="dry-run")), {})
    assert config.authentication_only
    assert not config.warnings
    with pytest.raises(ConfigError) as caught:
        parse_config(AUTH_ONLY + config_text(matcho("watched", mode="dry-run"), matcho("enforced")), {})
    [problem] = [str(p) for p in caught.value.problems]
    assert "authentication_only" in problem
    assert "mode: dry-run" in problem


def test_only_dry_run_policies_without_authentication_only_warn_that_nothing_is_allowed() -> None:
    config = parse_config(config_text(matcho("watched", mode="dry-run")), {})
    assert any("every policy is mode: dry-run" in warning for warning in config.warnings), config.warnings
    enforced = parse_config(config_text(matcho("watched", mode="dry-run"), matcho("enforced")), {})
    assert not any("dry-run" in warning for warning in enforced.warnings)


def test_plain_counts_expose_the_dry_run_family_as_prometheus_client_would() -> None:
    plain, files = Metrics(CollectorRegistry(), in_files=False), Metrics(CollectorRegistry(), in_files=True)
    decisions = [
        Decision(Outcome.ALLOW, Reason.ALLOWED, policy="e", dry_run=(("a", "deny"), ("b", "allow"))),
        Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, dry_run=(("a", "allow"), ("b", "allow"), ("gone", "allow"))),
    ]
    for metrics in (plain, files):
        metrics.set_policies(["e", "a", "b"], dry_run=["a", "b"])
        for decision in decisions * 3:
            metrics.observe(decision, 0.001)

    def family(metrics: Metrics) -> list[str]:
        text = generate_latest(metrics.registry).decode()
        return [line for line in text.splitlines() if "authz_policy_dry_run" in line]

    assert family(plain) == family(files)
    assert 'authz_policy_dry_run_total{policy="b",would="allow"} 6.0' in family(plain)
