"""Role resources and AccessPolicy scoping by `roleName` and `link`, as Aidbox has them.

A policy with `roleName` applies only to users holding a Role of that name; one with `link`
only to requests of a linked user, client or operation; with both, both must hold. Roles belong
to users the config knows: a Role naming an unknown user gives nobody anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from authz_service.config.model import Config
from authz_service.decide import Authorizer
from authz_service.engine import build_engine
from authz_service.errors import ConfigError
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason
from authz_service.registries import parse_config
from authz_service.tokens.cache import CacheFactory
from authz_service.tokens.sources import CredentialFinder
from tests.unit.fakes import FakeIdpClient, FakeIntrospector, hs_token

USERS = """\
users:
  - {id: alice, name: Alice, roles: [{value: from-the-user-resource}]}
  - {id: bob}
  - {id: carol}
"""
ROLES = """\
roles:
  - {resourceType: Role, id: r-doctor, name: doctor, user: {id: alice}, links: {practitioner: {id: pr-1}}, note: ''}
  - {id: r-nurse, name: nurse, user: {reference: User/bob}}
  - {id: r-carol, name: doctor, user: {resourceType: User, id: carol}}
  - {id: r-ghost, name: doctor, user: {id: ghost}}
  - {id: r-alice-admin, name: admin, user: {reference: User/alice}}
