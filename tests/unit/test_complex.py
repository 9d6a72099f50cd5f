"""complex: Aidbox's `and` / `or` over other engines' rules, its registration, errors and explanations."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import pytest

from authz_service.config.model import PolicyConfig
from authz_service.errors import ConfigError, PolicyError
from authz_service.policy import ENGINES, matcho, schema
from authz_service.policy.complex import MAX_DEPTH, compile_rule, explain_rule
from authz_service.policy.evaluate import Predicate, allows
from authz_service.registries import parse_config

GET_PATIENT: dict[str, Any] = {
    "request-method": "get",
    "uri": "/fhir/Patient/pt-1",
    "params": {"resource/type": "Patient", "resource/id": "pt-1"},
    "user": {"id": "u1"},
}
POST_OBSERVATION: dict[str, Any] = {
    "request-method": "post",
    "uri": "/fhir/Observation",
    "params": {"resource/type": "Observation"},
}


def is_get() -> dict[str, Any]:
    return {"engine": "matcho", "matcho": {"request-method": "get"}}


def is_patient() -> dict[str, Any]:
    return {
        "engine": "json-schema",
        "schema": {
            "required": ["params"],
            "properties": {"params": {"properties": {"resource/type": {"const": "Patient"}}}},
        },
    }


def has_user() -> dict[str, Any]:
    return {"engine": "json-schema", "schema": {"required": ["user"]}}


def is_post() -> dict[str, Any]:
    return {"engine": "matcho", "matcho": {"request-method": "post"}}


def one_policy(body: str) -> PolicyConfig:
    [policy] = parse_config(f"policies:\n- id: p\n  engine: complex\n{body}", {}).policies
    return policy


# --------------------------------------------------------------------------- registration


def test_complex_is_registered_with_and_or_as_its_rule_fields() -> None:
    kind = ENGINES["complex"]
    assert (kind.name, kind.fields, kind.module, kind.any_field) == (
        "complex",
        ("and", "or"),
        "authz_service.policy.complex",
        True,
    )
    assert kind.missing({"engine": "complex"}) == ["and or or"]
    assert kind.missing({"or": []}) == []
    assert kind.rule({"id": "p", "engine": "complex", "and": [1], "description": "d"}) == {"and": [1]}
    predicate = kind.compile({"or": [is_post(), is_patient()]})
    assert predicate(GET_PATIENT)
    assert predicate(POST_OBSERVATION)
    assert not predicate({"request-method": "get", "params": {"resource/type": "Observation"}})


def test_a_config_policy_compiles_through_the_registry() -> None:
    policy = one_policy(
        "  and:\n"
        "  - {engine: matcho, matcho: {request-method: get}}\n"
        "  - {engine: json-schema, schema: {required: [user]}}\n"
    )
    assert (policy.engine, policy.rule) == (
        "complex",
        {"and": [is_get(), {"engine": "json-schema", "schema": {"required": ["user"]}}]},
    )
    assert allows(policy, GET_PATIENT, None)
    assert not allows(policy, POST_OBSERVATION, None)
    assert not allows(policy, {k: v for k, v in GET_PATIENT.items() if k != "user"}, None)


# --------------------------------------------------------------------------- semantics


@pytest.mark.parametrize(
    ("items", "on_get_patient", "on_post_observation"),
    [
        ([is_get(), is_patient()], True, False),
        ([is_get(), is_post()], False, False),
        ([is_post(), is_get()], False, False),
        ([{"engine": "allow"}, is_patient()], True, False),
        ([{"engine": "allow"}], True, True),
        ([is_post()], False, True),
    ],
)
def test_and_needs_every_item(items: list[Any], on_get_patient: bool, on_post_observation: bool) -> None:
    predicate = compile_rule({"and": items})
    assert predicate(GET_PATIENT) is on_get_patient
    assert predicate(POST_OBSERVATION) is on_post_observation


@pytest.mark.parametrize(
    ("items", "on_get_patient", "on_post_observation"),
    [
        ([is_get(), is_post()], True, True),
        ([is_patient(), is_post()], True, True),
        ([is_patient(), has_user()], True, False),
        ([is_get()], True, False),
        ([{"engine": "matcho", "matcho": {"uri": "#^/admin/"}}, has_user()], True, False),
    ],
)
def test_or_needs_one_item(items: list[Any], on_get_patient: bool, on_post_observation: bool) -> None:
    predicate = compile_rule({"or": items})
    assert predicate(GET_PATIENT) is on_get_patient
    assert predicate(POST_OBSERVATION) is on_post_observation


def test_items_of_every_engine_nested_with_and_without_engine_complex() -> None:
    # (get AND patient) OR (post AND NOT a user), every engine and both ways of nesting
    implicit = {
        "or": [
            {"and": [is_get(), is_patient()]},
            {"and": [is_post(), {"engine": "matcho", "matcho": {"user": "nil?"}}, {"engine": "allow"}]},
        ]
    }
    explicit = {
        "or": [
            {"engine": "complex", "and": [is_get(), is_patient()]},
            {
                "engine": "complex",
                "description": "writes",
                "and": [is_post(), {"engine": "matcho", "matcho": {"user": "nil?"}}, {"engine": "allow"}],
            },
        ]
    }
    for rule in (implicit, explicit):
        predicate = compile_rule(rule)
        assert predicate(GET_PATIENT)
        assert predicate(POST_OBSERVATION)
        assert not predicate({**POST_OBSERVATION, "user": {"id": "u1"}})
        assert not predicate({**GET_PATIENT, "params": {"resource/type": "Observation"}})


def test_nesting_up_to_max_depth_compiles_and_evaluates() -> None:
    node: dict[str, Any] = {"or": [is_post(), is_patient()]}
    for _ in range(MAX_DEPTH - 1):
        node = {"and": [{"engine": "allow"}, node]}
    predicate = compile_rule(node)
    assert predicate(GET_PATIENT)
    assert not predicate({"request-method": "get", "params": {"resource/type": "Observation"}})


# --------------------------------------------------------------------------- evaluation order


class Calls:
    """Wraps the matcho and json-schema compilers so each compiled item records when it is asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.asked: list[str] = []
        for module in (matcho, schema):
            monkeypatch.setattr(module, "compile_rule", self._wrap(module))

    def _wrap(self, module: ModuleType) -> Callable[[Mapping[str, Any]], Predicate]:
        real: Callable[[Mapping[str, Any]], Predicate] = module.compile_rule

        def compile_counted(rule: Mapping[str, Any]) -> Predicate:
            predicate = real(rule)
            label = json.dumps(rule, sort_keys=True)

            def counted(context: Mapping[str, Any]) -> bool:
                self.asked.append(label)
                return predicate(context)

            return counted

        return compile_counted


