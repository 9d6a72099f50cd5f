"""Access policies end to end: matcho and json-schema over the request context, users, 401 vs 403."""

from __future__ import annotations

from typing import Any

import pytest

from authz_service.devstack.idp import DevIdentityProvider
from authz_service.errors import ConfigError
from authz_service.registries import parse_config
from tests.conftest import StartService, jwks_introspector, opaque_introspector

# Aidbox's "practitioners may read patients" tutorial, pasted as it is published.
PRACTITIONER_ROLE = {
    "id": "practitioner-role",
    "resourceType": "AccessPolicy",
    "engine": "matcho",
    "matcho": {
        "user": {"roles": [{"value": "practitioner"}]},
        "uri": "#/Patient/.*",
        "request-method": "get",
    },
}
USERS = [
    {"id": "user-1", "resourceType": "User", "roles": [{"value": "practitioner"}], "data": {"practitioner_id": "pr-1"}},
    {"id": "user-2", "resourceType": "User", "roles": [{"value": "receptionist"}]},
]
PUBLIC = {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public/", "request-method": "get"}}


async def test_aidbox_tutorial_policy_same_inputs_same_decisions(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    service = await start_service(
        {
            "introspectors": [jwks_introspector(idp)],
            "policies": [PRACTITIONER_ROLE],
            "users": USERS,
        }
    )
    practitioner = idp.mint({"sub": "user-1"})
    receptionist = idp.mint({"sub": "user-2"})
    stranger = idp.mint({"sub": "user-3"})  # valid token, not in the user store
    # curl -H "Authorization: Bearer $PRACTITIONER" http://api.example.com/Patient/pt-1
    answer = await service.check("/Patient/pt-1", token=practitioner)
    assert answer.allowed
    assert answer.headers["x-user-id"] == "user-1"
    # Right user, wrong method: POST on an instance is no FHIR route, refused before policies.
    answer = await service.check("/Patient/pt-1", method="POST", token=practitioner)
    assert (answer.code, answer.http_status) == (3, 400)
    assert answer.body == {
        "error": "invalid_request",
        "error_description": "the path looks like a FHIR route but is none",
    }
    for path, method, token in [
        ("/Encounter/e-1", "GET", practitioner),  # right user, wrong resource
        ("/Patient/pt-1", "GET", receptionist),  # wrong role
        ("/Patient/pt-1", "GET", stranger),  # no User resource
    ]:
        answer = await service.check(path, method=method, token=token)
        assert (answer.code, answer.http_status) == (7, 403), (path, method)
        assert answer.body == {"error": "access_denied", "error_description": "no access policy allows this request"}
        assert "www-authenticate" not in answer.headers
    # No token at all is a 401, not a 403: the client should authenticate.
    answer = await service.check("/Patient/pt-1")
    assert (answer.code, answer.http_status) == (16, 401)


async def test_box_user_selects_the_user_resource(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service(
        {
            "introspectors": [jwks_introspector(idp)],
            "policies": [PRACTITIONER_ROLE],
            "users": USERS,
        }
    )
    answer = await service.check("/Patient/1", token=idp.mint({"sub": "user-2", "box_user": "user-1"}))
    assert answer.allowed
    assert answer.headers["x-user-id"] == "user-1"


async def test_anonymous_public_path(idp: DevIdentityProvider, start_service: StartService) -> None:
    service = await start_service(
        {
            "introspectors": [jwks_introspector(idp)],
            "response": {"claim_headers": {"email": "x-user-email"}},
            "policies": [PUBLIC, {"id": "signed-in", "engine": "matcho", "matcho": {"jwt": {"sub": "present?"}}}],
        }
    )
    # curl http://api.example.com/public/health
    answer = await service.check("/public/health", headers={"x-user-id": "admin"})
    assert answer.allowed
    assert answer.response.status.message == ""  # OK
    assert answer.headers == {}
    # Every identity header is removed, so the client's own x-user-id never reaches upstream.
    assert sorted(answer.removed) == ["x-auth-claims", "x-user-email", "x-user-id"]
    # No user, no introspector: the metadata names only the policy that allowed.
    assert answer.metadata == {"policy": "public"}
    assert (await service.check("/private")).http_status == 401
    assert (await service.check("/public/x", method="DELETE")).http_status == 401
    # An invalid token is never downgraded to anonymous, even where anonymous would be allowed.
    answer = await service.check("/public/health", token=idp.mint({"exp": 1}))
    assert answer.http_status == 401
    assert answer.response.status.message == "expired"
    # A valid token on the public path is allowed as itself, with its headers.
    answer = await service.check("/public/health", token=idp.mint({"sub": "alice"}))
    assert answer.allowed
    assert answer.headers["x-user-id"] == "alice"


async def test_json_schema_policy_with_data_pointer(idp: DevIdentityProvider, start_service: StartService) -> None:
    own_records = {
        "id": "own-records",
        "engine": "json-schema",
        "schema": {
            "required": ["params", "jwt"],
            "properties": {
                "request-method": {"constant": "get"},
                "params": {"required": ["owner"], "properties": {"owner": {"constant": {"$data": "#/jwt/sub"}}}},
            },
        },
    }
    service = await start_service({"introspectors": [jwks_introspector(idp)], "policies": [own_records]})
    token = idp.mint({"sub": "alice"})
    assert (await service.check("/records?owner=alice", token=token)).allowed
    assert (await service.check("/records?owner=bob", token=token)).http_status == 403
    assert (await service.check("/records", token=token)).http_status == 403
    assert (await service.check("/records?owner=alice", method="POST", token=token)).http_status == 403


async def test_opaque_token_context(idp: DevIdentityProvider, start_service: StartService) -> None:
    readers = {
        "id": "readers",
        "engine": "matcho",
        "matcho": {"token": {"scope": "#\\bread\\b"}, "request-method": "get"},
    }
    service = await start_service({"introspectors": [opaque_introspector(idp)], "policies": [readers]})
    assert (await service.check("/docs", token=idp.issue_opaque({"scope": "openid read"}))).allowed
    assert (await service.check("/docs", token=idp.issue_opaque({"scope": "openid write"}))).http_status == 403
    assert (await service.check("/docs", token=idp.issue_opaque({"scope": "readonly"}))).http_status == 403


async def test_policy_on_context_extensions(idp: DevIdentityProvider, start_service: StartService) -> None:
    admins = {
        "id": "admin-route",
        "engine": "matcho",
        "matcho": {"context_extensions": {"route": "admin"}, "jwt": {"roles": {"$contains": "admin"}}},
    }
    anywhere_else = {
        "id": "not-admin",
        "engine": "matcho",
        "matcho": {"context_extensions": {"$not": {"route": "admin"}}, "jwt": {"sub": "present?"}},
    }
    service = await start_service({"introspectors": [jwks_introspector(idp)], "policies": [admins, anywhere_else]})
    admin = idp.mint({"roles": ["admin"]})
    user = idp.mint({"roles": ["user"]})
    assert (await service.check("/admin", token=admin, context_extensions={"route": "admin"})).allowed
    assert (await service.check("/admin", token=user, context_extensions={"route": "admin"})).http_status == 403
    assert (await service.check("/app", token=user)).allowed


async def test_policy_scoped_to_introspectors(idp: DevIdentityProvider, start_service: StartService) -> None:
    only_opaque = {"id": "service-accounts", "engine": "allow", "introspectors": ["opaque"]}
    service = await start_service(
        {
            "introspectors": [jwks_introspector(idp), opaque_introspector(idp)],
            "policies": [only_opaque],
        }
    )
    assert (await service.check(token=idp.issue_opaque())).allowed
    assert (await service.check(token=idp.mint())).http_status == 403
    assert (await service.check()).http_status == 401  # anonymous never matches a scoped policy


async def test_policies_are_or_ed(idp: DevIdentityProvider, start_service: StartService) -> None:
    gets = {"id": "gets", "engine": "matcho", "matcho": {"request-method": "get"}}
    posts_by_admins = {
        "id": "posts",
        "engine": "matcho",
        "matcho": {"request-method": "post", "jwt": {"role": "admin"}},
    }
    service = await start_service({"introspectors": [jwks_introspector(idp)], "policies": [gets, posts_by_admins]})
    assert (await service.check(method="GET", token=idp.mint())).allowed
    assert (await service.check(method="POST", token=idp.mint({"role": "admin"}))).allowed
    assert (await service.check(method="POST", token=idp.mint({"role": "user"}))).http_status == 403


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        ({"id": "p", "engine": "matcho", "matcho": {"uri": "#(unclosed"}}, "policy 'p': matcho.uri"),
        ({"id": "p", "engine": "matcho", "matcho": {"uri": {"$typo": 1}}}, "policy 'p': matcho.uri"),
        ({"id": "p", "engine": "json-schema", "schema": {"type": "nope"}}, "policy 'p': schema.type"),
        ({"id": "p", "engine": "sql", "sql": {}}, "policy 'p': engine must be matcho, json-schema, allow or complex"),
        ({"id": "p", "engine": "matcho"}, "policy 'p': matcho is required"),
        ({"id": "p", "engine": "allow", "introspectors": ["nobody"]}, "policy 'p': introspectors must list"),
        ({"id": "p", "resourceType": "User", "engine": "allow"}, "policy 'p': resourceType must be AccessPolicy"),
        ({"engine": "allow"}, "policies[0]: id is required"),
    ],
)
def test_bad_policies_are_config_errors_naming_the_policy(policy: dict[str, Any], problem: str) -> None:
    import yaml

    with pytest.raises(ConfigError) as err:
        parse_config(yaml.safe_dump({"policies": [policy]}), {})
    assert any(str(p).startswith(problem) for p in err.value.problems), [str(p) for p in err.value.problems]


async def test_json_schema_sees_the_user_resource_as_an_object(
    idp: DevIdentityProvider, start_service: StartService
) -> None:
    # If the user reached jsonschema as anything but a dict, `properties` would be skipped and match.
    practitioners = {
        "id": "schema-role",
        "engine": "json-schema",
        "schema": {
            "required": ["user"],
            "properties": {
                "user": {"type": "object", "properties": {"roles": {"contains": {"const": {"value": "practitioner"}}}}}
            },
        },
    }
    service = await start_service(
        {"introspectors": [jwks_introspector(idp)], "policies": [practitioners], "users": USERS}
    )
    assert (await service.check(token=idp.mint({"sub": "user-1"}))).allowed
    assert (await service.check(token=idp.mint({"sub": "user-2"}))).http_status == 403
