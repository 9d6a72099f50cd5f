"""policytest.py: test-policy bodies, explain files, and the property that matters most: for the same
request, test-policy decides exactly what Check decides (Check's request arrives as Envoy's
CheckRequest and goes through the Envoy adapter; test-policy's as a body)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt as pyjwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_service.engine import Engine, build_engine
from authz_service.envoy import to_http_request
from authz_service.policytest import (
    FileCase,
    PolicyTestError,
    describe,
    failed_expectation,
    parse_policy_test,
    read_cases,
    run_policy_test,
)
from authz_service.registries import parse_config
from authz_service.tokens.cache import CacheFactory
from authz_service.upstream import UpstreamClient
from tests.harness import check_request

ISS = "https://idp.example.com"
SECRET = "policytest-hmac-secret-0123456789abcdef"
CONFIG = parse_config(
    f"""
introspectors:
  - id: app
    type: jwt
    jwt: {{iss: "{ISS}", secret: {SECRET}}}
    from_params: [access_token]
users:
  - {{id: alice, data: {{patient: pt-1}}}}
  - {{id: bob}}
roles:
  - {{id: r-alice, name: doctor, user: {{reference: User/alice}}}}
policies:
  - id: public
    engine: matcho
    matcho: {{uri: '#^/public/', request-method: get}}
  - id: own-patient
    engine: json-schema
    schema:
      required: [params]
      properties:
        params:
          required: [resource/id]
          properties:
            resource/type: {{const: Patient}}
            resource/id: {{constant: {{$data: '#/jwt/pid'}}}}
  - id: doctors-read
    roleName: doctor
    engine: complex
    and:
      - engine: matcho
        matcho: {{operation: {{id: {{$enum: [FhirRead, FhirSearch]}}}}}}
      - or:
          - {{engine: matcho, matcho: {{params: {{resource/type: Observation}}}}}}
          - {{engine: matcho, matcho: {{params: {{resource/type: Patient}}}}}}
  - id: app-client
    engine: allow
    link: [{{reference: Client/app-1}}]
  - id: admins
    engine: matcho
    matcho:
      jwt: {{roles: {{$contains: admin}}}}
      headers: {{x-admin: '#(?i)^yes$'}}
