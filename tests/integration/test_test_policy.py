"""POST /auth/test-policy on a real service: Check's decision for a described request, why each policy
did or did not allow, nothing secret in the answer, and the two route-parameter attacks of issue 14."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from authz_service.devstack.idp import DevIdentityProvider
from tests.api_harness import ApiService
from tests.conftest import StartApi, jwks_introspector
from tests.unit import test_aidbox_examples as aidbox

# Aidbox, "Restricting access to patient data": the AccessPolicy as the tutorial PUTs it (verbatim
# in the catalogue of Aidbox's examples).
PATIENT_COMPARTMENT = json.loads(aidbox.TEXTS["PATIENT_COMPARTMENT"])

# Aidbox, "AccessPolicy examples" 6 (accesspolicy-examples.md): CRUD on Patient and Practitioner.
CRUD_ON_PATIENT: dict[str, Any] = {
    "id": "as-client-id-crud-patients-and-practitioners",
    "resourceType": "AccessPolicy",
    "engine": "matcho",
    "link": [{"reference": "Client/client-id"}],
    "description": "Policy that allows a client-id to do CRUD on Patient and Practitioner resources",
    "matcho": {
        "params": {"resource/type": {"$enum": ["Patient", "Practitioner"]}},
        "request-method": {"$enum": ["get", "post", "patch", "put"]},
    },
}

ADMINS = {"id": "admins", "engine": "matcho", "matcho": {"uri": "#^/admin/", "jwt": {"roles": {"$contains": "admin"}}}}


async def ask(service: ApiService, body: Mapping[str, Any]) -> dict[str, Any]:
    reply = await service.request("POST", "/auth/test-policy", dict(body))
    assert reply.status == 200, reply.body
    assert isinstance(reply.body, dict)
    return reply.body


def verdicts(answer: Mapping[str, Any]) -> dict[str, tuple[bool, list[str]]]:
    return {p["id"]: (p["matched"], p["why"]) for p in answer["policies"]}


async def test_forbidden_request_is_explained_policy_by_policy(idp: DevIdentityProvider, start_api: StartApi) -> None:
    service = await start_api(introspectors=[jwks_introspector(idp)], policies=[PATIENT_COMPARTMENT, ADMINS])
    token = idp.mint({"sub": "pat-1", "pid": "pt-1"})
    # curl -H "Authorization: Bearer $TOKEN" https://api.example.com/fhir/Patient/pt-2
    assert (await service.check("/fhir/Patient/pt-2", token=token)).http_status == 403
    answer = await ask(
        service,
        {"request": {"method": "GET", "path": "/fhir/Patient/pt-2", "headers": {"authorization": f"Bearer {token}"}}},
    )
    assert answer["decision"] == "forbidden"
    assert answer["reason"] == "forbidden"
    assert answer["policy"] is None
    assert answer["user_id"] == "pat-1"
    assert answer["introspector"] == "idp"
    found = verdicts(answer)
    assert found["allow-to-get-patient-compartment"] == (
        False,
        ["params.resource/id: 'pt-2' is not #/jwt/pid ('pt-1')"],
    )
    assert found["admins"] == (False, ["uri: '/fhir/Patient/pt-2' does not match '#^/admin/'"])
    # The context as policies saw it, route parameters included, with the token taken out.
    context = answer["context"]
    assert context["params"] == {"resource/type": "Patient", "resource/id": "pt-2"}
    assert context["operation"] == {"id": "FhirRead"}
    assert context["jwt"]["pid"] == "pt-1"
    assert context["headers"]["authorization"] == "<redacted>"
    assert token not in json.dumps(answer)


async def test_allowed_request_names_the_policy_as_check_does(idp: DevIdentityProvider, start_api: StartApi) -> None:
    service = await start_api(introspectors=[jwks_introspector(idp)], policies=[ADMINS, PATIENT_COMPARTMENT])
    token = idp.mint({"sub": "pat-1", "pid": "pt-1"})
    checked = await service.check("/fhir/Patient/pt-1", token=token)
    assert checked.allowed
    assert checked.metadata["policy"] == "allow-to-get-patient-compartment"
    answer = await ask(
        service,
        {"request": {"method": "GET", "path": "/fhir/Patient/pt-1", "headers": {"Authorization": f"Bearer {token}"}}},
    )
    assert (answer["decision"], answer["reason"], answer["policy"]) == (
        "allow",
        "allowed",
        "allow-to-get-patient-compartment",
    )
    assert verdicts(answer)["allow-to-get-patient-compartment"] == (True, [])
    assert verdicts(answer)["admins"][0] is False


async def test_the_two_route_parameter_attacks_are_denied(idp: DevIdentityProvider, start_api: StartApi) -> None:
    service = await start_api(introspectors=[jwks_introspector(idp)], policies=[CRUD_ON_PATIENT, PATIENT_COMPARTMENT])
    client = idp.mint({"sub": "svc", "client_id": "client-id"})
    # CRUD on Patient does not reach Observation by naming the type in the query.
    # curl -H "Authorization: Bearer $TOKEN" 'https://api.example.com/fhir/Observation?resource/type=Patient'
    assert (await service.check("/fhir/Patient", token=client)).allowed
    attack = await service.check("/fhir/Observation?resource/type=Patient", token=client)
    assert attack.http_status == 403
    answer = await ask(
        service,
        {
            "request": {
                "method": "GET",
                "path": "/fhir/Observation?resource/type=Patient",
                "headers": {"authorization": f"Bearer {client}"},
            }
        },
    )
    assert answer["decision"] == "forbidden"
    assert answer["context"]["params"] == {"resource/type": "Observation"}
    assert verdicts(answer)[CRUD_ON_PATIENT["id"]] == (
        False,
        ['params.resource/type: \'Observation\' is not one of ["Patient", "Practitioner"]'],
    )
    # pid pt-1 does not read pt-2, not even by adding resource/id=pt-1 to the query.
    patient = idp.mint({"sub": "pat-1", "pid": "pt-1"})
    assert (await service.check("/fhir/Patient/pt-1", token=patient)).allowed
    assert (await service.check("/fhir/Patient/pt-2", token=patient)).http_status == 403
    assert (await service.check("/fhir/Patient/pt-2?resource/id=pt-1", token=patient)).http_status == 403


async def test_aidbox_spellings_and_policies_to_try(idp: DevIdentityProvider, start_api: StartApi) -> None:
    service = await start_api(introspectors=[jwks_introspector(idp)], policies=[ADMINS])
    token = idp.mint({"sub": "u1", "roles": ["reader"]})
    # Aidbox's body: request.uri and request-method, one `policy` without an id.
    answer = await ask(
        service,
        {
            "request": {
                "uri": "/fhir/Patient",
                "request-method": "get",
                "headers": {"authorization": f"Bearer {token}"},
            },
            "policy": {"engine": "matcho", "matcho": {"uri": "/fhir/Patient", "request-method": "get"}},
        },
    )
    assert (answer["decision"], answer["policy"]) == ("allow", "policies[0]")
    assert [p["id"] for p in answer["policies"]] == ["policies[0]"]
    # A complex policy to try: its failing branch is named.
    answer = await ask(
        service,
        {
            "request": {
                "method": "DELETE",
                "path": "/fhir/Patient/p1",
                "headers": {"authorization": f"Bearer {token}"},
            },
            "policies": [
                {
                    "id": "readers",
                    "engine": "complex",
                    "and": [
                        {"engine": "matcho", "matcho": {"jwt": {"roles": {"$contains": "reader"}}}},
                        {"or": [{"engine": "matcho", "matcho": {"request-method": "get"}}]},
                    ],
                }
            ],
        },
    )
    assert answer["decision"] == "forbidden"
    assert verdicts(answer)["readers"] == (False, ["and[1].or[0] (matcho): request-method: 'delete' is not 'get'"])
    # The stored policies are untouched by what was tried.
    assert (await service.check("/fhir/Patient", token=token)).http_status == 403


async def test_invalid_bodies_are_named(idp: DevIdentityProvider, start_api: StartApi) -> None:
    service = await start_api(introspectors=[jwks_introspector(idp)], policies=[ADMINS])
    sql = {"policies": [{"id": "p", "engine": "sql", "sql": {"query": "select true"}}], "request": {"path": "/"}}
    reply = await service.request("POST", "/auth/test-policy", sql)
    assert reply.status == 422
    assert reply.diagnostics == [
        "policy 'p': engine must be matcho, json-schema, allow or complex, got 'sql' (sql queries Aidbox's "
        "database, which an ext_authz service does not have; express the check over the request context "
        "with matcho or json-schema)"
    ]
    reply = await service.request("POST", "/auth/test-policy", {"request": {"path": "/", "user-id": "u1"}})
    assert reply.status == 422
    assert "request.user-id" in reply.diagnostics[0]
    reply = await service.request("POST", "/auth/test-policy", "request: [", content_type="text/yaml")
    assert reply.status == 400
    reply = await service.request("POST", "/auth/test-policy", {"request": {"method": "GET"}})
    assert reply.status == 422
    assert reply.diagnostics == ["request.path: is required and must start with /"]
    reply = await service.request("GET", "/auth/test-policy")
    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"
    reply = await service.request("POST", "/auth/test-policy", {"request": {"path": "/"}}, token=None)
    assert reply.status == 401


PROOF = "eyJ0eXAiOiJkcG9wK2p3dCJ9.eyJqdGkiOiJwcm9vZiJ9.c2lnbmF0dXJl"


async def test_no_secret_reaches_the_answer(idp: DevIdentityProvider, start_api: StartApi) -> None:
    introspector = jwks_introspector(
        idp, from_headers=[{"name": "x-api-token"}], from_params=["access_token"], cookie="session"
    )
    service = await start_api(
        introspectors=[introspector],
        policies=[{"id": "echo", "engine": "matcho", "matcho": {"headers": {"x-trace": "#^never"}}}],
    )
    for where in ("header", "param", "cookie", "authorization"):
        token = idp.mint({"sub": f"via-{where}"})
        headers = {"x-trace": f"trace-{token}", "proxy-authorization": "Basic c2VjcmV0LXZhbHVl", "dpop": PROOF}
        path = "/fhir/Patient"
        if where == "header":
            headers["x-api-token"] = token
        elif where == "param":
            path += f"?access_token={token}&x=1"
        elif where == "cookie":
            headers["cookie"] = f"theme=dark; session={token}"
        else:
            headers["authorization"] = f"Bearer {token}"
        answer = await ask(service, {"request": {"method": "GET", "path": path, "headers": headers}})
        assert answer["user_id"] == f"via-{where}", answer
        text = json.dumps(answer)
        assert token not in text
        assert "c2VjcmV0LXZhbHVl" not in text
        assert PROOF not in text  # a DPoP proof is a credential too
        # The one reason quotes the header that carried the token inside it: scrubbed, not dropped.
        [reason] = verdicts(answer)["echo"][1]
        assert reason == "headers.x-trace: 'trace-<redacted>' does not match '#^never'"


async def test_rejected_and_anonymous_requests(idp: DevIdentityProvider, start_api: StartApi) -> None:
    public = {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public/", "request-method": "get"}}
    service = await start_api(introspectors=[jwks_introspector(idp)], policies=[public, ADMINS])
    expired = idp.mint({"sub": "u1", "exp": 1})
    answer = await ask(service, {"request": {"path": "/public/x", "headers": {"authorization": f"Bearer {expired}"}}})
    assert (answer["decision"], answer["reason"]) == ("unauthenticated", "expired")
    assert all(
        p["why"][0].startswith("not asked: the request is unauthenticated (expired)") for p in answer["policies"]
    )
    # No token: anonymous, and the policies are asked as Check asks them.
    answer = await ask(service, {"request": {"path": "/public/x"}})
    assert (answer["decision"], answer["reason"], answer["policy"]) == ("allow", "anonymous", "public")
    answer = await ask(service, {"request": {"path": "/private"}})
    assert (answer["decision"], answer["reason"]) == ("unauthenticated", "missing_token")
    assert verdicts(answer)["public"] == (False, ["uri: '/private' does not match '#^/public/'"])
    assert verdicts(answer)["admins"] == (False, ["uri: '/private' does not match '#^/admin/'"])


async def test_supplied_identity_decides_without_a_token(idp: DevIdentityProvider, start_api: StartApi) -> None:
    service = await start_api(
        introspectors=[jwks_introspector(idp)],
        policies=[{"id": "doctors", "roleName": "doctor", "engine": "allow"}],
        users=[{"id": "alice"}],
        roles=[{"id": "r1", "name": "doctor", "user": {"id": "alice"}}],
    )
    claims = {"introspector": "idp", "claims": {"sub": "alice"}}
    answer = await ask(service, {"request": {"path": "/fhir/Patient"}, "identity": claims})
    assert (answer["decision"], answer["policy"], answer["user_id"]) == ("allow", "doctors", "alice")
    assert answer["context"]["roles"] == ["doctor"]
    assert answer["context"]["role"] == [{"id": "r1", "name": "doctor", "user": {"id": "alice"}}]
    claims = {"introspector": "idp", "claims": {"sub": "bob"}}
    answer = await ask(service, {"request": {"path": "/fhir/Patient"}, "identity": claims})
    assert answer["decision"] == "forbidden"
    assert verdicts(answer)["doctors"] == (
        False,
        ["roleName: applies only to users holding a Role named 'doctor'; no known user"],
    )
    reply = await service.request(
        "POST", "/auth/test-policy", {"request": {"path": "/"}, "identity": {"introspector": "nope", "claims": {}}}
    )
    assert reply.status == 422
    assert len(reply.diagnostics) == 2
