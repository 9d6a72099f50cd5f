"""Tests for the matcho engine: every rule and operator, Aidbox's examples, pattern errors, properties."""

from __future__ import annotations

import datetime
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_service.config.model import RoleConfig
from authz_service.context import build_context
from authz_service.errors import AuthzError
from authz_service.model import HttpRequest, Identity
from authz_service.policy.matcho import PatternError, compile_pattern, compile_rule, lint_rule, matches

# A request context in the shape decide.py builds (empty values already removed).
CTX: dict[str, Any] = {
    "request-method": "get",
    "uri": "/Patient/42",
    "params": {"resource/type": "Patient", "practitioner": "p1"},
    "jwt": {"sub": "u1", "roles": ["admin", "staff"], "admin": True, "level": 1},
    "user": {"id": "u1", "data": {"practitioner_id": "p1"}},
    "numbered": {"0": "zero"},
}


def case(case_id: str, pattern: Any, value: Any, expected: bool) -> Any:
    return pytest.param(pattern, value, expected, id=f"{case_id}-{'yes' if expected else 'no'}")


RULES = [
    # --- scalars: by value; bool only equals bool; 1 equals 1.0
    case("str-equal", "get", "get", True),
    case("str-differs", "get", "post", False),
    case("str-case-matters", "get", "GET", False),
    case("str-vs-int", "1", 1, False),
    case("int-vs-str", 1, "1", False),
    case("int-equal", 42, 42, True),
    case("int-vs-float", 1, 1.0, True),
    case("float-vs-int", 2.0, 2, True),
    case("int-differs", 1, 2, False),
    case("true-equal", True, True, True),
    case("false-equal", False, False, True),
    case("true-vs-false", True, False, False),
    case("true-vs-1", True, 1, False),
    case("1-vs-true", 1, True, False),
    case("false-vs-0", False, 0, False),
    case("0-vs-false", 0, False, False),
    case("1.0-vs-true", 1.0, True, False),
    case("str-vs-none", "get", None, False),
    case("int-vs-none", 0, None, False),
    case("false-vs-none", False, None, False),
    case("str-vs-list", "a", ["a"], False),
    case("int-vs-list", 1, [1], False),
    # --- None pattern: same as nil?
    case("none-vs-none", None, None, True),
    case("none-vs-str", None, "x", False),
    case("none-vs-false", None, False, False),
    case("none-vs-0", None, 0, False),
    case("none-vs-missing-key", {"a": None}, {"b": 1}, True),
    case("none-vs-present-key", {"a": None}, {"a": 1}, False),
    # --- maps: recursive subset
    case("map-subset", {"a": 1}, {"a": 1, "b": 2}, True),
    case("map-equal", {"a": 1, "b": 2}, {"a": 1, "b": 2}, True),
    case("map-missing-key", {"a": 1, "c": 3}, {"a": 1, "b": 2}, False),
    case("map-wrong-value", {"a": 1}, {"a": 2}, False),
    case("map-nested", {"a": {"b": {"c": "d"}}}, {"a": {"b": {"c": "d", "e": 1}, "f": 2}}, True),
    case("map-nested-differs", {"a": {"b": {"c": "d"}}}, {"a": {"b": {"c": "x"}}}, False),
    case("map-nested-vs-scalar", {"a": {"b": 1}}, {"a": "b"}, False),
    case("map-vs-list", {"a": 1}, [{"a": 1}], False),
    case("map-vs-str", {"a": 1}, "a", False),
    case("map-vs-none", {"a": 1}, None, False),
    case("empty-map-vs-map", {}, {"a": 1}, True),
    case("empty-map-vs-empty-map", {}, {}, True),
    case("empty-map-vs-none", {}, None, False),
    case("empty-map-vs-list", {}, [], False),
    case("map-key-slash", {"params": {"resource/type": "Patient"}}, CTX, True),
    # --- lists: element by element, in order, as a prefix
    case("list-prefix", [1, 2], [1, 2, 3], True),
    case("list-equal", [1, 2], [1, 2], True),
    case("list-reordered", [1, 2], [2, 1], False),
    case("list-too-short", [1, 2], [1], False),
    case("list-not-first", [2], [1, 2], False),
    case("empty-list-vs-list", [], [1], True),
    case("empty-list-vs-empty-list", [], [], True),
    case("empty-list-vs-map", [], {}, False),
    case("list-vs-str", ["a"], "a", False),
    case("list-vs-index-map", [1], {"0": 1}, False),
    case("list-vs-none", [1], None, False),
    case("list-bool-trap", [True], [1], False),
    case("list-of-maps-subset", [{"a": 1}, {"b": 2}], [{"a": 1, "x": 0}, {"b": 2}], True),
    case("list-of-maps-differs", [{"a": 1}, {"b": 2}], [{"a": 1}, {"b": 3}], False),
    case("list-in-list", [[1], [2, 3]], [[1, 9], [2, 3, 4]], True),
    case("list-in-list-differs", [[1], [2, 3]], [[1], [3, 2]], False),
    case("list-in-map", {"a": [1, 2]}, {"a": [1, 2, 3]}, True),
    case("list-in-map-differs", {"a": [1, 2]}, {"a": [1, 3]}, False),
    # --- regex: searched, anchored only when the pattern says so
    case("regex-searched", "#Patient", "/fhir/Patient/1", True),
    case("regex-not-found", "#Patient", "/fhir/Encounter/1", False),
    case("regex-caret-anchors", "#^Patient", "/Patient", False),
    case("regex-caret-matches", "#^/Patient", "/Patient/1", True),
    case("regex-full-anchor", "#^/Patient$", "/Patient", True),
    case("regex-full-anchor-longer", "#^/Patient$", "/Patient/1", False),
    case("regex-case-sensitive", "#patient", "/Patient", False),
    case("regex-inline-flag", "#(?i)patient", "/Patient", True),
    case("regex-vs-int", "#4", 42, False),
    case("regex-vs-bool", "#True", True, False),
    case("regex-vs-none", "#.*", None, False),
    case("regex-vs-list", "#Patient", ["/Patient"], False),
    case("regex-vs-map", "#a", {"a": "a"}, False),
    case("empty-regex-vs-empty-str", "#", "", True),
    case("empty-regex-vs-int", "#", 0, False),
    case("regex-in-map", {"uri": "#^/Patient/[0-9]+$"}, CTX, True),
    case("regex-in-map-differs", {"uri": "#^/Encounter/"}, CTX, False),
    # --- context paths: equal to the resolved value; unresolved never matches
    case("path-equal", {"jwt": {"sub": ".user.id"}}, CTX, True),
    case("path-differs", {"params": {"practitioner": ".user.id"}}, CTX, False),
    case("path-nested-equal", {"params": {"practitioner": ".user.data.practitioner_id"}}, CTX, True),
    case("path-unresolved", {"params": {"practitioner": ".user.data.missing"}}, CTX, False),
    case("path-unresolved-value-missing-too", {"params": {"nobody": ".user.data.missing"}}, CTX, False),
    case("path-through-scalar", {"jwt": {"sub": ".user.id.x"}}, CTX, False),
    case("path-list-index-0", {"jwt": {"roles": {"$contains": ".jwt.roles.0"}}}, CTX, True),
    case("path-list-index-1", [".jwt.roles.1"], ["staff"], True),
    case("path-list-index-wrong", [".jwt.roles.1"], ["admin"], False),
    case("path-list-index-out-of-range", [".jwt.roles.5"], ["admin"], False),
    case("path-list-non-numeric", [".jwt.roles.first"], ["admin"], False),
    case("path-numeric-key-in-map", [".numbered.0"], ["zero"], True),
    case("path-slash-key", [".params.resource/type"], ["Patient"], True),
    case("path-bool-vs-int", [".jwt.admin"], [1], False),
    case("path-bool-vs-bool", [".jwt.admin"], [True], True),
    case("path-int-vs-float", [".jwt.level"], [1.0], True),
    case("path-int-vs-bool", [".jwt.level"], [True], False),
    case("path-collection-equal", [".jwt.roles"], [["admin", "staff"]], True),
    case("path-collection-not-prefix", [".jwt.roles"], [["admin"]], False),
    case("path-map-equal", [".user.data"], [{"practitioner_id": "p1"}], True),
    case("path-map-not-subset", [".user.data"], [{"practitioner_id": "p1", "x": 1}], False),
    # --- present?, nil?, not-blank?
    case("present-str", "present?", "x", True),
    case("present-zero", "present?", 0, True),
    case("present-false", "present?", False, True),
    case("present-list", "present?", [], True),
    case("present-none", "present?", None, False),
    case("present-missing-key", {"user": {"email": "present?"}}, CTX, False),
    case("present-key", {"user": {"id": "present?"}}, CTX, True),
    case("nil-none", "nil?", None, True),
    case("nil-missing-key", {"user": {"email": "nil?"}}, CTX, True),
    case("nil-present-key", {"user": {"id": "nil?"}}, CTX, False),
    case("nil-empty-str", "nil?", "", False),
    case("nil-false", "nil?", False, False),
    case("not-blank-str", "not-blank?", "a", True),
    case("not-blank-padded", "not-blank?", "  a ", True),
    case("not-blank-empty", "not-blank?", "", False),
    case("not-blank-spaces", "not-blank?", "   ", False),
    case("not-blank-whitespace", "not-blank?", "\t\n", False),
    case("not-blank-int", "not-blank?", 1, False),
    case("not-blank-none", "not-blank?", None, False),
    case("not-blank-list", "not-blank?", ["a"], False),
    # --- $enum: literal scalars, same equality rules
    case("enum-hit", {"$enum": ["get", "post"]}, "post", True),
    case("enum-miss", {"$enum": ["get", "post"]}, "delete", False),
    case("enum-int-vs-float", {"$enum": [1, 2]}, 2.0, True),
    case("enum-true-vs-1", {"$enum": [1]}, True, False),
    case("enum-1-vs-true", {"$enum": [True]}, 1, False),
    case("enum-bool", {"$enum": [False]}, False, True),
    case("enum-none", {"$enum": ["get"]}, None, False),
    case("enum-list", {"$enum": ["get"]}, ["get"], False),
    case("enum-literal-not-regex", {"$enum": ["#.*"]}, "anything", False),
    case("enum-literal-hash", {"$enum": ["#.*"]}, "#.*", True),
    case("enum-nan", {"$enum": [1.5]}, float("nan"), False),
    case("enum-in-map", {"request-method": {"$enum": ["get", "head"]}}, CTX, True),
    # --- $one-of: any pattern
    case("one-of-hit", {"$one-of": ["get", "post"]}, "post", True),
    case("one-of-miss", {"$one-of": ["get", "post"]}, "put", False),
    case("one-of-patterns", {"$one-of": [{"a": 1}, {"b": "#x"}]}, {"b": "yxy"}, True),
    case("one-of-patterns-miss", {"$one-of": [{"a": 1}, {"b": "#x"}]}, {"c": 1}, False),
    case("one-of-nil", {"$one-of": ["nil?", "#^a"]}, None, True),
    # --- $contains
    case("contains-hit", {"$contains": "inpatient"}, ["outpatient", "inpatient"], True),
    case("contains-miss", {"$contains": "inpatient"}, ["outpatient"], False),
    case("contains-empty", {"$contains": "inpatient"}, [], False),
    case("contains-vs-str", {"$contains": "in"}, "inpatient", False),
    case("contains-vs-none", {"$contains": "in"}, None, False),
    case("contains-map", {"$contains": {"value": "admin"}}, [{"value": "x"}, {"value": "admin", "n": 1}], True),
    case("contains-map-miss", {"$contains": {"value": "admin"}}, [{"value": "x"}], False),
    case("contains-regex", {"$contains": "#^urgent"}, ["normal", "urgent-care"], True),
    # --- $every: a non-empty list whose elements all match
    case("every-hit", {"$every": "#^a"}, ["ab", "ac"], True),
    case("every-miss", {"$every": "#^a"}, ["ab", "bc"], False),
    case("every-empty", {"$every": "#^a"}, [], False),
    case("every-vs-str", {"$every": "#^a"}, "ab", False),
    case("every-vs-none", {"$every": "present?"}, None, False),
    case("every-nested-list", {"$every": ["#^a"]}, [["ab"], ["ac", "x"]], True),
    case("every-nested-list-miss", {"$every": ["#^a"]}, [["ab"], []], False),
    # --- $not
    case("not-hit", {"$not": "a"}, "b", True),
    case("not-miss", {"$not": "a"}, "a", False),
    case("not-none", {"$not": "a"}, None, True),
    case("not-nil", {"$not": "nil?"}, None, False),
    case("not-not", {"$not": {"$not": "a"}}, "a", True),
    case("not-path-resolved", {"jwt": {"sub": {"$not": ".user.id"}}}, CTX, False),
    case("not-path-unresolved", {"jwt": {"sub": {"$not": ".user.missing"}}}, CTX, True),
    # --- $present-all: every pattern matches some element, in any order
    case("present-all-hit", {"$present-all": ["c", "a"]}, ["a", "b", "c"], True),
    case("present-all-miss", {"$present-all": ["c", "a"]}, ["a", "b"], False),
    case("present-all-vs-str", {"$present-all": ["a"]}, "a", False),
    case("present-all-vs-none", {"$present-all": ["a"]}, None, False),
    case("present-all-one-element-two-patterns", {"$present-all": [{"a": 1}, {"b": 2}]}, [{"a": 1, "b": 2}], True),
    # --- $length: lists only
    case("length-hit", {"$length": 2}, [1, 2], True),
    case("length-miss", {"$length": 2}, [1], False),
    case("length-zero", {"$length": 0}, [], True),
    case("length-vs-str", {"$length": 2}, "ab", False),
    case("length-vs-map", {"$length": 0}, {}, False),
    case("length-vs-none", {"$length": 0}, None, False),
    # --- operators combine with each other and with ordinary keys: all must hold
    case("combo-length-contains", {"$length": 2, "$contains": "a"}, ["b", "a"], True),
    case("combo-length-contains-miss", {"$length": 2, "$contains": "a"}, ["a", "b", "c"], False),
    case("combo-keys-and-not", {"id": "present?", "$not": {"role": "guest"}}, {"id": "u1", "role": "doc"}, True),
    case(
        "combo-keys-and-not-miss", {"id": "present?", "$not": {"role": "guest"}}, {"id": "u1", "role": "guest"}, False
    ),
    case("combo-keys-need-a-map", {"id": "present?", "$not": {"role": "guest"}}, None, False),
    case("combo-every-contains", {"$every": {"$contains": 1}}, [[1, 2], [3, 1]], True),
    case("combo-every-contains-miss", {"$every": {"$contains": 1}}, [[1, 2], [3]], False),
    # --- deep nesting: operators inside maps inside lists inside maps
    case(
        "nested-ops",
        {"entries": [{"tags": {"$contains": "#^urgent"}, "n": {"$enum": [1, 2]}}, {"kind": {"$not": "x"}}]},
        {"entries": [{"tags": ["urgent-1"], "n": 2}, {"kind": "y"}, {"extra": 1}]},
        True,
    ),
    case(
        "nested-ops-miss",
        {"entries": [{"tags": {"$contains": "#^urgent"}, "n": {"$enum": [1, 2]}}, {"kind": {"$not": "x"}}]},
        {"entries": [{"tags": ["urgent-1"], "n": 2}, {"kind": "x"}]},
        False,
    ),
    case(
        "nested-one-of-in-list",
        {"a": [{"$one-of": ["nil?", {"b": {"$length": 1}}]}]},
        {"a": [{"b": ["x"]}]},
        True,
    ),
    case(
        "nested-one-of-in-list-miss", {"a": [{"$one-of": ["nil?", {"b": {"$length": 1}}]}]}, {"a": [{"b": []}]}, False
    ),
]