def label(item: Mapping[str, Any]) -> str:
    return json.dumps({key: value for key, value in item.items() if key != "engine"}, sort_keys=True)


def test_and_stops_at_the_first_item_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    predicate = compile_rule({"and": [is_get(), is_post(), is_patient(), has_user()]})
    assert calls.asked == []  # compiling asks nothing
    assert not predicate(GET_PATIENT)
    assert calls.asked == [label(is_get()), label(is_post())]


def test_or_stops_at_the_first_item_that_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    predicate = compile_rule({"or": [is_post(), is_patient(), is_get(), has_user()]})
    assert predicate(GET_PATIENT)
    assert calls.asked == [label(is_post()), label(is_patient())]
    calls.asked.clear()
    assert predicate(POST_OBSERVATION)
    assert calls.asked == [label(is_post())]


def test_nested_items_are_asked_in_order_and_short_circuit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    predicate = compile_rule(
        {"and": [{"or": [is_post(), is_get(), has_user()]}, {"and": [is_patient(), is_post()]}, is_get()]}
    )
    assert not predicate(GET_PATIENT)
    assert calls.asked == [label(is_post()), label(is_get()), label(is_patient()), label(is_post())]


def test_an_allow_item_ends_an_or_and_never_ends_an_and(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    assert compile_rule({"or": [{"engine": "allow"}, is_post()]})(GET_PATIENT)
    assert calls.asked == []
    assert not compile_rule({"and": [{"engine": "allow"}, is_post()]})(GET_PATIENT)
    assert calls.asked == [label(is_post())]


# --------------------------------------------------------------------------- config errors

HEAD = "policies:\n- id: p\n  engine: complex\n"


def config_error(body: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + body, {})
    return str(caught.value)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            "  and: [{engine: allow}]\n  or: [{engine: allow}]\n",
            "policy 'p': or: cannot sit next to `and` at one level: nest one inside the other",
            id="and-and-or",
        ),
        pytest.param("", "policy 'p': and or or is required for engine complex", id="neither"),
        pytest.param("  and: []\n", "policy 'p': and: must be a non-empty list of rules", id="empty"),
        pytest.param("  or: {engine: allow}\n", "policy 'p': or: must be a non-empty list of rules", id="not-a-list"),
        pytest.param(
            "  and: [matcho]\n",
            "policy 'p': and[0]: must be a mapping such as {engine: matcho, matcho: {...}}",
            id="item-not-a-mapping",
        ),
        pytest.param(
            "  and: [{engine: allow}, {engine: sql, sql: {query: 'select 1'}}]\n",
            "policy 'p': and[1].engine: must be matcho, json-schema, allow or complex, got 'sql' (sql queries "
            "Aidbox's database, which an ext_authz service does not have; express the check over the request "
            "context with matcho or json-schema)",
            id="sql",
        ),
        pytest.param(
            "  and: [{matcho: {uri: /x}}]\n",
            "policy 'p': and[0].engine: is required: matcho, json-schema, allow or complex",
            id="missing-engine",
        ),
        pytest.param(
            "  and: [{engine: matcho, matcho: {uri: /x}, foo: 1}]\n",
            "policy 'p': and[0].foo: is not a field of engine matcho",
            id="unknown-field",
        ),
        pytest.param(
            "  or: [{engine: allow, matcho: {uri: /x}}]\n",
            "policy 'p': or[0].matcho: is not a field of engine allow",
            id="field-of-another-engine",
        ),
        pytest.param(
            "  and: [{engine: complex, or: [{engine: allow}], foo: 1}]\n",
            "policy 'p': and[0].foo: is not a field of a complex rule (and, or)",
            id="unknown-field-of-nested-complex",
        ),
        pytest.param(
            "  and: [{engine: matcho}]\n",
            "policy 'p': and[0].matcho: is required for engine matcho",
            id="missing-matcho",
        ),
        pytest.param(
            "  or: [{engine: allow}, {engine: json-schema}]\n",
            "policy 'p': or[1].schema: is required for engine json-schema",
            id="missing-schema",
        ),
        pytest.param(
            "  and: [{engine: complex}]\n",
            "policy 'p': and[0].and: is required (or `or`): a complex rule combines items with and/or",
            id="nested-complex-without-and-or",
        ),
        pytest.param(
            "  and: [{and: [{engine: allow}], or: [{engine: allow}]}]\n",
            "policy 'p': and[0].or: cannot sit next to `and` at one level: nest one inside the other",
            id="nested-and-and-or",
        ),
        pytest.param(
            "  and: [{or: []}]\n",
            "policy 'p': and[0].or: must be a non-empty list of rules",
            id="nested-empty",
        ),
    ],
)
def test_config_errors_name_the_path(body: str, expected: str) -> None:
    assert config_error(body) == expected


