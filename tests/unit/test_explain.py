"""Explanations (policy/explain.py and each engine's explain_rule): what they say, that they agree
with the compiled predicates Check runs, and that no secret reaches them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_service.policy import ENGINES
from authz_service.policy.explain import REDACTED, Redactor, explain_policies, explain_policy
from authz_service.policy.matcho import compile_pattern, explain_rule
from authz_service.registries import parse_config, validate_policies

NO_SECRETS = Redactor((), (), {})
CONTEXT: dict[str, Any] = {
    "request-method": "get",
    "uri": "/reports/1",
    "params": {"resource/type": "Patient", "resource/id": "pt-2", "tag": ["a", "b"]},
    "jwt": {"sub": "u1", "roles": ["reader", "nurse"], "pid": "pt-1", "admin": False},
    "user": {"id": "u1", "data": {"ward": 3}},
}


def why(pattern: Any, context: dict[str, Any] = CONTEXT) -> list[str]:
    return explain_rule({"matcho": pattern}, context, NO_SECRETS.show)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ({"uri": "#^/admin/"}, "uri: '/reports/1' does not match '#^/admin/'"),
        ({"request-method": "post"}, "request-method: 'get' is not 'post'"),
        ({"jwt": {"email": "present?"}}, "jwt.email: is missing (expected present?)"),
        ({"jwt": {"sub": "nil?"}}, "jwt.sub: 'u1' is not nil?"),
        ({"jwt": {"sub": None}}, "jwt.sub: 'u1' is present (expected nothing)"),
        ({"jwt": {"admin": True}}, "jwt.admin: false is not true"),
        ({"user": {"data": {"ward": 4}}}, "user.data.ward: 3 is not 4"),
        ({"params": {"resource/id": ".jwt.pid"}}, "params.resource/id: 'pt-2' is not .jwt.pid ('pt-1')"),
        (
            {"params": {"resource/id": ".user.data.patient"}},
            "params.resource/id: .user.data.patient resolves to nothing in the context, so nothing equals it",
        ),
        ({"request-method": {"$enum": ["post", "put"]}}, 'request-method: \'get\' is not one of ["post", "put"]'),
        ({"jwt": {"roles": {"$contains": "admin"}}}, "jwt.roles: no element matches 'admin'"),
        ({"jwt": {"roles": {"$every": "#^r"}}}, "jwt.roles[1]: 'nurse' does not match '#^r'"),
        ({"jwt": {"sub": {"$contains": "u"}}}, "jwt.sub: $contains needs a list, saw 'u1'"),
        ({"jwt": {"roles": {"$length": 3}}}, "jwt.roles: has 2 items, $length wants 3"),
        (
            {"jwt": {"roles": {"$not": ["reader"]}}},
            'jwt.roles: ["reader", "nurse"] matches what $not excludes (["reader"])',
        ),
        ({"jwt": {"roles": ["nurse"]}}, "jwt.roles[0]: 'reader' is not 'nurse'"),
        ({"jwt": {"roles": ["reader", "nurse", "x"]}}, "jwt.roles: has 2 items, the pattern needs at least 3"),
        ({"jwt": {"sub": ["u1"]}}, "jwt.sub: expected a list, saw 'u1'"),
        ({"uri": {"a": 1}}, "uri: expected a map, saw '/reports/1'"),
        (
            {"jwt": {"roles": {"$present-all": ["reader", "admin"]}}},
            "jwt.roles: no element matches $present-all[1] ('admin')",
        ),
        (
            {"uri": {"$one-of": ["/a", "#^/b"]}},
            "uri: matches none of the $one-of options: [0] '/reports/1' is not '/a'; "
            "[1] '/reports/1' does not match '#^/b'",
        ),
        ({"jwt": {"sub": {"$one-of": ".jwt.roles"}}}, 'jwt.sub: \'u1\' is not one of .jwt.roles (["reader", "nurse"])'),
        (
            {"user": {"$reference": {"id": "x"}}},
            'user: {"id": "u1", "data": {"ward": 3}} is not a relative reference such as \'Patient/pt-1\'',
        ),
    ],
)
def test_matcho_names_the_first_failing_path(pattern: Any, reason: str) -> None:
    assert compile_pattern(pattern)(CONTEXT, CONTEXT) is False
    assert why(pattern) == [reason]


def test_matcho_reference_explains_inside_the_parsed_reference() -> None:
    context = {"resource": {"subject": {"reference": "Patient/pt-2"}}, "user": {"data": {"patient": "pt-1"}}}
    pattern = {"resource": {"subject": {"$reference": {"id": ".user.data.patient"}}}}
    assert why(pattern, context) == ["resource.subject($reference).id: 'pt-2' is not .user.data.patient ('pt-1')"]


def test_matcho_matching_pattern_has_no_reasons() -> None:
    assert why({"uri": "#^/reports/", "jwt": {"roles": {"$contains": "nurse"}}}) == []


def test_schema_messages_carry_their_json_paths() -> None:
    schema = {
        "required": ["jwt"],
        "properties": {
            "params": {
                "required": ["resource/id", "_id"],
                "properties": {"resource/id": {"constant": {"$data": "#/jwt/pid"}}, "resource/type": {"enum": ["Obs"]}},
            },
            "user": {"properties": {"id": {"const": "u2"}}},
        },
    }
    reasons = ENGINES["json-schema"].explain({"schema": schema}, CONTEXT, NO_SECRETS.show)
    assert reasons == [
        "params: '_id' is a required property",
        "params.resource/id: 'pt-2' is not #/jwt/pid ('pt-1')",
        "params.resource/type: 'Patient' is not one of ['Obs']",
        "user.id: 'u1' is not 'u2'",
    ]
    unresolved = {"properties": {"uri": {"const": {"$data": "#/jwt/nothing"}}}}
    assert ENGINES["json-schema"].explain({"schema": unresolved}, CONTEXT, NO_SECRETS.show) == [
        "uri: #/jwt/nothing resolves to nothing in the context, so nothing equals it"
    ]


def policies(text: str) -> Any:
    return parse_config(text, {}).policies


def test_scope_reasons_name_what_excludes_the_request() -> None:
    config = parse_config(
        """