@pytest.mark.parametrize(("pattern", "value", "expected"), RULES)
def test_rules(pattern: Any, value: Any, expected: bool) -> None:
    assert matches(pattern, value, CTX) is expected


# Aidbox's documented AccessPolicy examples, as a policy is evaluated: the context is the value.
def ctx(method: str | None = None, **entries: Any) -> dict[str, Any]:
    return entries if method is None else {"request-method": method, **entries}


PRACTITIONER = {"roles": [{"value": "practitioner"}], "data": {"pract_id": "p1"}}
AIDBOX_RESOURCE_POLICY = {
    "user": {"roles": [{"value": "practitioner"}]},
    "uri": "#/Patient/.*",
    "request-method": "get",
}
NOT_GUEST = {"user": {"$not": {"data": {"role": "guest"}}}}
PATIENT_AND_ENCOUNTER = {
    "resource": {"$length": 2, "$present-all": [{"resourceType": "Patient"}, {"resourceType": "Encounter"}]}
}

AIDBOX_EXAMPLES = [
    case(
        "roles-uri-method",
        AIDBOX_RESOURCE_POLICY,
        ctx(user=PRACTITIONER, uri="/fhir/Patient/1", method="get"),
        True,
    ),
    case(
        "roles-uri-method-post",
        AIDBOX_RESOURCE_POLICY,
        ctx(user=PRACTITIONER, uri="/fhir/Patient/1", method="post"),
        False,
    ),
    case(
        "roles-uri-method-other-uri",
        AIDBOX_RESOURCE_POLICY,
        ctx(user=PRACTITIONER, uri="/fhir/Encounter/1", method="get"),
        False,
    ),
    case(
        "roles-first-role-extra-roles",
        AIDBOX_RESOURCE_POLICY,
        ctx(user={"roles": [{"value": "practitioner"}, {"value": "admin"}]}, uri="/Patient/", method="get"),
        True,
    ),
    # A list pattern is a prefix: practitioner must be the FIRST role. Use $contains for "any role".
    case(
        "roles-practitioner-not-first",
        AIDBOX_RESOURCE_POLICY,
        ctx(user={"roles": [{"value": "admin"}, {"value": "practitioner"}]}, uri="/Patient/", method="get"),
        False,
    ),
    case("roles-anonymous", AIDBOX_RESOURCE_POLICY, ctx(uri="/Patient/1", method="get"), False),
    case("one-of-methods-get", {"request-method": {"$one-of": ["get", "post", "put"]}}, ctx("get"), True),
    case("one-of-methods-put", {"request-method": {"$one-of": ["get", "post", "put"]}}, ctx("put"), True),
    case(
        "one-of-methods-delete",
        {"request-method": {"$one-of": ["get", "post", "put"]}},
        ctx("delete"),
        False,
    ),
    case("enum-methods", {"request-method": {"$enum": ["get", "head"]}}, ctx("head"), True),
    case(
        "contains-department",
        {"user": {"department": {"$contains": "inpatient"}}},
        ctx(user={"department": ["outpatient", "inpatient"]}),
        True,
    ),
    case(
        "contains-department-miss",
        {"user": {"department": {"$contains": "inpatient"}}},
        ctx(user={"department": ["outpatient"]}),
        False,
    ),
    case(
        "contains-department-not-a-list",
        {"user": {"department": {"$contains": "inpatient"}}},
        ctx(user={"department": "inpatient"}),
        False,
    ),
    case(
        "length-present-all",
        PATIENT_AND_ENCOUNTER,
        ctx(resource=[{"resourceType": "Encounter", "id": "e"}, {"resourceType": "Patient", "id": "p"}]),
        True,
    ),
    case(
        "length-present-all-three",
        PATIENT_AND_ENCOUNTER,
        ctx(resource=[{"resourceType": "Encounter"}, {"resourceType": "Patient"}, {"resourceType": "Claim"}]),
        False,
    ),
    case(
        "length-present-all-two-patients",
        PATIENT_AND_ENCOUNTER,
        ctx(resource=[{"resourceType": "Patient"}, {"resourceType": "Patient"}]),
        False,
    ),
    case(
        "practitioner-param",
        {"params": {"practitioner": ".user.data.pract_id"}},
        ctx(user=PRACTITIONER, params={"practitioner": "p1"}),
        True,
    ),
    case(
        "practitioner-param-other",
        {"params": {"practitioner": ".user.data.pract_id"}},
        ctx(user=PRACTITIONER, params={"practitioner": "p2"}),
        False,
    ),
    # The safe rule: a user without pract_id does not see every practitioner's data.
    case(
        "practitioner-param-user-without-field",
        {"params": {"practitioner": ".user.data.pract_id"}},
        ctx(user={"roles": []}, params={"practitioner": "p1"}),
        False,
    ),
    case(
        "practitioner-param-both-missing",
        {"params": {"practitioner": ".user.data.pract_id"}},
        ctx(user={"id": "u"}, params={"q": "x"}),
        False,
    ),
    case(
        "own-patient",
        {"uri": "#^/Patient/", "params": {"resource/id": ".user.data.patient_id"}},
        ctx(uri="/Patient/pt-1", params={"resource/id": "pt-1"}, user={"data": {"patient_id": "pt-1"}}),
        True,
    ),
    case("jwt-sub-not-blank", {"jwt": {"sub": "not-blank?"}}, ctx(jwt={"sub": "u1"}), True),
    case("jwt-sub-blank", {"jwt": {"sub": "not-blank?"}}, ctx(jwt={"sub": " "}), False),
    case("user-present", {"user": "present?"}, ctx(user={"id": "u"}), True),
    case("user-nil-anonymous", {"user": "nil?", "uri": "#^/public/"}, ctx(uri="/public/logo.png"), True),
    case("not-guest-doctor", NOT_GUEST, ctx(user={"data": {"role": "doctor"}}), True),
    case("not-guest-guest", NOT_GUEST, ctx(user={"data": {"role": "guest"}}), False),
    # The $not foot-gun: these two match too, though neither is a known non-guest user.
    case("not-guest-user-without-data", NOT_GUEST, ctx(user={"id": "u"}), True),
    case("not-guest-anonymous", NOT_GUEST, ctx(uri="/Patient/1"), True),
    # The fix: an ordinary key next to $not makes the user required.
    case(
        "not-guest-fixed-anonymous",
        {"user": {"id": "present?", "$not": {"data": {"role": "guest"}}}},
        ctx(uri="/Patient/1"),
        False,
    ),
]