def test_a_bad_matcho_deep_inside_names_its_whole_path() -> None:
    message = config_error(
        "  and:\n  - {engine: allow}\n  - or:\n    - {engine: matcho, matcho: {uri: '#(unclosed'}}\n"
    )
    assert message.startswith("policy 'p': and[1].or[0].matcho.uri: invalid regular expression '(unclosed'")


def test_a_bad_schema_inside_names_its_whole_path() -> None:
    message = config_error("  or:\n  - {engine: allow}\n  - and: [{engine: json-schema, schema: {type: 12}}]\n")
    assert message.startswith("policy 'p': or[1].and[0].schema.type: ")


def test_nesting_deeper_than_max_depth_is_an_error_naming_the_level() -> None:
    node: dict[str, Any] = {"engine": "allow"}
    for _ in range(MAX_DEPTH):
        node = {"and": [node]}
    parse_config(HEAD + f"  and: {json.dumps(node['and'])}\n", {})  # MAX_DEPTH levels: fine
    too_deep = {"and": [node]}
    path = ".".join(["and[0]"] * MAX_DEPTH)
    assert config_error(f"  and: {json.dumps(too_deep['and'])}\n") == (
        f"policy 'p': {path}: nests and/or deeper than {MAX_DEPTH} levels"
    )
    with pytest.raises(PolicyError) as caught:
        compile_rule(too_deep)
    assert caught.value.path == path


