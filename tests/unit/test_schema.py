"""The json-schema engine: draft-07, `constant` as `const`, and `$data` pointers into the context."""

from __future__ import annotations

from typing import Any

import pytest

from authz_service.policy.schema import SchemaProblem, compile_schema, json_equal, resolve_pointer

CONTEXT: dict[str, Any] = {
    "request-method": "get",
    "uri": "/Patient/pt-1",
    "params": {"resource/type": "Patient", "owner": "u-1"},
    "jwt": {"sub": "u-1", "roles": ["doctor"], "admin": True, "a/b": {"c~d": 5}},
}


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"properties": {"request-method": {"const": "get"}}}, True),
        ({"properties": {"request-method": {"const": "post"}}}, False),
        ({"properties": {"request-method": {"constant": "get"}}}, True),
        ({"properties": {"request-method": {"constant": "post"}}}, False),
        ({"required": ["jwt"], "properties": {"jwt": {"required": ["sub"]}}}, True),
        ({"required": ["user"]}, False),
        ({"properties": {"uri": {"pattern": "^/Patient/"}}}, True),
        ({"properties": {"uri": {"pattern": "^/Encounter/"}}}, False),
        ({"properties": {"params": {"properties": {"owner": {"constant": {"$data": "#/jwt/sub"}}}}}}, True),
        ({"properties": {"params": {"properties": {"owner": {"const": {"$data": "/jwt/sub"}}}}}}, True),
        ({"properties": {"params": {"properties": {"resource/type": {"constant": {"$data": "#/jwt/sub"}}}}}}, False),
        # A pointer that resolves to nothing never matches (AJV would ignore the keyword: unsafe).
        ({"properties": {"params": {"properties": {"owner": {"constant": {"$data": "#/user/id"}}}}}}, False),
        ({"properties": {"jwt": {"properties": {"admin": {"const": 1}}}}}, False),  # true is not 1
        ({"properties": {"jwt": {"properties": {"admin": {"const": True}}}}}, True),
        ({"properties": {"jwt": {"properties": {"a/b": {"properties": {"c~d": {"constant": 5}}}}}}}, True),
        ({"properties": {"jwt": {"properties": {"roles": {"contains": {"const": "doctor"}}}}}}, True),
    ],
)
def test_schema_cases(schema: dict[str, Any], expected: bool) -> None:
    assert compile_schema(schema)(CONTEXT) is expected


def test_aidbox_docs_example() -> None:
    # Aidbox's json-schema example: params.resource/type must be present and equal Organization.
    schema = {
        "properties": {
            "params": {"required": ["resource/type"], "properties": {"resource/type": {"const": "Organization"}}}
        }
    }
    evaluate = compile_schema(schema)
    assert evaluate({"params": {"resource/type": "Organization"}})
    assert not evaluate({"params": {"resource/type": "Patient"}})
    assert not evaluate({"params": {}})


def test_pointer_escapes_and_indices() -> None:
    assert resolve_pointer(CONTEXT, "#/jwt/a~1b/c~0d") == 5
    assert resolve_pointer(CONTEXT, "#/jwt/roles/0") == "doctor"
    assert resolve_pointer(CONTEXT, "#") is CONTEXT
    assert resolve_pointer(CONTEXT, "#/jwt/roles/7") is not None  # the unresolved marker, not a value
    assert (
        compile_schema({"properties": {"x": {"const": {"$data": "#/jwt/roles/7"}}}, "required": ["x"]})({"x": None})
        is False
    )


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "no-such-type"}, "schema.type"),
        ({"properties": {"a": {"minLength": -1}}}, "schema.properties.a.minLength"),
        ({"properties": {"a": {"constant": {"$data": "jwt.sub"}}}}, "schema.properties.a.constant"),
        ("not a schema", "schema"),
    ],
)
def test_bad_schemas_are_rejected_with_their_location(schema: Any, where: str) -> None:
    with pytest.raises(SchemaProblem) as err:
        compile_schema(schema)
    assert err.value.path == where


def test_json_equal() -> None:
    assert json_equal(1, 1.0)
    assert not json_equal(True, 1)
    assert not json_equal(0, False)
    assert json_equal({"a": [1, True]}, {"a": [1.0, True]})
    assert not json_equal({"a": [1]}, {"a": [True]})
    assert not json_equal("1", 1)