@pytest.mark.parametrize(("pattern", "context", "expected"), AIDBOX_EXAMPLES)
def test_aidbox_examples(pattern: Any, context: dict[str, Any], expected: bool) -> None:
    assert compile_pattern(pattern)(context, context) is expected
    assert matches(pattern, context) is expected  # without a context, the value is the context


BAD_PATTERNS = [
    pytest.param({"uri": "#("}, "matcho.uri", "invalid regular expression", id="bad-regex"),
    pytest.param(
        {"user": {"roles": [{"value": "#[a-"}]}}, "matcho.user.roles[0].value", "regular", id="bad-regex-deep"
    ),
    pytest.param({"uri": "#[[:alpha:]]"}, "matcho.uri", "ambiguous regular expression", id="ambiguous-regex"),
    pytest.param({"params": {"$enm": ["a"]}}, "matcho.params.$enm", "unknown operator", id="unknown-operator"),
    pytest.param({"$contain": "a"}, "matcho.$contain", "unknown operator", id="unknown-operator-top"),
    pytest.param(
        {"m": {"$one-of": ["get"], "$not": "put"}}, "matcho.m.$one-of", "cannot be combined", id="one-of-combined-op"
    ),
    pytest.param({"$one-of": ["get"], "a": 1}, "matcho.$one-of", "cannot be combined", id="one-of-combined-key"),
    pytest.param({"$one-of": []}, "matcho.$one-of", "must not be empty", id="one-of-empty"),
    pytest.param({"$one-of": "get"}, "matcho.$one-of", "must be a list", id="one-of-not-list"),
    pytest.param({"$one-of": ["get", "#("]}, "matcho.$one-of[1]", "regular", id="one-of-bad-item"),
    pytest.param({"params": {"$enum": "get"}}, "matcho.params.$enum", "must be a list", id="enum-not-list"),
    pytest.param({"params": {"$enum": []}}, "matcho.params.$enum", "must not be empty", id="enum-empty"),
    pytest.param({"params": {"$enum": ["a", {"b": 1}]}}, "matcho.params.$enum[1]", "string, number", id="enum-map"),
    pytest.param({"params": {"$enum": ["a", None]}}, "matcho.params.$enum[1]", "string, number", id="enum-none"),
    pytest.param({"params": {"$enum": [["a"]]}}, "matcho.params.$enum[0]", "string, number", id="enum-list"),
    pytest.param({"r": {"$length": -1}}, "matcho.r.$length", "non-negative integer", id="length-negative"),
    pytest.param({"r": {"$length": "2"}}, "matcho.r.$length", "non-negative integer", id="length-str"),
    pytest.param({"r": {"$length": 2.0}}, "matcho.r.$length", "non-negative integer", id="length-float"),
    pytest.param({"r": {"$length": True}}, "matcho.r.$length", "non-negative integer", id="length-bool"),
    pytest.param({"r": {"$present-all": []}}, "matcho.r.$present-all", "must not be empty", id="present-all-empty"),
    pytest.param({"r": {"$present-all": {"a": 1}}}, "matcho.r.$present-all", "must be a list", id="present-all-map"),
    pytest.param({"r": {"$contains": {"$x": 1}}}, "matcho.r.$contains.$x", "unknown operator", id="contains-bad"),
    pytest.param({"r": {"$every": "#("}}, "matcho.r.$every", "regular", id="every-bad"),
    pytest.param({"r": {"$not": [{"$nope": 1}]}}, "matcho.r.$not[0].$nope", "unknown operator", id="not-bad"),
    pytest.param({"params": {"p": "."}}, "matcho.params.p", "empty segment", id="path-dot"),
    pytest.param({"params": {"p": "..x"}}, "matcho.params.p", "empty segment", id="path-double-dot"),
    pytest.param({"params": {"p": ".user."}}, "matcho.params.p", "empty segment", id="path-trailing-dot"),
    pytest.param({"params": {"p": ".user..id"}}, "matcho.params.p", "empty segment", id="path-inner-double-dot"),
    pytest.param({"codes": {200: "ok"}}, "matcho.codes", "must be a string", id="int-key"),
    pytest.param({True: "x"}, "matcho", "must be a string", id="yaml-yes-key"),
    pytest.param({"when": datetime.date(2024, 1, 1)}, "matcho.when", "quote YAML dates", id="yaml-date"),
    pytest.param({"blob": b"x"}, "matcho.blob", "unsupported pattern", id="bytes"),
]