""",
    {},
)


def mint(claims: dict[str, Any]) -> str:
    return pyjwt.encode({"iss": ISS, "exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return build_engine(CONFIG, UpstreamClient(), CacheFactory(CONFIG.cache))


# ---------------------------------------------------------------------- the property

SEGMENTS = ["fhir", "Patient", "Observation", "pt-1", "pt-2", "_history", "1", "$everything", "public", "x"]
ROUTES = [
    "/fhir/Patient/pt-1",
    "/fhir/Patient/pt-2",
    "/fhir/Patient",
    "/fhir/Observation",
    "/Patient/pt-1",
    "/public/x",
]
paths = st.one_of(
    st.sampled_from(ROUTES),
    st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=5).map(lambda parts: "/" + "/".join(parts)),
)
queries = st.lists(
    st.tuples(st.sampled_from(["resource/type", "resource/id", "_id", "q", "access_token"]), st.sampled_from(SEGMENTS)),
    max_size=3,
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
claims = st.fixed_dictionaries(
    {"sub": st.sampled_from(["alice", "bob", "carol"])},
    optional={
        "pid": st.sampled_from(["pt-1", "pt-2"]),
        "client_id": st.sampled_from(["app-1", "app-2"]),
        "roles": st.lists(st.sampled_from(["admin", "reader"]), max_size=2),
        "box_user": st.sampled_from(["alice", "bob"]),
    },
)
credentials = st.one_of(
    st.none(),
    claims.map(lambda c: ("header", mint(c))),
    claims.map(lambda c: ("param", mint(c))),
    st.sampled_from([("header", "not-a-jwt"), ("header", mint({"sub": "x", "exp": 1})), ("header", "")]),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
    path=paths,
    query=queries,
    credential=credentials,
    admin_header=st.sampled_from([None, "yes", "YES", "no"]),
)
def test_test_policy_decides_what_check_decides(
    engine: Engine, method: str, path: str, query: str, credential: tuple[str, str] | None, admin_header: str | None
) -> None:
    headers: dict[str, str] = {"x-trace": "t"}
    if admin_header is not None:
        headers["x-admin"] = admin_header
    if credential is not None and credential[0] == "header":
        headers["authorization"] = f"Bearer {credential[1]}"
    elif credential is not None:
        query = f"{query}&access_token={credential[1]}" if query else f"access_token={credential[1]}"
    full = f"{path}?{query}" if query else path
    # What Envoy sends for `curl -X METHOD -H ... https://api.example.com/PATH`, through Check's adapter.
    checked = asyncio.run(engine.authorizer.check(to_http_request(check_request(full, method=method, headers=headers))))
    body = {
        "request": {
            "method": method,
            "path": full,
            "headers": headers,
            "host": "api.example.com",
            "remote-addr": "203.0.113.7",
        }
    }
    answer = asyncio.run(run_policy_test(engine.authorizer, CONFIG, parse_policy_test(body, CONFIG)))
    assert (answer["decision"], answer["reason"], answer["policy"]) == (
        checked.outcome.value,
        checked.reason.label,
        checked.policy,
    )
    # The explanation agrees: the allowing policy matched and none before it did; a denial matched none.
    matched = [p["id"] for p in answer["policies"] if p["matched"]]
    if checked.policy is not None:
        assert matched[0] == checked.policy
    else:
        assert matched == []
    for policy in answer["policies"]:
        assert policy["matched"] or policy["why"], policy


# ---------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    ("body", "status", "problem"),
    [
        ([], 400, "the body must be a mapping with a `request`"),
        ({"request": "GET /"}, 400, "request: must be a mapping such as {method: GET, path: /fhir/Patient}"),
        ({"request": {"path": "/"}, "extra": 1}, 422, "extra: unknown field (request, policies, identity)"),
        ({"request": {"path": "x"}}, 422, "request.path: is required and must start with /"),
        ({"request": {"path": "/", "uri": "/"}}, 422, "request.uri: given twice (under two spellings)"),
        (
            {"request": {"path": "/", "headers": {"a": 1}}},
            422,
            "request.headers: must map header names to string values",
        ),
        ({"request": {"path": "/", "method": 1}}, 422, "request.method: must be a string"),
        ({"request": {"path": "/", "jwt": {}}}, 422, "request.jwt: claims come from a verified token"),
        ({"request": {"path": "/"}, "policy": {}, "policies": []}, 422, "give `policies` (a list) or Aidbox's"),
        ({"request": {"path": "/"}, "policies": {}}, 422, "policies: must be a list of AccessPolicy resources"),
        ({"request": {"path": "/"}, "identity": {"introspector": "app"}}, 422, "identity.claims: must be a non-empty"),
    ],
)
def test_bad_bodies_name_the_problem(body: Any, status: int, problem: str) -> None:
    with pytest.raises(PolicyTestError) as caught:
        parse_policy_test(body, CONFIG)
    assert caught.value.status == status
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_aidbox_spellings_build_the_same_request() -> None:
    ours = parse_policy_test({"request": {"method": "get", "path": "/fhir/Patient?name=a"}}, CONFIG)
    aidbox = parse_policy_test(
        {"request": {"request-method": "get", "uri": "/fhir/Patient", "query-string": "name=a"}}, CONFIG
    )
    assert ours.request == aidbox.request
    assert ours.request.method == "GET"
    anonymous = parse_policy_test({"request": {"path": "/"}, "policy": {"engine": "allow"}}, CONFIG)
    assert anonymous.policies is not None
    assert [p.id for p in anonymous.policies] == ["policies[0]"]


# ---------------------------------------------------------------------- explain files


def test_read_cases_and_expectations() -> None:
    cases = read_cases(
        [
            {"name": "one", "request": {"path": "/"}, "expect": "forbidden"},
            {"request": {"path": "/"}, "expect_policy": "public"},
        ]
    )
    assert cases == [
        FileCase("one", {"request": {"path": "/"}}, "forbidden"),
        FileCase("case 2", {"request": {"path": "/"}}, "allow", "public"),
    ]
    assert read_cases({"request": {"path": "/"}}) == [FileCase("case 1", {"request": {"path": "/"}})]
    for bad, problem in [
        ([], "the file holds no cases"),
        (["x"], "case 1: must be a mapping"),
        ({"request": {}, "expect": "yes"}, "case 1: expect must be one of allow, unauthenticated"),
        ({"request": {}, "expect": "forbidden", "expect_policy": "p"}, "case 1: expect_policy names the policy"),
    ]:
        with pytest.raises(PolicyTestError) as caught:
            read_cases(bad)
        assert caught.value.problems[0].startswith(problem)
    answer = {"decision": "allow", "policy": "public"}
    assert failed_expectation(FileCase("a", {}, "allow", "public"), answer) is None
    assert failed_expectation(FileCase("a", {}, "forbidden"), answer) == "expected forbidden, got allow"
    assert failed_expectation(FileCase("a", {}, "allow", "own"), answer) == (
        "expected policy 'own' to allow, got 'public'"
    )


def test_describe_lists_why_and_hides_a_query_token(engine: Engine) -> None:
    token = mint({"sub": "bob", "pid": "pt-1"})
    body = {"request": {"method": "GET", "path": f"/fhir/Patient/pt-2?access_token={token}"}}
    test = parse_policy_test(body, CONFIG)
    answer = asyncio.run(run_policy_test(engine.authorizer, CONFIG, test))
    # As expected: one line, unless verbose.
    assert describe(FileCase("pt-2", body, "forbidden"), test, answer).count("\n") == 0
    text = describe(FileCase("pt-2", body, "forbidden"), test, answer, verbose=True)
    assert token not in text
    lines = text.splitlines()
    assert lines[0] == "pt-2: GET /fhir/Patient/pt-2?access_token=<redacted> -> forbidden (forbidden)  ok"
    assert "  policy own-patient: not matched" in lines
    assert "    - params.resource/id: 'pt-2' is not #/jwt/pid ('pt-1')" in lines
    assert "    - roleName: applies only to users holding a Role named 'doctor'; user 'bob' holds none" in lines