"""


def authorizer(policies: str, users: str = USERS, roles: str = ROLES) -> Authorizer:
    config = parse_config(users + roles + "policies:\n" + policies, {})
    return Authorizer(CredentialFinder(), FakeIntrospector("idp"), config.policies, config.users, config.roles)


def request(path: str = "/fhir/Patient/pt-1", method: str = "GET") -> HttpRequest:
    # curl -X $METHOD -H "Authorization: Bearer $TOKEN" http://api.example.com$PATH
    return HttpRequest(method=method, path=path, host="api.example.com")


def identity(user_id: str | None, **claims: Any) -> Identity:
    return Identity(user_id, {"sub": user_id, **claims} if user_id else claims, "idp", "jwt")


def decide(auth: Authorizer, user_id: str | None, path: str = "/fhir/Patient/pt-1", **claims: Any) -> Decision:
    return auth.decide(request(path), identity(user_id, **claims))


def allowed_by(decision: Decision) -> str | None:
    return decision.policy if decision.outcome is Outcome.ALLOW else None


# --------------------------------------------------------------------------- roleName


def test_role_name_applies_only_to_users_holding_a_role_of_that_name() -> None:
    auth = authorizer("  - {id: doctors, engine: allow, roleName: doctor}\n")
    assert allowed_by(decide(auth, "alice")) == "doctors"  # Role.user {id: alice}
    assert allowed_by(decide(auth, "carol")) == "doctors"  # Role.user {resourceType: User, id: carol}
    bob = decide(auth, "bob")  # a nurse
    assert (bob.outcome, bob.reason, bob.policy) == (Outcome.FORBIDDEN, Reason.FORBIDDEN, None)


def test_role_user_as_a_reference() -> None:
    auth = authorizer("  - {id: nurses, engine: allow, roleName: nurse}\n")
    assert allowed_by(decide(auth, "bob")) == "nurses"  # Role.user {reference: User/bob}
    assert decide(auth, "alice").outcome is Outcome.FORBIDDEN


def test_an_unknown_user_has_no_roles_even_when_a_role_names_it() -> None:
    auth = authorizer("  - {id: doctors, engine: allow, roleName: doctor}\n")
    assert decide(auth, "ghost").outcome is Outcome.FORBIDDEN
    context = auth.context(request(), identity("ghost"))
    assert not {"user", "roles", "role"} & context.keys()


def test_role_name_never_applies_to_anonymous_requests() -> None:
    auth = authorizer("  - {id: doctors, engine: allow, roleName: doctor}\n")
    decision = auth.decide(request(), None)
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN)


def test_a_role_name_policy_still_needs_its_rule_to_match() -> None:
    auth = authorizer("  - {id: doctors-read, engine: matcho, roleName: doctor, matcho: {request-method: get}}\n")
    assert allowed_by(decide(auth, "alice")) == "doctors-read"
    assert auth.decide(request(method="DELETE"), identity("alice")).outcome is Outcome.FORBIDDEN


def test_the_context_has_role_names_and_role_resources() -> None:
    auth = authorizer("  - {id: doctors, engine: allow, roleName: doctor}\n")
    context = auth.context(request(), identity("alice"))
    assert context["roles"] == ["doctor", "admin"]  # in config order
    assert [dict(role) for role in context["role"]] == [
        {  # the Role as written, empty values removed
            "resourceType": "Role",
            "id": "r-doctor",
            "name": "doctor",
            "user": {"id": "alice"},
            "links": {"practitioner": {"id": "pr-1"}},
        },
        # A FHIR reference also in Aidbox's format, as Aidbox stores it: `.role.1.user.id` reads alice.
        {
            "id": "r-alice-admin",
            "name": "admin",
            "user": {"reference": "User/alice", "resourceType": "User", "id": "alice"},
        },
    ]
    # the User resource's own fields are left as they are
    assert dict(context["user"]) == {"id": "alice", "name": "Alice", "roles": [{"value": "from-the-user-resource"}]}
    assert "roles" not in auth.context(request(), identity("bob", azp="web")).get("user", {})
    assert auth.context(request(), identity("bob"))["roles"] == ["nurse"]


def test_policies_can_read_roles_from_the_context() -> None:
    auth = authorizer(
        "  - {id: practitioners, engine: matcho, matcho: {role: {$contains: {links: {practitioner: present?}}}}}\n"
        "  - {id: admins, engine: matcho, matcho: {roles: {$contains: admin}}}\n"
    )
    assert allowed_by(decide(auth, "alice")) == "practitioners"
    assert decide(auth, "bob").outcome is Outcome.FORBIDDEN


# --------------------------------------------------------------------------- link


@pytest.mark.parametrize("link", ["{reference: User/bob}", "{resourceType: User, id: bob}"])
def test_a_user_link_applies_only_to_that_user(link: str) -> None:
    auth = authorizer(f"  - {{id: bobs, engine: allow, link: [{link}]}}\n")
    assert allowed_by(decide(auth, "bob")) == "bobs"
    assert decide(auth, "alice").outcome is Outcome.FORBIDDEN
    assert auth.decide(request(), None).outcome is Outcome.UNAUTHENTICATED


def test_a_link_to_a_user_the_config_does_not_know_matches_nobody() -> None:
    auth = authorizer("  - {id: ghosts, engine: allow, link: [{reference: User/ghost}]}\n")
    assert decide(auth, "ghost").outcome is Outcome.FORBIDDEN  # a token for it: no User, so no user
    assert decide(auth, "alice").outcome is Outcome.FORBIDDEN


def test_a_client_link_reads_client_id_then_azp() -> None:
    auth = authorizer("  - {id: web-app, engine: allow, link: [{reference: Client/web}]}\n")
    assert allowed_by(decide(auth, "alice", client_id="web")) == "web-app"
    assert allowed_by(decide(auth, "alice", azp="web")) == "web-app"
    assert allowed_by(decide(auth, None, azp="web")) == "web-app"  # a client credentials token: no user
    assert decide(auth, "alice", client_id="batch", azp="web").outcome is Outcome.FORBIDDEN  # client_id wins
    assert decide(auth, "alice").outcome is Outcome.FORBIDDEN
    assert decide(auth, "alice", client_id="web-2").outcome is Outcome.FORBIDDEN


def test_an_operation_link_applies_to_that_operation() -> None:
    auth = authorizer("  - {id: reads, engine: allow, link: [{resourceType: Operation, id: FhirRead}]}\n")
    assert allowed_by(decide(auth, "bob", "/fhir/Patient/pt-1")) == "reads"
    assert decide(auth, "bob", "/fhir/Patient").outcome is Outcome.FORBIDDEN  # FhirSearch
    assert decide(auth, "bob", "/Patient/pt-1").outcome is Outcome.FORBIDDEN  # Read, not FhirRead
    assert decide(auth, "bob", "/healthz").outcome is Outcome.FORBIDDEN  # no operation at all
    # Aidbox's way to make an operation public: anonymous reads are allowed too
    anonymous = auth.decide(request("/fhir/Observation/o-1"), None)
    assert (anonymous.outcome, anonymous.reason, anonymous.policy) == (Outcome.ALLOW, Reason.ANONYMOUS, "reads")


def test_a_policy_with_several_links_applies_to_any_of_them() -> None:
    auth = authorizer(
        "  - id: mixed\n"
        "    engine: allow\n"
        "    link: [{reference: User/bob}, {reference: Client/web}, {reference: Operation/FhirSearch}]\n"
    )
    assert allowed_by(decide(auth, "bob")) == "mixed"
    assert allowed_by(decide(auth, "alice", azp="web")) == "mixed"
    assert allowed_by(decide(auth, "alice", "/fhir/Patient")) == "mixed"
    assert decide(auth, "alice").outcome is Outcome.FORBIDDEN


def test_role_name_and_link_together_both_must_hold() -> None:
    auth = authorizer("  - {id: both, engine: allow, roleName: doctor, link: [{reference: User/carol}]}\n")
    assert allowed_by(decide(auth, "carol")) == "both"  # a doctor, and linked
    assert decide(auth, "alice").outcome is Outcome.FORBIDDEN  # a doctor, not linked
    linked_nurse = authorizer("  - {id: both, engine: allow, roleName: doctor, link: [{reference: User/bob}]}\n")
    assert decide(linked_nurse, "bob").outcome is Outcome.FORBIDDEN  # linked, not a doctor


def test_the_decision_names_the_first_policy_that_allows() -> None:
    auth = authorizer(
        "  - {id: nurses, engine: allow, roleName: nurse}\n"
        "  - {id: carols, engine: allow, link: [{reference: User/carol}]}\n"
        "  - {id: doctors, engine: allow, roleName: doctor}\n"
        "  - {id: everyone, engine: allow}\n"
    )
    assert decide(auth, "bob").policy == "nurses"
    assert decide(auth, "carol").policy == "carols"
    assert decide(auth, "alice").policy == "doctors"
    assert decide(auth, "ghost").policy == "everyone"


def test_other_policies_keep_the_users_roles() -> None:
    auth = authorizer("  - {id: nobody, engine: matcho, matcho: {uri: /never}}\n")
    doctors = parse_config("policies: [{id: doctors, engine: allow, roleName: doctor}]\n", {}).policies
    assert allowed_by(auth.with_policies(doctors).decide(request(), identity("alice"))) == "doctors"


# --------------------------------------------------------------------------- end to end, from a signed token

ISS = "https://idp.example"
SECRET = "an-hmac-secret-of-at-least-32-bytes!"
FAR_FUTURE = 4_000_000_000


async def test_roles_and_client_links_from_a_verified_jwt() -> None:
    config: Config = parse_config(
        "introspectors: [{id: hmac, type: jwt, jwt: {iss: 'https://idp.example', secret: '"
        + SECRET
        + "'}}]\n"
        + USERS
        + ROLES
        + "policies:\n"
        "  - {id: doctors, engine: allow, roleName: doctor, introspectors: [hmac]}\n"
        "  - {id: web, engine: allow, link: [{reference: Client/web}]}\n",
        {},
    )
    built = build_engine(config, FakeIdpClient(), CacheFactory(config.cache))

    async def check(claims: Mapping[str, Any]) -> Decision:
        token = hs_token({"iss": ISS, "exp": FAR_FUTURE, **claims}, SECRET.encode())
        return await built.authorizer.check(
            HttpRequest(method="GET", path="/fhir/Patient", headers={"authorization": f"Bearer {token}"})
        )

    assert (await check({"sub": "alice"})).policy == "doctors"
    assert (await check({"sub": "bob", "azp": "web"})).policy == "web"
    nurse = await check({"sub": "bob", "azp": "mobile"})
    assert (nurse.outcome, nurse.policy) == (Outcome.FORBIDDEN, None)


# --------------------------------------------------------------------------- config errors


def problems_or_none(text: str) -> list[str] | None:
    """The config's problems, or None when it loads."""
    try:
        parse_config(text, {})
    except ConfigError as err:
        return [str(problem) for problem in err.problems]
    return None