@pytest.mark.parametrize(("pattern", "path", "message"), BAD_PATTERNS)
def test_pattern_errors(pattern: Any, path: str, message: str) -> None:
    with pytest.raises(PatternError) as caught:
        compile_pattern(pattern)
    assert caught.value.path == path
    assert message in caught.value.message
    assert str(caught.value) == f"{path}: {caught.value.message}"


def test_pattern_error_is_an_authz_error_and_uses_the_given_root() -> None:
    with pytest.raises(AuthzError, match=r"^policies\[2\]\.matcho\.params\.\$enum: must be a list"):
        compile_pattern({"params": {"$enum": "get"}}, path="policies[2].matcho")


def test_ambiguous_regex_is_rejected_every_time() -> None:
    # re caches compiled patterns and warns only once; a reload must not slip it through.
    for _ in range(2):
        with pytest.raises(PatternError, match="ambiguous"):
            compile_pattern("#[[:digit:]]")


def test_compiled_pattern_is_reusable_and_context_is_separate() -> None:
    matcher = compile_pattern({"sub": ".jwt.sub"})
    assert matcher({"sub": "u1"}, {"jwt": {"sub": "u1"}})
    assert not matcher({"sub": "u1"}, {"jwt": {"sub": "u2"}})
    assert not matcher({"sub": "u1"}, {})
    assert matcher({"sub": "u2"}, {"jwt": {"sub": "u2"}})