def test_the_problems_of_every_complex_policy_are_listed() -> None:
    text = (
        "policies:\n"
        "- {id: good, engine: complex, or: [{engine: allow}]}\n"
        "- {id: bad, engine: complex, or: [{engine: sql}]}\n"
        "- {id: worse, engine: complex, and: [], unknown: 1}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    assert [str(problem) for problem in caught.value.problems] == [
        "policy 'bad': or[0].engine: must be matcho, json-schema, allow or complex, got 'sql' (sql queries "
        "Aidbox's database, which an ext_authz service does not have; express the check over the request "
        "context with matcho or json-schema)",
        "policy 'worse': and: must be a non-empty list of rules",
        "policy 'worse': unknown is not a known field",
    ]


# --------------------------------------------------------------------------- explanations


def test_explain_is_empty_when_the_rule_matches() -> None:
    assert explain_rule({"and": [is_get(), is_patient()]}, GET_PATIENT, repr) == []
    assert explain_rule({"or": [is_post(), {"and": [is_get(), is_patient()]}]}, GET_PATIENT, repr) == []


def test_explain_an_and_reports_its_first_failing_item_only() -> None:
    rule = {"and": [is_get(), {"engine": "matcho", "matcho": {"uri": "#^/admin/"}}, is_post()]}
    assert explain_rule(rule, GET_PATIENT, repr) == [
        "and[1] (matcho): uri: '/fhir/Patient/pt-1' does not match '#^/admin/'"
    ]


def test_explain_an_or_reports_every_item() -> None:
    anonymous_get = {"request-method": "get", "uri": "/fhir/Patient/pt-1"}
    rule = {"or": [is_post(), has_user(), {"engine": "matcho", "matcho": {"uri": "/x"}}]}
    assert explain_rule(rule, anonymous_get, repr) == [
        "or[0] (matcho): request-method: 'get' is not 'post'",
        "or[1] (json-schema): the request context: 'user' is a required property",
        "or[2] (matcho): uri: '/fhir/Patient/pt-1' is not '/x'",
    ]


def test_explain_prefixes_nested_reasons_with_their_path() -> None:
    rule = {
        "and": [
            {"engine": "allow"},
            {"or": [{"engine": "matcho", "matcho": {"uri": "/y"}}, {"and": [is_get(), has_user(), is_post()]}]},
            is_post(),
        ]
    }
    anonymous_get = {"request-method": "get", "uri": "/fhir/Patient/pt-1"}
    assert explain_rule(rule, anonymous_get, repr) == [
        "and[1].or[0] (matcho): uri: '/fhir/Patient/pt-1' is not '/y'",
        "and[1].or[1].and[1] (json-schema): the request context: 'user' is a required property",
    ]
    explicit = {"or": [{"engine": "complex", "or": [is_post()]}, is_patient()]}
    assert explain_rule(explicit, POST_OBSERVATION | {"request-method": "get"}, repr) == [
        "or[0].or[0] (matcho): request-method: 'get' is not 'post'",
        "or[1] (json-schema): params.resource/type: 'Observation' is not 'Patient'",
    ]


def test_explain_renders_values_with_show() -> None:
    rule = {"and": [{"engine": "matcho", "matcho": {"uri": "/x"}}]}
    assert explain_rule(rule, GET_PATIENT, lambda value: "<shown>") == ["and[0] (matcho): uri: <shown> is not <shown>"]