introspectors:
  - {id: a, type: jwt, jwt: {iss: https://a, secret: 0123456789abcdef0123456789abcdef}}
  - {id: b, type: jwt, jwt: {iss: https://b, secret: 0123456789abcdef0123456789abcdef}}
policies:
  - {id: only-b, engine: allow, introspectors: [b]}
  - {id: doctors, engine: allow, roleName: doctor}
  - {id: linked, engine: allow, link: [{reference: User/u9}, {reference: Operation/FhirDelete}]}
""",
        {},
    )
    context = {**CONTEXT, "roles": ["nurse"], "operation": {"id": "FhirRead"}, "client": {"id": "app"}}
    found = {p.id: (p.matched, p.why) for p in explain_policies(config.policies, context, "a", NO_SECRETS)}
    assert found == {
        "only-b": (False, ("introspectors: applies only to tokens of ['b']; this request's token came through 'a'",)),
        "doctors": (
            False,
            ("roleName: applies only to users holding a Role named 'doctor'; user 'u1' holds 'nurse'",),
        ),
        "linked": (
            False,
            (
                "link: applies only to the linked users, clients and operations; this request has "
                "user 'u1', client 'app', operation 'FhirRead'",
            ),
        ),
    }
    [anonymous] = explain_policies(config.policies[:1], {}, None, NO_SECRETS)
    assert anonymous.why == ("introspectors: applies only to tokens of ['b']; this request has no token",)


def test_redactor_takes_out_token_headers_params_and_cookies() -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.payload-part.signature-part"
    headers = {
        "authorization": f"Bearer {token}",
        "cookie": "theme=dark; sid=cookie-secret-value",
        "x-api-key": "api-key-secret",
        "x-trace": f"copy:{token}",
    }
    context: dict[str, Any] = {
        "uri": "/x",
        "query-string": f"access_token={token}&q=1",
        "params": {"access_token": token, "q": "1"},
        "headers": headers,
    }
    redactor = Redactor(["x-api-key"], ["access_token"], context)
    shown = redactor.context(context)
    assert shown["headers"] == {
        "authorization": REDACTED,
        "cookie": REDACTED,
        "x-api-key": REDACTED,
        "x-trace": f"copy:{REDACTED}",
    }
    assert shown["params"] == {"access_token": REDACTED, "q": "1"}
    assert shown["query-string"] == f"access_token={REDACTED}&q=1"
    text = json.dumps(shown)
    for secret in (token, "cookie-secret-value", "api-key-secret"):
        assert secret not in text
        assert secret not in redactor.show({"nested": [secret]})
    # Scrubbed before it is cut: no prefix of a long secret survives a shortened value.
    assert token[:20] not in redactor.show("x" * 100 + token)
    assert headers["authorization"] == f"Bearer {token}"  # the context itself is untouched


def test_a_reason_quoting_a_secret_is_scrubbed() -> None:
    secret = "Bearer very-secret-token-value"
    context = {"headers": {"authorization": secret}, "uri": "/x"}
    [policy] = validate_policies(
        [
            {
                "id": "p",
                "engine": "json-schema",
                "schema": {"properties": {"headers": {"properties": {"authorization": {"const": "x"}}}}},
            }
        ],
        [],
    )
    explained = explain_policy(policy, context, None, Redactor((), (), context))
    assert explained.why == (f"headers.authorization: '{REDACTED}' is not 'x'",)


# ------------------------------------------------------------------ agreement with Check's predicates

KEYS = st.sampled_from(["a", "b", "uri", "roles"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.sampled_from(["x", "y", "/a/b", "", "A"]))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=8,
)
LEAF_PATTERNS = st.one_of(
    SCALARS.filter(lambda v: v != ""),
    st.sampled_from(["present?", "nil?", "not-blank?", "#^x", "#(?i)a", ".a", ".b.0", ".roles"]),
)


def patterns() -> st.SearchStrategy[Any]:
    def extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.dictionaries(KEYS, inner, max_size=2),
            st.lists(inner, min_size=1, max_size=2),
            st.builds(lambda p: {"$not": p}, inner),
            st.builds(lambda p: {"$contains": p}, inner),
            st.builds(lambda p: {"$every": p}, inner),
            st.builds(lambda ps: {"$one-of": ps}, st.lists(inner, min_size=1, max_size=2)),
            st.builds(lambda ps: {"$present-all": ps}, st.lists(inner, min_size=1, max_size=2)),
            st.builds(lambda n: {"$length": n}, st.integers(0, 2)),
            st.builds(lambda vs: {"$enum": vs}, st.lists(st.sampled_from(["x", "y", 1, True]), min_size=1)),
            st.builds(lambda p: {"$reference": p}, inner),
            st.just({"$one-of": ".roles"}),
        )

    return st.recursive(LEAF_PATTERNS, extend, max_leaves=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=patterns(), context=st.dictionaries(KEYS, VALUES, max_size=4))
def test_matcho_explains_exactly_when_the_compiled_pattern_fails(pattern: Any, context: dict[str, Any]) -> None:
    matched = compile_pattern(pattern)(context, context)
    reasons = why(pattern, context)
    assert (reasons == []) is matched, (pattern, context, reasons)


COMPLEX_ITEMS = st.sampled_from(
    [
        {"engine": "allow"},
        {"engine": "matcho", "matcho": {"a": "x"}},
        {"engine": "matcho", "matcho": {"b": {"$contains": "y"}}},
        {"engine": "json-schema", "schema": {"required": ["a"]}},
        {"engine": "json-schema", "schema": {"properties": {"uri": {"type": "string"}}}},
    ]
)


def complex_rules() -> st.SearchStrategy[Any]:
    def extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.builds(
            lambda op, items: {op: items}, st.sampled_from(["and", "or"]), st.lists(inner, min_size=1, max_size=3)
        )

    return st.builds(
        lambda op, items: {op: items},
        st.sampled_from(["and", "or"]),
        st.lists(st.recursive(COMPLEX_ITEMS, extend, max_leaves=5), min_size=1, max_size=3),
    )


@settings(max_examples=200, deadline=None)
@given(rule=complex_rules(), context=st.dictionaries(KEYS, VALUES, max_size=4))
def test_complex_explains_exactly_when_the_compiled_rule_fails(rule: Any, context: dict[str, Any]) -> None:
    engine = ENGINES["complex"]
    matched = engine.compile(rule)(context)
    assert (engine.explain(rule, context, repr) == []) is matched