def test_matches_without_context_uses_an_empty_one_for_non_maps() -> None:
    assert not matches([".a"], ["x"])
    assert matches([".0"], ["x"], {"0": "x"})


# --------------------------------------------------------------------------- properties

# Without "#", ".", "$" or "?", a string is a plain literal as a pattern and never an operator as
# a key. A small alphabet also keeps generation fast; these properties are about structure.
plain_text = st.text("ab /_:é-", max_size=5)
plain_keys = plain_text
plain_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | plain_text


plain_json = st.recursive(
    plain_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(plain_keys, children, max_size=3),
    max_leaves=6,
)
plain_maps = st.dictionaries(plain_keys, plain_json, max_size=4)


# Anything JSON can carry, including strings that look like patterns.
any_text = st.text(max_size=8) | st.sampled_from(["#", ".", ".a", "#a", "present?", "nil?", " ", ""])
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=3),
    max_leaves=8,
)

# Small alphabets so that random patterns and values actually meet.
small_keys = st.sampled_from(["a", "b", "jwt", "sub", "roles"])
small_scalars = st.none() | st.booleans() | st.integers(-1, 2) | st.sampled_from([1.0, 0.5, "x", "y", "ab", " "])
small_json = st.recursive(
    small_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(small_keys, children, max_size=3),
    max_leaves=6,
)
small_context = st.fixed_dictionaries(
    {"jwt": st.fixed_dictionaries({"sub": small_scalars, "roles": st.lists(small_scalars, max_size=3)})}
) | st.dictionaries(small_keys, small_json, max_size=3)