def config_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    return [str(problem) for problem in caught.value.problems]


@pytest.mark.parametrize(
    ("roles", "problem"),
    [
        ("[{id: r1, name: doctor}]", "role 'r1': user is required"),
        ("[{id: r1, user: {id: u1}}]", "role 'r1': name is required"),
        ("[{id: r1, name: 5, user: {id: u1}}]", "role 'r1': name must be a string, got an integer"),
        ("[{id: r1, name: doctor, user: u1}]", "role 'r1': user must be a mapping, got a string"),
        (
            "[{id: r1, name: doctor, user: {reference: Patient/p1}}]",
            "role 'r1': user must be {id: USER_ID} or {reference: User/USER_ID}",
        ),
        (
            "[{id: r1, name: doctor, user: {resourceType: Patient, id: p1}}]",
            "role 'r1': user must be {id: USER_ID} or {reference: User/USER_ID}",
        ),
        (
            "[{id: r1, name: doctor, user: {id: ''}}]",
            "role 'r1': user must be {id: USER_ID} or {reference: User/USER_ID}",
        ),
        (
            "[{id: r1, name: doctor, user: {reference: User/u1/_history/2}}]",
            "role 'r1': user must be {id: USER_ID} or {reference: User/USER_ID}",
        ),
        ("[{name: doctor, user: {id: u1}}]", "roles[0]: id is required and must be a non-empty string"),
        ("[doctor]", "roles[0]: id is required and must be a non-empty string"),
        ("[{id: r1, resourceType: User, name: a, user: {id: u1}}]", "role 'r1': resourceType must be Role, got 'User'"),
        (
            "[{id: r1, name: a, user: {id: u1}}, {id: r1, name: b, user: {id: u1}}]",
            "role 'r1': id is used by more than one role",
        ),
        ("{id: r1}", "config: roles must be a list, got a mapping"),
    ],
)
def test_bad_roles_are_config_errors_naming_the_field(roles: str, problem: str) -> None:
    assert config_problems(f"roles: {roles}\n") == [problem]


