"""The effective config (the file plus the store's resources), secrets left out, JSON-shaped data."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from authz_service.config.model import JwtIntrospectorConfig
from authz_service.errors import ConfigError
from authz_service.store.audit import allows_everything, digest, secrets_changed
from authz_service.store.base import Key, Snapshot, id_problem, normalized
from authz_service.store.resources import compose, config_file, json_problem, shadowed, without_secrets

SECRET = "0123456789abcdef0123456789abcdef"
FILE = f"""\
introspectors:
  - id: file-jwt
    type: jwt
    jwt: {{iss: "${{ISSUER}}", secret: {SECRET}}}
policies:
  - id: file-policy
    engine: matcho
    matcho: {{uri: '#^/public'}}
"""
ENV = {"ISSUER": "https://file.example.com"}


def store(*resources: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    return {(r["resourceType"], r["id"]): r for r in resources}


def test_store_resources_follow_the_files_in_id_order() -> None:
    file = config_file(FILE, ENV)
    resources = store(
        {"resourceType": "AccessPolicy", "id": "b", "engine": "allow"},
        {"resourceType": "AccessPolicy", "id": "a", "engine": "allow", "introspectors": ["file-jwt"]},
        {"resourceType": "User", "id": "u", "name": "Ann"},
        {"resourceType": "Role", "id": "r", "name": "admin", "user": {"id": "u"}},
    )
    config = compose(file, resources)
    assert [p.id for p in config.policies] == ["file-policy", "a", "b"]
    first = config.introspectors[0]
    assert isinstance(first, JwtIntrospectorConfig)
    assert first.iss == "https://file.example.com"  # the file is env-expanded
    assert dict(config.users["u"]) == {"resourceType": "User", "id": "u", "name": "Ann"}
    assert [r.id for r in config.roles] == ["r"]
    assert compose(file, {}) is file.config


def test_store_resources_are_not_env_expanded() -> None:
    file = config_file(FILE, ENV)
    resources = store(
        {"resourceType": "User", "id": "u", "home": "${HOME}", "issuer": "${ISSUER}"},
        {
            "resourceType": "TokenIntrospector",
            "id": "api",
            "type": "jwt",
            "jwt": {"iss": "${ISSUER}", "secret": "${SECRET_FROM_ENV}" + "x" * 32},
        },
    )
    config = compose(file, resources)
    assert config.users["u"]["home"] == "${HOME}"
    assert config.users["u"]["issuer"] == "${ISSUER}"
    api = next(i for i in config.introspectors if i.id == "api")
    assert isinstance(api, JwtIntrospectorConfig)
    assert api.iss == "${ISSUER}"  # literally: a different issuer from the file's


def test_invalid_combinations_list_check_config_problems() -> None:
    file = config_file(FILE, ENV)
    resources = store(
        {"resourceType": "AccessPolicy", "id": "p", "engine": "allow", "introspectors": ["missing"]},
        {
            "resourceType": "TokenIntrospector",
            "id": "dup-iss",
            "type": "jwt",
            "jwt": {"iss": ENV["ISSUER"], "secret": SECRET},
        },
    )
    with pytest.raises(ConfigError) as caught:
        compose(file, resources)
    assert [str(p) for p in caught.value.problems] == [
        "introspector 'dup-iss': jwt.iss is already claimed by introspector 'file-jwt'",
        "policy 'p': introspectors must list configured introspector ids, unknown: ['missing']",
    ]


def test_ids_the_file_defines_win() -> None:
    file = config_file(FILE, ENV)
    resources = store({"resourceType": "AccessPolicy", "id": "file-policy", "engine": "allow"})
    assert shadowed(file, resources) == [("AccessPolicy", "file-policy")]
    (policy,) = compose(file, resources).policies
    assert policy.engine == "matcho"
    assert file.ids("AccessPolicy") == {"file-policy"}
    assert file.resource("TokenIntrospector", "file-jwt") == {
        "resourceType": "TokenIntrospector",
        "id": "file-jwt",
        "type": "jwt",
        "jwt": {"iss": "https://file.example.com", "secret": SECRET},
    }


def test_secrets_are_left_out_of_what_is_shown() -> None:
    resource: dict[str, Any] = {
        "resourceType": "TokenIntrospector",
        "id": "x",
        "jwt": {"iss": "i", "secret": "s", "keys": [{"kty": "OCT", "k": "k1"}, {"kty": "RSA", "pub": "p"}, "odd"]},
        "introspection_endpoint": {"url": "u", "authorization": "Basic x"},
    }
    shown = without_secrets("TokenIntrospector", resource)
    assert shown == {
        "resourceType": "TokenIntrospector",
        "id": "x",
        "jwt": {"iss": "i", "keys": [{"kty": "OCT"}, {"kty": "RSA", "pub": "p"}, "odd"]},
        "introspection_endpoint": {"url": "u"},
    }
    assert resource["jwt"]["secret"] == "s"  # a copy: the stored resource is untouched
    assert without_secrets("User", {"id": "u", "password": "p", "twoFactor": {"secretKey": "k"}}) == {"id": "u"}
    assert without_secrets("TokenIntrospector", {"id": "x", "jwt": "not a mapping"}) == {
        "id": "x",
        "jwt": "not a mapping",
    }


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": [1, 2.5, None, True, "x", {"b": {}}]}, None),
        ({1: "x"}, "the resource has the key 1, which is not a string (quote it)"),
        ({"a": float("nan")}, "a is nan, which JSON cannot hold"),
        ({"a": [b"x"]}, "a[0] is a YAML bytes, not JSON data (quote it to make it a string)"),
        ({"a": {"b": {1, 2}}}, "a.b is a YAML set, not JSON data (quote it to make it a string)"),
    ],
)
def test_only_json_shaped_data(value: Any, problem: str | None) -> None:
    assert json_problem(value) == problem


@pytest.mark.parametrize(
    ("ident", "problem"),
    [
        ("a-Z.0", None),
        ("x" * 64, None),
        ("x" * 65, "must be at most 64 characters, got 65"),
        ("", "must be a non-empty string"),
        (7, "must be a non-empty string"),
        ("..", "must not be '.' or '..'"),
        ("a/b", "may only contain letters, digits, '-' and '.'"),
        ("a\x00", "may only contain letters, digits, '-' and '.'"),
        ("a_b", "may only contain letters, digits, '-' and '.'"),
    ],
)
def test_ids_are_fhir_ids(ident: Any, problem: str | None) -> None:
    assert id_problem(ident) == problem


def test_resources_are_stored_with_type_and_id_first() -> None:
    assert list(normalized("User", "u", {"name": "n", "id": "u", "resourceType": "User"})) == [
        "resourceType",
        "id",
        "name",
    ]
    snapshot = Snapshot("1", store({"resourceType": "User", "id": "b"}, {"resourceType": "User", "id": "a"}))
    assert [r["id"] for r in snapshot.of_type("User")] == ["a", "b"]


# -- what a write through the API leaves in the log (store/audit.py) ---------------------------


@pytest.mark.parametrize(
    ("policy", "why"),
    [
        ({"engine": "allow"}, "engine: allow"),
        ({"engine": "matcho", "matcho": {}}, "matcho: {}"),
        ({"engine": "json-schema", "schema": True}, "schema: true"),
        ({"engine": "json-schema", "schema": {}}, "schema: {}"),
        ({"engine": "json-schema", "schema": {"description": "x"}}, "a schema with no constraint"),
        (
            {"engine": "complex", "and": [{"engine": "allow"}, {"or": [{"engine": "matcho", "matcho": {}}]}]},
            "complex and: every item matches everything (engine: allow)",
        ),
        (
            {"engine": "complex", "or": [{"engine": "matcho", "matcho": {"uri": "/a"}}, {"engine": "allow"}]},
            "complex or: an item matches everything (engine: allow)",
        ),
        ({"engine": "matcho", "matcho": {"uri": "/a"}}, None),
        ({"engine": "json-schema", "schema": {"required": ["jwt"]}}, None),
        ({"engine": "json-schema", "schema": False}, None),
        ({"engine": "complex", "and": [{"engine": "allow"}, {"engine": "matcho", "matcho": {"uri": "/a"}}]}, None),
        ({"engine": "complex", "or": []}, None),
        ({"engine": "nope"}, None),
    ],
)
def test_policies_that_allow_everything_are_recognized(policy: dict[str, Any], why: str | None) -> None:
    found = allows_everything({"resourceType": "AccessPolicy", "id": "p", **policy})
    if why is None:
        assert found is None
    else:
        assert found == f"its rule ({why}) allows every request, even one without a token"


def test_a_scoped_policy_says_its_scope() -> None:
    found = allows_everything({"id": "p", "engine": "allow", "introspectors": ["idp"], "roleName": "admin"})
    assert (
        found == "its rule (engine: allow) allows every request it applies to (introspectors ['idp'], roleName 'admin')"
    )
    assert allows_everything({"resourceType": "User", "id": "u", "engine": "allow"}) is None


def test_digests_are_of_the_resource_as_get_shows_it() -> None:
    introspector = {
        "resourceType": "TokenIntrospector",
        "id": "i",
        "type": "jwt",
        "jwt": {"iss": "x", "secret": SECRET},
    }
    shown = without_secrets("TokenIntrospector", introspector)
    expected = "sha256:" + hashlib.sha256(json.dumps(shown, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert digest("TokenIntrospector", introspector) == expected[: len("sha256:") + 16]
    assert digest("TokenIntrospector", None) is None
    # Key order does not matter; a rotated secret leaves the digest and says so.
    reordered = {"jwt": {"secret": SECRET, "iss": "x"}, "type": "jwt", "id": "i", "resourceType": "TokenIntrospector"}
    assert digest("TokenIntrospector", reordered) == digest("TokenIntrospector", introspector)
    rotated = {**introspector, "jwt": {"iss": "x", "secret": SECRET[::-1]}}
    assert digest("TokenIntrospector", rotated) == digest("TokenIntrospector", introspector)
    assert secrets_changed("TokenIntrospector", introspector, rotated)
    assert not secrets_changed("TokenIntrospector", introspector, introspector)
    assert not secrets_changed("TokenIntrospector", None, rotated)
    assert not secrets_changed("TokenIntrospector", introspector, {**introspector, "jwt": {"iss": "y", "secret": "z"}})