def _operator(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    non_empty = st.lists(children, min_size=1, max_size=3)
    return st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(small_keys, children, max_size=3),
        st.builds(lambda p: {"$not": p}, children),
        st.builds(lambda ps: {"$one-of": ps}, non_empty),
        st.builds(lambda p: {"$contains": p}, children),
        st.builds(lambda p: {"$every": p}, children),
        st.builds(lambda ps: {"$present-all": ps}, non_empty),
        st.builds(lambda n: {"$length": n}, st.integers(0, 3)),
        st.builds(
            lambda xs: {"$enum": xs},
            st.lists(st.booleans() | st.integers(-1, 2) | st.just("x"), min_size=1, max_size=3),
        ),
        st.builds(lambda p, n: {"a": p, "$length": n}, children, st.integers(0, 2)),
    )


patterns = st.recursive(
    small_scalars
    | st.sampled_from(["present?", "nil?", "not-blank?", "#^a", "#b$", "#", ".jwt.sub", ".jwt.roles.0", ".a", ".a.b"]),
    _operator,
    max_leaves=6,
)


@st.composite
def value_and_sub_pattern(draw: st.DrawFn) -> tuple[dict[str, Any], Any]:
    value = draw(plain_maps)
    choices = random.Random(draw(st.integers(0, 2**32)))  # one draw: much faster than many

    def sub(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: sub(item) for key, item in node.items() if choices.random() < 0.7}
        if isinstance(node, list):
            return [sub(item) for item in node[: choices.randint(0, len(node))]]
        return node

    return value, sub(value)