LINK_SHAPES = (
    "must be {reference: User/ID}, {reference: Client/ID} or {reference: Operation/ID} (or {resourceType, id})"
)


@pytest.mark.parametrize(
    ("scope", "problem"),
    [
        ("link: []", "link must not be empty (leave it out for a policy that applies to everyone)"),
        ("link: User/u1", "link must be a list, got a string"),
        ("link: ['User/u1']", f"link[0] {LINK_SHAPES}"),
        ("link: [{reference: Patient/p1}]", f"link[0] {LINK_SHAPES}"),
        ("link: [{reference: 'User/'}]", f"link[0] {LINK_SHAPES}"),
        ("link: [{reference: User/u1/_history/1}]", f"link[0] {LINK_SHAPES}"),
        ("link: [{reference: User/u1}, {resourceType: User}]", f"link[1] {LINK_SHAPES}"),
        ("roleName: 1", "roleName must be a string, got an integer"),
        ("roleName: [doctor]", "roleName must be a string, got a list"),
    ],
)
def test_bad_scopes_are_config_errors_naming_the_field(scope: str, problem: str) -> None:
    assert config_problems(f"policies: [{{id: p, engine: allow, {scope}}}]\n") == [f"policy 'p': {problem}"]


def test_a_role_with_an_empty_name_is_a_config_error() -> None:
    problems = problems_or_none("roles: [{id: r1, name: '', user: {id: u1}}]\n")
    assert problems is not None
    assert any(problem.startswith("role 'r1': name ") for problem in problems)


def test_an_empty_role_name_on_a_policy_is_a_config_error() -> None:
    problems = problems_or_none("policies: [{id: p, engine: allow, roleName: ''}]\n")
    assert problems is not None
    assert any(problem.startswith("policy 'p': roleName ") for problem in problems)