@settings(max_examples=200, deadline=None)
@given(value_and_sub_pattern())
def test_a_map_matches_any_sub_map_of_itself(case: tuple[dict[str, Any], Any]) -> None:
    value, pattern = case
    assert matches(pattern, value, {})


@settings(max_examples=200, deadline=None)
@given(patterns, small_json, small_context)
def test_not_is_the_negation(pattern: Any, value: Any, context: dict[str, Any]) -> None:
    assert matches({"$not": pattern}, value, context) is (not matches(pattern, value, context))


@settings(max_examples=200, deadline=None)
@given(patterns, small_json, small_context)
def test_one_of_a_single_pattern_is_that_pattern(pattern: Any, value: Any, context: dict[str, Any]) -> None:
    assert matches({"$one-of": [pattern]}, value, context) is matches(pattern, value, context)


@settings(max_examples=200, deadline=None)
@given(st.lists(plain_json, max_size=4), st.integers(0, 4))
def test_a_list_matches_its_own_prefixes(value: list[Any], cut: int) -> None:
    prefix = value[:cut]
    assert matches(prefix, value, {})
    assert not matches([*value, 0], value, {})  # one element too many is never a prefix


FIXED_PATTERNS = [
    compile_pattern(p)
    for p in [
        "x",
        1,
        True,
        None,
        "#^a",
        "present?",
        "nil?",
        "not-blank?",
        ".a.0.b",
        ".a",
        {"a": {"b": ".a"}},
        [1, "#x", {"a": None}],
        {"$enum": ["x", 1, True]},
        {"$one-of": [{"a": 1}, [2], "#y"]},
        {"$contains": {"a": "present?"}},
        {"$every": {"$not": "nil?"}},
        {"$present-all": [1, {"a": ".a"}]},
        {"$length": 2, "$not": [1]},
        {"a": {"$contains": ".a"}, "$not": {"b": "nil?"}},
    ]
]


@settings(max_examples=200, deadline=None)
@given(any_json, any_json | small_context)
def test_evaluation_never_raises(value: Any, context: Any) -> None:
    for matcher in FIXED_PATTERNS:
        assert isinstance(matcher(value, context), bool)


# --------------------------------------------------------------------------- lint (check-config warnings)


def contexts() -> list[dict[str, Any]]:
    """Contexts as build_context builds them, for every kind of request and identity we can think of."""
    role = RoleConfig("r", "doctor", "u1", {"id": "r", "name": "doctor"})
    jwt = Identity("u1", {"sub": "u1", "client_id": "app", "roles": ["admin"]}, "idp", "jwt")
    opaque = Identity("u1", {"sub": "u1", "active": True}, "op", "opaque")
    found = []
    for method in ("GET", "post", "Trace", "M-SEARCH", "PROPFIND", "options"):
        for path in ("/", "/fhir/Patient/p1?x=1", "/Patient?name=a", "/public/logo.png"):
            request = HttpRequest(method=method, path=path, host="h", scheme="https", headers={"x-a": "1"})
            found.append(build_context(request, None, None))
            found.append(build_context(request, jwt, {"id": "u1"}, [role]))
            found.append(build_context(request, opaque, None))
    return found


CONTEXTS = contexts()


@pytest.mark.parametrize(
    ("matcho", "warning"),
    [
        ({"request-method": "GET"}, "matcho.request-method: 'GET' never matches: request-method is lower case"),
        (
            {"request-method": {"$enum": ["POST"]}},
            "matcho.request-method: 'POST' never matches: request-method is lower case",
        ),
        ({"request-method": "get patient"}, "matcho.request-method: 'get patient' never matches: request-method is an"),
        ({"uri": 42}, "matcho.uri: 42 never matches: uri is always a string"),
        ({"user": "u1"}, "matcho.user: 'u1' never matches: user is always a map"),
        ({"params": {"$enum": ["a"]}}, "matcho.params: 'a' never matches: params is always a map"),
        ({"roles": "doctor"}, "matcho.roles: 'doctor' never matches: roles is always a list"),
        ({"request": {"method": "get"}}, "matcho.request: no request context has 'request' (it has client, "),
        ({"body": {"resourceType": "Patient"}}, "matcho.body: no request context has 'body'"),
        ({"uri": "#/fhir/Patient"}, "matcho.uri: '#/fhir/Patient' is not anchored with '^'"),
        ({"uri": "#(?i)/fhir"}, "matcho.uri: '#(?i)/fhir' is not anchored with '^'"),
    ],
)
def test_lint_warns_about_what_no_request_context_can_match(matcho: dict[str, Any], warning: str) -> None:
    [found] = lint_rule({"matcho": matcho})
    assert found.startswith(warning), found
    if "never matches" in warning or "no request context" in warning:
        # Sound: the warning is never about a rule some context would match.
        assert not any(compile_rule({"matcho": matcho})(context) for context in CONTEXTS)


def test_lint_names_each_value_of_an_enum_that_never_matches() -> None:
    assert lint_rule({"matcho": {"request-method": {"$enum": ["get", "POST", 1]}}}) == [
        "matcho.request-method: 'POST' never matches: request-method is lower case (get, post, ...)",
        "matcho.request-method: 1 never matches: request-method is always a string",
    ]


@pytest.mark.parametrize(
    "matcho",
    [
        {"request-method": "get", "uri": "#^/fhir/Patient"},
        {"request-method": "trace"},  # any method can reach Check: only a spelling no method has warns
        {"request-method": {"$enum": ["get", "m-search"]}},
        {"request-method": ".jwt.method", "uri": "#\\A/fhir"},
        {"uri": "#(?i)^/fhir", "user": {"id": ".jwt.sub"}, "roles": ["doctor"], "role": [{"name": "doctor"}]},
        {"uri": "nil?", "jwt": "present?", "params": {"$not": {"x": "1"}}},
        {"$one-of": [{"uri": "#^/a"}, {"uri": "#^/b"}]},
        {"headers": {"x-a": "#1"}, "host": "#example", "query-string": "#x=1"},  # only `uri` regexes must be anchored
    ],
)
def test_lint_is_silent_about_rules_a_context_can_match(matcho: dict[str, Any]) -> None:
    assert lint_rule({"matcho": matcho}) == []
