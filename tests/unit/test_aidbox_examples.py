"""Aidbox's own documented AccessPolicy examples, pasted verbatim, decided by our implementation.

Every example is the YAML (or JSON) exactly as Aidbox's documentation prints it
(github.com/HealthSamurai/aidbox-docs, commit 808a85a), under a comment naming the file and
section. Paths are relative to that repository's docs/ directory, and `T/` is
tutorials/security-access-control-tutorials/. Each case asserts the answer the documentation
gives, or, where the documentation only states the policy's intent ("allows a practitioner to read
their patients"), the answer that intent means. The documentation text is never edited in place.
Where it must change before it can run here, the change is made in code next to it and the comment
says why:

- Aidbox gives a resource without an `id` one of its own (`POST /AccessPolicy`), or takes the id
  from the URL (`PUT /AccessPolicy/<id>`). `resource(text, id=...)` adds the id only when the text
  has none.
- By design (SPEC), we do not support: `engine: sql` (a config error); policies that read the request
  body (`resource`, `body`: an ext_authz service never sees it, so such a policy does not match); `session`
  (an ext_authz service has no sessions: `.session.role...` resolves to nothing, and the tutorial's
  policy is ported to the top-level `role`); YAML duplicate keys (our strict loader refuses them).
- Callers authenticate with a JWT here (`sub` = the User's id, `client_id` = the Client's id). Aidbox's
  tutorials use its sessions and Basic auth instead.

Where a page's own example cannot give the answer the page states (a schema that nests a keyword
one level too high, `request-method: GET` against Aidbox's lower-case method, a `uri` that is not
the one requested), the case asserts what the policy as written decides, here as in Aidbox, and
its comment names the doc error. Unresolved `.path` references never match here (docs/matcho.md),
where the best-practices page says Aidbox matches two missing values; that case asserts ours.

Groups (in order): docs/reference/matcho-dsl-reference.md and api/rest-api/other/matcho.md (each
operator through `matches`), access-control/authorization/access-policies.md, then the tutorials in
tutorials/security-access-control-tutorials/ (accesspolicy-examples, accesspolicy-best-practices,
rbac/*, allow-patients-to-see-their-own-data, restricting-access-to-patient-data,
restrict-operations-on-resource-type, debug-access-control, create-and-test-access-control,
creating-user-and-set-up-full-user-access, relationship-based-access-control,
set-up-token-introspection and access-control/authentication/token-introspector.md, the identity
provider tutorials, labels, hierarchical, consent, SMART), and api/bulk-api.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from authz_service.config import yamlload
from authz_service.config.model import Config
from authz_service.config.validate import parse_config
from authz_service.engine import Engine, build_engine
from authz_service.errors import ConfigError
from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.policy.matcho import matches
from authz_service.policytest import PolicyTestError, parse_policy_test, run_policy_test
from authz_service.tokens.cache import CacheFactory
from tests.unit.fakes import FakeIdpClient, hs_token

# --------------------------------------------------------------------------- harness

FAR_FUTURE = 4_000_000_000  # exp of minted tokens: the introspectors read the real clock
ISS = "https://idp.example"
SECRET = "an-hmac-secret-of-at-least-32-bytes!"
AUTH_ISS = "https://auth.example.com"
KEYCLOAK_ISS = "http://localhost:8180/realms/myrealm"
DENIED = None  # the expected answer of a case no policy allows (403; 401 without a token)
ALLOWED = "(the one policy)"  # the expected answer of a case the world's only policy allows


def resource(text: str, **absent: Any) -> dict[str, Any]:
    """A resource from its verbatim text, read by the config's own strict YAML loader; `absent`
    supplies what Aidbox would (the id of a POSTed resource, or the one in a PUT's URL)."""
    loaded = yamlload.load(text)
    assert isinstance(loaded, dict)
    return {**absent, **loaded}


# T/set-up-token-introspection.md: JWT Token, 1. Token secret
EXTERNAL_AUTH_SERVER = """\
resourceType: TokenIntrospector
id: external-auth-server
type: jwt
jwt:
  iss: https://auth.example.com
  secret: very-secret
"""
# Its 11-byte secret is accepted with a warning (SPEC: Aidbox's examples use short ones).
INTROSPECTORS: tuple[Mapping[str, Any], ...] = (
    {"id": "idp", "type": "jwt", "jwt": {"iss": ISS, "secret": SECRET}},
    resource(EXTERNAL_AUTH_SERVER),
    # For keycloak-auto-create-user.md: its TokenIntrospector fetches keys from a Keycloak, this one
    # has a secret, with the same issuer.
    {"id": "keycloak", "type": "jwt", "jwt": {"iss": KEYCLOAK_ISS, "secret": SECRET}},
)


@dataclass(frozen=True)
class World:
    """What the service is configured with: AccessPolicy, User and Role resources (as loaded)."""

    policies: tuple[Mapping[str, Any], ...]
    users: tuple[Mapping[str, Any], ...] = ()
    roles: tuple[Mapping[str, Any], ...] = ()
    introspectors: tuple[Mapping[str, Any], ...] = INTROSPECTORS
    introspection: Mapping[str, Any] | None = None  # what an opaque introspection endpoint answers

    def config(self) -> Config:
        raw = {
            "introspectors": list(self.introspectors),
            "policies": list(self.policies),
            "users": list(self.users),
            "roles": list(self.roles),
        }
        return parse_config(json.dumps(raw), {})

    def engine(self) -> Engine:
        config = self.config()
        return build_engine(config, FakeIdpClient(self.introspection), CacheFactory(config.cache))

    def secret(self, iss: str) -> bytes:
        [secret] = [i["jwt"]["secret"] for i in self.introspectors if i.get("jwt", {}).get("iss") == iss]
        return str(secret).encode()


def world(
    *policies: Mapping[str, Any],
    users: Sequence[Mapping[str, Any]] = (),
    roles: Sequence[Mapping[str, Any]] = (),
    introspectors: Sequence[Mapping[str, Any]] = INTROSPECTORS,
    introspection: Mapping[str, Any] | None = None,
) -> World:
    return World(tuple(policies), tuple(users), tuple(roles), tuple(introspectors), introspection)


@dataclass(frozen=True)
class Ask:
    """One request and who sends it: a JWT for `sub` from `iss` with more `claims`, or `token`
    as given, or (sub None) no credentials at all."""

    method: str
    path: str
    sub: str | None = "user-1"
    claims: Mapping[str, Any] = field(default_factory=dict)
    iss: str = ISS
    token: str | None = None

    def request(self, where: World) -> HttpRequest:
        token = self.token
        if token is None and self.sub is not None:
            claims = {"iss": self.iss, "sub": self.sub, "exp": FAR_FUTURE, **self.claims}
            token = hs_token(claims, where.secret(self.iss))
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        return HttpRequest(method=self.method, path=self.path, host="aidbox.example", headers=headers)


def client(client_id: str, **claims: Any) -> dict[str, Any]:
    """The claims of a token issued to an OAuth client (the context's `client.id`)."""
    return {"client_id": client_id, **claims}


async def decide(where: World, ask: Ask) -> Decision:
    return await where.engine().authorizer.check(ask.request(where))


async def check(where: World, ask: Ask, expected: str | None) -> None:
    """`expected` is the id of the policy that allows the request, ALLOWED, or DENIED."""
    if expected == ALLOWED:
        [policy] = where.policies
        expected = policy["id"]
    decision = await decide(where, ask)
    if expected is None:
        anonymous = ask.sub is None and ask.token is None
        wanted = Outcome.UNAUTHENTICATED if anonymous else Outcome.FORBIDDEN
        assert decision.outcome is wanted, f"{ask} was allowed by {decision.policy!r}"
    else:
        assert decision.outcome is Outcome.ALLOW, f"{ask}: {decision.outcome.value} ({decision.reason.label})"
        assert decision.policy == expected


def config_text(*policies: str) -> str:
    """A config file holding these policies exactly as written, one list item each."""
    items = "".join("  - " + textwrap.indent(text, "    ")[4:] for text in policies)
    return f"introspectors: {json.dumps(list(INTROSPECTORS))}\npolicies:\n{items}"


def refusal(*policies: str) -> str:
    """The config error a config file holding these policies (as written) is refused with."""
    with pytest.raises(ConfigError) as caught:
        parse_config(config_text(*policies), {})
    return str(caught.value)


def parsed(text: str) -> Any:
    return yamlload.load(text)


# ======================== reference/matcho-dsl-reference.md, api/rest-api/other/matcho.md
# docs/reference/matcho-dsl-reference.md gives patterns with lists of values they match and do
# not match; each becomes a case of `matches(pattern, value)`. The patterns and values are
# written exactly as there (YAML flow style). Where the doc's own text is unbalanced
# (`{a: {b: 5}`), the missing brace is added and the case says so. Cases marked "not in the
# doc" add the obvious counterpart to a doc case that only lists values that match.

MATCHO_REFERENCE = [
    # Strings, numbers, and booleans are compared by value; a dictionary is searched for inclusion.
    pytest.param("{x: 1}", "{x: 1}", True, id="dict-x-matches-same"),
    pytest.param("{x: 1}", "{x: 1, y: 2}", True, id="dict-x-matches-more-keys"),  # `{x: 1, y: 2, ...}`
    pytest.param("{x: 1}", "{z: 1}", False, id="dict-x-not-z"),
    # Pattern `{a: {b: 5}` (closing brace added)
    pytest.param("{a: {b: 5}}", "{a: {b: 5, c: 6}, d: 7}", True, id="nested-matches-more-keys"),  # `c: 6, ...`
    pytest.param("{a: {b: 5}}", "{a: {c: 5}}", False, id="nested-not-a-c"),
    pytest.param("{a: {b: 5}}", "{b: {a: 5}}", False, id="nested-not-b-a"),
    # If a pattern is an array, search for its elements in the order given.
    pytest.param("[1, 2]", "[1, 2]", True, id="array-same"),
    pytest.param("[1, 2]", "[1, 2, 3]", True, id="array-prefix"),  # `[1, 2, 3, …]`
    pytest.param("[1, 2]", "[2, 1]", False, id="array-order-matters"),
    # Regular expressions
    pytest.param(r'{a: "#\\d+"}', '{a: "2345"}', True, id="regex-digits"),
    pytest.param(r'{a: "#\\d+"}', '{a: "abc"}', False, id="regex-not-letters"),
    # present? — matches non-null values
    pytest.param('{a: "present?"}', "{a: 5}", True, id="present-number"),
    pytest.param('{a: "present?"}', "{a: {b: 6}}", True, id="present-map"),
    pytest.param('{a: "present?"}', "{b: 5}", False, id="present-missing"),
    # nil? — matches null values (no example in the doc)
    pytest.param('{a: "nil?"}', "{a: null}", True, id="nil-null"),
    pytest.param('{a: "nil?"}', "{b: 5}", True, id="nil-missing"),
    pytest.param('{a: "nil?"}', "{a: 5}", False, id="nil-not-a-value"),
    # not-blank? — matches a non-empty string (no example in the doc)
    pytest.param('{a: "not-blank?"}', '{a: "x"}', True, id="not-blank-string"),
    pytest.param('{a: "not-blank?"}', '{a: ""}', False, id="not-blank-empty-string"),
    pytest.param('{a: "not-blank?"}', "{b: 5}", False, id="not-blank-missing"),
    # Matching values from the request context
    pytest.param('{params: {user_id: ".user.id"}}', "{user: {id: 1}, params: {user_id: 1}}", True, id="path-equal"),
    pytest.param(
        '{params: {user_id: ".user.id"}}', "{user: {id: 1}, params: {user_id: 2}}", False, id="path-not-equal"
    ),  # not in the doc
    # $enum
    pytest.param('{request-method: {$enum: ["get", "post"]}}', '{request-method: "post"}', True, id="enum-post"),
    pytest.param('{request-method: {$enum: ["get", "post"]}}', '{request-method: "get"}', True, id="enum-get"),
    pytest.param('{request-method: {$enum: ["get", "post"]}}', '{request-method: "put"}', False, id="enum-not-put"),
    # $one-of (the doc's `{a: {d: 5}` and `{a: {b: null}` have their closing braces added)
    pytest.param('{a: {$one-of: [{b: "present?"}, {c: "present?"}]}}', "{a: {c: 5}}", True, id="one-of-c"),
    pytest.param('{a: {$one-of: [{b: "present?"}, {c: "present?"}]}}', "{a: {d: 5}}", False, id="one-of-not-d"),
    pytest.param('{a: {$one-of: [{b: "present?"}, {c: "present?"}]}}', "{a: {b: null}}", False, id="one-of-not-null"),
    # $reference: `{reference: "Patient/pid"}` => `{id: "pid", resourceType: "Patient"}`
    pytest.param(
        '{a: {$reference: {id: "pid", resourceType: "Patient"}}}', '{a: {reference: "Patient/pid"}}', True, id="ref"
    ),
    pytest.param('{a: {$reference: {id: "pid"}}}', '{a: "Patient/pid"}', True, id="reference-string"),
    pytest.param('{a: {$reference: {id: "pid"}}}', '{a: {reference: "Patient/other"}}', False, id="reference-other"),
    # Example: `{resource: {patient: {$reference: {id: '.user.data.patient_id'}}}` (closing brace added)
    pytest.param(
        "{resource: {patient: {$reference: {id: '.user.data.patient_id'}}}}",
        "{resource: {patient: {reference: Patient/pt-1}}, user: {data: {patient_id: pt-1}}}",
        True,
        id="reference-example-own-patient",
    ),
    pytest.param(
        "{resource: {patient: {$reference: {id: '.user.data.patient_id'}}}}",
        "{resource: {patient: {reference: Patient/pt-2}}, user: {data: {patient_id: pt-1}}}",
        False,
        id="reference-example-other-patient",
    ),  # not in the doc
    # $contains (the doc's pattern has its closing brace added)
    pytest.param(
        '{type: {$contains: {system: "loinc"}}}',
        '{type: [{system: "snomed"}, {system: "loinc"}]}',
        True,
        id="contains-loinc",
    ),
    pytest.param(
        '{type: {$contains: {system: "loinc"}}}', '{type: [{system: "snomed"}]}', False, id="contains-not-snomed-only"
    ),  # not in the doc
    # $every (the doc's pattern has its closing brace added)
    pytest.param(
        '{col: {"$every": {foo: "bar"}}}',
        '{col: [{foo: "bar"}, {foo: "bar", baz: "quux"}]}',
        True,
        id="every-all-bar",
    ),
    pytest.param(
        '{col: {"$every": {foo: "bar"}}}', '{col: [{foo: "bar"}, {foo: "baz"}]}', False, id="every-not-one-baz"
    ),  # not in the doc
    # $not (the doc's pattern has its closing brace added)
    pytest.param("{message: {$not: {status: private}}}", "{message: {status: public}}", True, id="not-public"),
    pytest.param("{message: {$not: {status: private}}}", "{message: {status: private}}", False, id="not-private"),
    # $present-all — every element of $present-all is present in the array, order not checked;
    # can be combined with $length (no example in the doc)
    pytest.param("{a: {$present-all: [x, y]}}", "{a: [y, z, x]}", True, id="present-all-any-order"),
    pytest.param("{a: {$present-all: [x, y]}}", "{a: [x, z]}", False, id="present-all-one-missing"),
    pytest.param("{a: {$present-all: [x, y], $length: 2}}", "{a: [y, x]}", True, id="present-all-length"),
    pytest.param("{a: {$present-all: [x, y], $length: 2}}", "{a: [y, x, z]}", False, id="present-all-length-3"),
    # $length — checks the length of the array (no example in the doc)
    pytest.param("{a: {$length: 2}}", "{a: [1, 2]}", True, id="length-2"),
    pytest.param("{a: {$length: 2}}", "{a: [1]}", False, id="length-1"),
]


@pytest.mark.parametrize(("pattern", "value", "expected"), MATCHO_REFERENCE)
def test_matcho_dsl_reference(pattern: str, value: str, expected: bool) -> None:
    assert matches(parsed(pattern), parsed(value)) is expected


# reference/matcho-dsl-reference.md: Matching values from the request context
MATCHO_ENDPOINT_CONTEXT = """\
context: { my-value: 'value'}
matcho: {'a': '.my-value'}
resource: {'a': 'value'}
"""
# api/rest-api/other/matcho.md: Debug endpoint (the request part)
MATCHO_ENDPOINT_MISMATCH = """\
matcho: {'a': 1}
resource: {'a': 2}
context: { user: 'u-1' }
"""


def test_matcho_endpoint_examples() -> None:
    # `$matcho will evaluate true only if 'a' is equal to my-value from the context`
    body = parsed(MATCHO_ENDPOINT_CONTEXT)
    assert matches(body["matcho"], body["resource"], body["context"]) is True
    assert matches(body["matcho"], {"a": "other"}, body["context"]) is False
    # ...and `{a: 1}` against `{a: 2}` answers `expected: 1, but: 2`: no match.
    body = parsed(MATCHO_ENDPOINT_MISMATCH)
    assert matches(body["matcho"], body["resource"], body["context"]) is False


# reference/matcho-dsl-reference.md: $one-of, Correct usage example
ONE_OF_CORRECT = """\
    resourceType: AccessPolicy
    engine: matcho
    matcho:
      request-method: get
      params:
        $one-of:
          - name: present?
            resource/type: Patient
          - _id: present?
            resource/type: Patient
          - id: present?
            resource/type: Patient
    """
# reference/matcho-dsl-reference.md: $one-of, Incorrect usage example
ONE_OF_INCORRECT = """\
    resourceType: AccessPolicy
    engine: matcho
    matcho:
      request-method: get
      params:
        resource/type: Patient
        $one-of:
          - name: present?
          - _id: present?
          - id: present?
    """
# reference/matcho-dsl-reference.md: $not, the warning
NOT_WARNING = """\
sourceType: AccessPolicy
engine: matcho
matcho:
  request-method: delete
  uri: '#^/Patient.*$'
  user: {$not: {data: {role: guest}}}
"""
# The doc writes `sourceType` for `resourceType` (a typo; see test_matcho_reference_refusals).
NOT_WARNING_FIXED = NOT_WARNING.replace("sourceType: AccessPolicy", "resourceType: AccessPolicy")

ONE_OF_WORLD = world(resource(ONE_OF_CORRECT, id="one-of-correct"))
NOT_WORLD = world(
    resource(NOT_WARNING_FIXED, id="not-guest"),
    users=[
        {"resourceType": "User", "id": "guest", "data": {"role": "guest"}},
        {"resourceType": "User", "id": "doctor", "data": {"role": "doctor"}},
    ],
)


@pytest.mark.parametrize(
    ("where", "ask", "expected"),
    [
        # `$one-of` over params, each option naming resource/type: a Patient search by name, _id or id.
        pytest.param(ONE_OF_WORLD, Ask("GET", "/fhir/Patient?name=John"), ALLOWED, id="one-of-name"),
        pytest.param(ONE_OF_WORLD, Ask("GET", "/fhir/Patient?_id=pt-1"), ALLOWED, id="one-of-_id"),
        pytest.param(ONE_OF_WORLD, Ask("GET", "/Patient?id=pt-1"), ALLOWED, id="one-of-id"),
        pytest.param(ONE_OF_WORLD, Ask("GET", "/fhir/Patient?gender=male"), DENIED, id="one-of-other-param"),
        pytest.param(ONE_OF_WORLD, Ask("GET", "/fhir/Observation?name=x"), DENIED, id="one-of-other-type"),
        pytest.param(ONE_OF_WORLD, Ask("POST", "/fhir/Patient?name=John"), DENIED, id="one-of-post"),
        # "...prevent Guest users from deleting Patient resources, this AccessPolicy allows them to
        # perform DELETE /Patient/ for all other users, including unauthorized ones."
        pytest.param(NOT_WORLD, Ask("DELETE", "/Patient/pt-1", "guest"), DENIED, id="not-guest-refused"),
        pytest.param(NOT_WORLD, Ask("DELETE", "/Patient/pt-1", "doctor"), ALLOWED, id="not-doctor-allowed"),
        pytest.param(NOT_WORLD, Ask("DELETE", "/Patient/pt-1", "nobody"), ALLOWED, id="not-unknown-user-allowed"),
        pytest.param(NOT_WORLD, Ask("DELETE", "/Patient/pt-1", None), ALLOWED, id="not-anonymous-allowed"),
        pytest.param(NOT_WORLD, Ask("GET", "/Patient/pt-1", None), DENIED, id="not-only-delete"),
    ],
)
async def test_matcho_reference_policies(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


def test_matcho_reference_refusals() -> None:
    # "Note that the `$one-of` key cannot be utilized concurrently with other keys."
    assert "$one-of" in refusal(ONE_OF_INCORRECT)
    # The $not warning's policy as printed has `sourceType`, not a field of AccessPolicy.
    assert "sourceType" in refusal(NOT_WARNING)


# ======================== access-control/authorization/access-policies.md

# access-control/authorization/access-policies.md: Allow engine
ALLOW_ADMIN = """\
resourceType: AccessPolicy
id: this-policy-allows-everything
engine: allow
link:
- { resourceType: User, id: admin }
"""
# access-control/authorization/access-policies.md: Matcho engine, Example
INPATIENT = """\
resourceType: AccessPolicy
id: as-practitioner-who-works-in-inpatient-department-allowed-to-see-his-patients
engine: matcho
matcho:
  user: 
    department: inpatient
    # user.data.practitioner_id should be present
    data: 
      practitioner_id: present?
  # uri must match regexp /Encounter.*
  uri: '#/Encounter.*'
  request-method: {$enum: ['get', 'post']}
  params:
    practitioner: .user.data.practitioner_id 
"""  # noqa: W291
# access-control/authorization/access-policies.md: SQL engine, Example
SQL_PATIENTS = """\
resourceType: AccessPolicy
id: practitioner-only-allowed-to-see-his-patients
engine: sql
sql:
  query: |
    SELECT
      {{user}} IS NOT NULL
      AND {{user.data.practitioner_id}} IS NOT NULL
      AND {{uri}} LIKE '/fhir/Patient/%'
      AND resource->'generalPractitioner' @>
    jsonb_build_array(jsonb_build_object('resourceType',
        'Practitioner', 'id', {{user.data.practitioner_id}}::text))
      FROM patient WHERE id = {{params.resource/id}};
"""
# access-control/authorization/access-policies.md: SQL engine, More examples
SQL_CONDITIONS = """\
resourceType: AccessPolicy
id: practitioner-only-allowed-to-see-his-patients-conditions
engine: sql
sql:
  query: |
    SELECT 1
    FROM condition c
    JOIN patient p ON (
      c.resource @> (
        $JSON${
          "subject":{
            "id":"$JSON$
            ||
            p.id
            ||
            $JSON$",
            "resourceType":"Patient"
          }
        }$JSON$
      )::jsonb
    )
    WHERE
      {{user}} IS NOT NULL
      AND ({{user.data.practitioner_id}})::text IS NOT NULL
      AND ({{uri}})::text LIKE '/fhir/Condition/%'
      AND p.resource @> (
        $JSON${
          "generalPractitioner":[{
            "id":"$JSON$
            ||
            ({{user.data.practitioner_id}})::text
            ||
            $JSON$",
            "resourceType":"Practitioner"
          }]
        }$JSON$
      )::jsonb
      AND c.id = {{params.resource/id}}
"""
# access-control/authorization/access-policies.md: JSON Schema, Example
JSON_SCHEMA_ORGANIZATION = """\
resourceType: AccessPolicy
engine: json-schema
schema:
  properties:
    params:
      required: [resource/type]
    properties:
      resource/type:
        const:
          Organization
"""
# access-control/authorization/access-policies.md: Complex, Example 1
COMPLEX_1 = """\
resourceType: AccessPolicy
engine: complex
and:
  - { engine: "sql", sql: { query: "select true" } }       # check-1
  - engine: complex
    or:
      - { engine: "sql", sql: { query: "select false" } }  # check-2
      - { engine: "sql", sql: { query: "select false" } }  # check-3
"""
# access-control/authorization/access-policies.md: Complex, Example 2
COMPLEX_2 = """\
resourceType: AccessPolicy
engine: complex
and:
  # Rule: request.user && request.user.data.practitioner_id are required
  - engine: json-schema
    schema:
      type: object
      required: ["user"]
      properties:
        user:
          type: object
          required: ["data"]
          properties:
            data:
              type: object
              required: ["practitioner_id"]
  # Rule: current practitioner is patient’s generalPractitioner
  - engine: sql
    sql:
      query: |
        SELECT
          {{uri}} LIKE '/fhir/Patient/%'
          AND resource->'generalPractitioner' @>
        jsonb_build_array(jsonb_build_object('resourceType',
            'Practitioner', 'id', {{user.data.practitioner_id}}::text))
          FROM patient WHERE id = {{params.resource/id}};
"""

INPATIENT_USERS: list[dict[str, Any]] = [  # not in the doc: the users the example describes
    {"resourceType": "User", "id": "inpatient-doc", "department": "inpatient", "data": {"practitioner_id": "pr-1"}},
    {"resourceType": "User", "id": "outpatient-doc", "department": "outpatient", "data": {"practitioner_id": "pr-1"}},
    {"resourceType": "User", "id": "inpatient-nurse", "department": "inpatient"},
]
ADMIN_WORLD = world(resource(ALLOW_ADMIN), users=[{"resourceType": "User", "id": "admin"}])
INPATIENT_WORLD = world(resource(INPATIENT), users=INPATIENT_USERS)
ORGANIZATION_WORLD = world(resource(JSON_SCHEMA_ORGANIZATION, id="organization-only"))
# Complex example 2's first rule (json-schema) on its own; its second (sql) cannot run here.
COMPLEX_2_SCHEMA_WORLD = world(
    {"id": "complex-2-and-0", **resource(COMPLEX_2)["and"][0]},
    users=[
        {"resourceType": "User", "id": "practitioner", "data": {"practitioner_id": "pr-1"}},
        {"resourceType": "User", "id": "clerk", "data": {"desk": 3}},
    ],
)
INPATIENT_ID = "as-practitioner-who-works-in-inpatient-department-allowed-to-see-his-patients"

ACCESS_POLICIES_MD = [
    # Allow engine, linked to User/admin: everything for admin, nothing for anybody else.
    pytest.param(ADMIN_WORLD, Ask("DELETE", "/fhir/Patient/pt-1", "admin"), ALLOWED, id="allow-admin"),
    pytest.param(ADMIN_WORLD, Ask("GET", "/fhir/Patient", "user-1"), DENIED, id="allow-not-linked-user"),
    # Matcho example: "/fhir/Encounter or /Encounter, GET or POST, practitioner param = user.data.practitioner_id"
    pytest.param(
        INPATIENT_WORLD,
        Ask("GET", "/fhir/Encounter?practitioner=pr-1", "inpatient-doc"),
        ALLOWED,
        id="inpatient-fhir-get",
    ),
    pytest.param(
        INPATIENT_WORLD, Ask("GET", "/Encounter?practitioner=pr-1", "inpatient-doc"), ALLOWED, id="inpatient-get"
    ),
    # (the doc's "body params in case of the POST": a query parameter here, the body is unseen)
    pytest.param(
        INPATIENT_WORLD, Ask("POST", "/fhir/Encounter?practitioner=pr-1", "inpatient-doc"), ALLOWED, id="inpatient-post"
    ),
    pytest.param(
        INPATIENT_WORLD,
        Ask("PUT", "/fhir/Encounter/enc-1?practitioner=pr-1", "inpatient-doc"),
        DENIED,
        id="inpatient-not-put",
    ),
    pytest.param(
        INPATIENT_WORLD,
        Ask("GET", "/fhir/Encounter?practitioner=pr-2", "inpatient-doc"),
        DENIED,
        id="inpatient-other-practitioner",
    ),
    pytest.param(INPATIENT_WORLD, Ask("GET", "/fhir/Encounter", "inpatient-doc"), DENIED, id="inpatient-no-param"),
    pytest.param(
        INPATIENT_WORLD,
        Ask("GET", "/fhir/Encounter?practitioner=pr-1", "outpatient-doc"),
        DENIED,
        id="inpatient-other-department",
    ),
    pytest.param(
        INPATIENT_WORLD,
        Ask("GET", "/fhir/Encounter?practitioner=pr-1", "inpatient-nurse"),
        DENIED,
        id="inpatient-no-practitioner-id",
    ),
    pytest.param(
        INPATIENT_WORLD,
        Ask("GET", "/fhir/Patient?practitioner=pr-1", "inpatient-doc"),
        DENIED,
        id="inpatient-not-patient",
    ),
    # JSON Schema example: "requires request.params.resource/type to be present and have a value of Organization"
    pytest.param(ORGANIZATION_WORLD, Ask("GET", "/fhir/Organization"), ALLOWED, id="schema-organization-search"),
    pytest.param(ORGANIZATION_WORLD, Ask("GET", "/fhir/Organization/org-1"), ALLOWED, id="schema-organization-read"),
    pytest.param(
        ORGANIZATION_WORLD, Ask("GET", "/fhir/metadata?_format=json"), DENIED, id="schema-params-without-type"
    ),
    # The page says only Organization passes, but its schema nests `properties: {resource/type:
    # {const: Organization}}` beside `params`, not inside it: draft-07 (Aidbox's validator too) then
    # only requires resource/type to be present, so Patient passes. A doc error; we decide as written.
    pytest.param(ORGANIZATION_WORLD, Ask("GET", "/fhir/Patient"), ALLOWED, id="schema-patient-as-written"),
    # Complex example 2, first rule: "request.user && request.user.data.practitioner_id are required"
    pytest.param(
        COMPLEX_2_SCHEMA_WORLD,
        Ask("GET", "/fhir/Patient/pt-1", "practitioner"),
        ALLOWED,
        id="complex-2-schema-practitioner",
    ),
    pytest.param(
        COMPLEX_2_SCHEMA_WORLD,
        Ask("GET", "/fhir/Patient/pt-1", "clerk"),
        DENIED,
        id="complex-2-schema-no-practitioner-id",
    ),
    pytest.param(
        COMPLEX_2_SCHEMA_WORLD, Ask("GET", "/fhir/Patient/pt-1", "stranger"), DENIED, id="complex-2-schema-no-user"
    ),
]


@pytest.mark.parametrize(("where", "ask", "expected"), ACCESS_POLICIES_MD)
async def test_access_policies_md(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(SQL_PATIENTS, id="sql-example"),
        pytest.param(SQL_CONDITIONS, id="sql-more-examples"),
        pytest.param(COMPLEX_1, id="complex-example-1"),
        pytest.param(COMPLEX_2, id="complex-example-2"),
    ],
)
def test_access_policies_md_sql_is_refused(text: str) -> None:
    assert "sql" in refusal(text)


async def test_access_policies_md_request_object() -> None:
    # "Request object structure": request-method get, uri /fhir/Patient (no query string),
    # query-string name=John, params: the query merged with the router's URL params.
    where = world(resource(EXAMPLE_1))
    request = Ask("GET", "/fhir/Patient?name=John").request(where)
    engine = where.engine()
    decision = await engine.authorizer.check(request)
    context = engine.authorizer.context(request, decision.identity)
    assert context["request-method"] == "get"
    assert context["uri"] == "/fhir/Patient"
    assert context["query-string"] == "name=John"
    assert context["params"] == {"name": "John", "resource/type": "Patient"}
    assert context["jwt"]["sub"] == "user-1"
    assert context["headers"]["authorization"].startswith("Bearer ")


# ======================== T/accesspolicy-examples.md (examples 1 to 18)

# T/accesspolicy-examples.md: 1. Policy that temporarily allows all requests
EXAMPLE_1 = """\
id: allow-all
resourceType: AccessPolicy
engine: allow
"""
# T/accesspolicy-examples.md: 2. Policy that allows a user to view their own patient
EXAMPLE_2 = """\
id: as-patient-get-patient-data
resourceType: AccessPolicy
engine: matcho
link:
  - reference: Operation/FhirRead

description: Policy that allows a patient to view their own patient data
matcho:
  params:
    resource/id: .user.fhirUser.id
    resource/type: Patient

"""
# T/accesspolicy-examples.md: 3. Policy that allows a practitioner to view all observations (Role)
EXAMPLE_3_ROLE = """\
name: practitioner-1
resourceType: Role
user:
  reference: User/user-1
links:
  practitioner:
    reference: Practitioner/pr-1

"""
# T/accesspolicy-examples.md: 3. Policy that allows a practitioner to view all observations
EXAMPLE_3 = """\
id: as-practitioner-get-all-observations
resourceType: AccessPolicy
link:
  - reference: Operation/FhirSearch
engine: matcho
matcho:
  session:
    role:
      $contains:
        links:
          practitioner: present?
"""
# T/accesspolicy-examples.md: 4. Policy that allows a system to update their patients
EXAMPLE_4 = """\
id: as-system1-app-update-patients
resourceType: AccessPolicy
engine: matcho
link:
  - reference: Operation/FhirConditionalUpdate
  - reference: Client/system1-client
description: Policy that allows a system1 to update their patients
matcho:
  params:
    resource/type: Patient
    identifier: "#http://system1"
  resource:
    identifier:
      $contains:
        system: http://system1

"""
# T/accesspolicy-examples.md: 5. Policy that allows a system to search for their patients
EXAMPLE_5 = """\
id: as-system1-app-read-patients
resourceType: AccessPolicy
engine: matcho
link:
  - reference: Operation/FhirSearch
  - reference: Client/system1-client
description: Policy that allows a system1 to search for their patients
matcho:
  params:
    resource/type: Patient
    identifier: "#http://system1"
"""
# T/accesspolicy-examples.md:
#   6. Policy that allows an application to do CRUD on Patient and Practitioner resources.
EXAMPLE_6 = """\
id: as-client-id-crud-patients-and-practitioners
resourceType: AccessPolicy
engine: matcho
link:
  - reference: Client/client-id
description: Policy that allows a client-id to do CRUD on Patient and Practitioner resources
matcho:
  params:
    resource/type:
      $enum:
        - Patient
        - Practitioner
  request-method:
    $enum:
      - get
      - post
      - patch
      - put
"""
# T/accesspolicy-examples.md: 7. Policy that allows an admin access to Aidbox UI to the admin users
EXAMPLE_7 = """\
id: as-admin-allowed-access-to-aidbox-ui
resourceType: AccessPolicy
engine: matcho
description: Policy that allows admin access to Aidbox UI for admin users
matcho:
  user:
    data:
      groups:
        $contains: Aidbox-Admins
  request-method:
    $enum:
      - get
      - post
      - put
      - delete
"""
# T/accesspolicy-examples.md: 8. Policy that allows access to Workflow Engine screen only for a specific engineer
EXAMPLE_8 = """\
id: as-engineer-allowed-to-access-workflow-engine
resourceType: AccessPolicy
engine: matcho
link:
  - reference: Operation/rpc
description: Policy that allows access to Workflow Engine screen only for a John Doe engineer
matcho:
  user:
    data:
      email: john.doe@example.com
  params:
    _m:
      $enum:
        - awf.workflow/list
        - awf.task/list
        - awf.task/status
        - awf.workflow/status
"""
# T/accesspolicy-examples.md: 9. Policy that allows graphql search requests to the Patient resource
EXAMPLE_9 = """\
id: as-client-allowed-graphql-search-patients
resourceType: AccessPolicy
engine: matcho
link:
  - reference: Client/my-client
description: Policy that allows graphql search requests to the Patient resource for my-client client
matcho:
  request-method: get
  uri: /Patient
"""
# T/accesspolicy-examples.md: 10. Organization-based hierarchical access control policy for a end-user
EXAMPLE_10 = """\
id: as-user-allowed-to-see-patients-in-organization
resourceType: AccessPolicy
engine: matcho
link:
  - reference: Operation/FhirSearch
description: A user should be able to get every patient in their organization.
matcho:
  params:
    resource/type: Patient
  request-method: get
  user:
    meta:
      extension:
        $contains:
          url: https://aidbox.app/tenant-organization-id
          value:
            Reference:
              id: .params.organization/id
"""
# T/accesspolicy-examples.md: 11. Policy that allows all the requests with JWT issued by certain issuer
EXAMPLE_11 = """\
id: jwt-issued-by-auth-example-com-allowed
resourceType: AccessPolicy
engine: matcho
description: Policy that allows all the requests with JWT issued by certain issuer
matcho:
  jwt:
    iss: https://auth.example.com
"""
# T/accesspolicy-examples.md: 12. Policy that allows the practitioner to read their patients
EXAMPLE_12 = """\
id: as-practitioner-allowed-to-see-his-patients
resourceType: AccessPolicy
engine: matcho
link:
- reference: Operation/FhirSearch
description: Policy that allows the practitioner to read their patients
matcho:
  params:
    # Only for Patient resources
    resource/type: Patient
    # query parameter general-practitioner should be equal to user.data.practitioner_id
    general-practitioner: .user.data.practitioner_id
  user: 
    # user.data.practitioner_id should be present
    data: 
      practitioner_id: present?

"""  # noqa: W291
# T/accesspolicy-examples.md: 13. Policy that allows the practitioner to read patients based on given consent.
EXAMPLE_13 = """\
id: as-practitioner-allowed-to-read-patients-with-consent
resourceType: AccessPolicy
engine: matcho
link:
  - reference: Operation/FhirSearch
description: Policy that allows the practitioner to read patients based on given consent
matcho:
  user: present?
  params:
    _has:Consent:patient:actor: .user.fhirUser.id
    _has:Consent:patient:scope: Encounter
    _revinclude: Encounter:subject
  request-method: get

"""
# T/accesspolicy-examples.md: 14. Policy that allows the practitioner to create Observations for their patients
EXAMPLE_14 = """\
id: as-practitioner-allowed-to-create-observations-for-their-patients
resourceType: AccessPolicy
engine: complex
link:
  - reference: Operation/FhirCreate
description: Allow practitioner to create observations for their patients     
and: 
  - engine: matcho
    matcho:
      params:
        resource/type: Observation
      user: present?
      user: 
        data:
          practitioner_id: present?
  - engine: sql   
    sql:
      query: |-
        SELECT
          EXISTS (
            SELECT 1 FROM patient p
            WHERE p.id = split_part(({{resource.subject.reference}})::text, '/',2)
            AND p.resource->'generalPractitioner' @>
              jsonb_build_array(
                jsonb_build_object(
                  'resourceType', 'Practitioner',
                  'id', {{user.data.practitioner_id}}::text
                )
              )
          );
"""  # noqa: W291
# T/accesspolicy-examples.md: 15. Policy that denies a system to update \"protected\" resources
EXAMPLE_15 = """\
id: as-system-allowed-to-update-practitioners-except-mdm
resourceType: AccessPolicy
engine: complex
link:
  - reference: Operation/FhirUpdate
description: Allow practitioner to create observations for their patients     
and: 
  - engine: matcho
    matcho:
      params:
        resource/type: Practitioner
  - engine: sql   
    sql:
      query: |-
        SELECT resource -> 'meta' ->> 'source' IS NULL OR  resource -> 'meta' ->> 'source' != 'MDM'  FROM practitioner WHERE id = {{params.resource/id}};
"""  # noqa: W291, E501
# T/accesspolicy-examples.md: 16. Policy that allows only read operations to $sql endpoint
EXAMPLE_16 = """\
link:
  - reference: User/ca57d5ad-22de-4cce-aaba-b5d6c50a88e8
engine: matcho
matcho:
  uri: /$sql
  body:
    sql: "#^(?i)(?!.*(INSERT|UPDATE|DELETE|MERGE|COPY|CREATE|ALTER|DROP|GRANT|REVOKE|TRUNCATE|CALL|DO|COMMENT|VACUUM|ANALYZE)).*"
  request-method: post
"""  # noqa: E501
# T/accesspolicy-examples.md: 17. Policy that allows using their own compartment for patients
EXAMPLE_17 = """\
engine: complex
description: Allow member to use correct patient compartment
id: as-member-allowed-to-use-thier-own-compartment
link:
  - reference: Operation/FhirCompartmentSearch
and:
  - engine: matcho
    matcho:
      jwt:
        IDP-UserId: present?
      params:
        resource/type: Patient
  - engine: sql
    sql:
      query: |-
        SELECT p.id = ({{params.resource/id}})::text FROM patient p
        WHERE p.resource->'identifier' @>
          jsonb_build_array(
            jsonb_build_object(
              'system', 'https://IDP',
              'value', {{jwt.IDP-UserId}}::text
            )
          );
"""
# T/accesspolicy-examples.md: 18. Policy that allows using FHIR transactions for the application
EXAMPLE_18 = """\
engine: matcho
description: Allow client-id to use FHIR transactions
id: as-client-id-allowed-to-use-fhir-transactions
link:
  - reference: Client/client-id
matcho:
  operation: 
    id: FhirTransaction
"""  # noqa: W291

# Example 3 as it can run here: `session.role` is Aidbox's session; the user's Role resources are
# the top-level `role` of our context (SPEC: `role` as Aidbox loads it).
EXAMPLE_3_PORTED = resource(EXAMPLE_3)
EXAMPLE_3_PORTED["matcho"] = EXAMPLE_3_PORTED["matcho"]["session"]
EXAMPLE_3_ROLES = [resource(EXAMPLE_3_ROLE, id="practitioner-1-role")]  # Aidbox gives it an id
EXAMPLE_16_ID = "sql-read-only"  # the doc's policy has no id: Aidbox gives it one
EXAMPLE_16_USER = "ca57d5ad-22de-4cce-aaba-b5d6c50a88e8"

EXAMPLES_1 = world(resource(EXAMPLE_1))
EXAMPLES_2 = world(
    resource(EXAMPLE_2),
    users=[  # "patient id stored in User.fhirUser element" (as Aidbox stores a reference)
        {"resourceType": "User", "id": "patient-user", "fhirUser": {"id": "123", "resourceType": "Patient"}},
        {"resourceType": "User", "id": "plain-user"},
    ],
)
EXAMPLES_3_USERS = [{"resourceType": "User", "id": "user-1"}, {"resourceType": "User", "id": "user-2"}]
EXAMPLES_3_VERBATIM = world(resource(EXAMPLE_3), users=EXAMPLES_3_USERS, roles=EXAMPLE_3_ROLES)
EXAMPLES_3_PORTED = world(EXAMPLE_3_PORTED, users=EXAMPLES_3_USERS, roles=EXAMPLE_3_ROLES)
EXAMPLES_4 = world(resource(EXAMPLE_4))
EXAMPLES_5 = world(resource(EXAMPLE_5))
EXAMPLES_6 = world(resource(EXAMPLE_6))
EXAMPLES_7 = world(
    resource(EXAMPLE_7),
    users=[
        {"resourceType": "User", "id": "okta-admin", "data": {"groups": ["Everyone", "Aidbox-Admins"]}},
        {"resourceType": "User", "id": "okta-user", "data": {"groups": ["Everyone"]}},
    ],
)
EXAMPLES_8 = world(
    resource(EXAMPLE_8),
    users=[
        {"resourceType": "User", "id": "john", "data": {"email": "john.doe@example.com"}},
        {"resourceType": "User", "id": "jane", "data": {"email": "jane.roe@example.com"}},
    ],
)
EXAMPLES_9 = world(resource(EXAMPLE_9))
ORG_A_USER: dict[str, Any] = {  # created by PUT /Organization/org-a/fhir/User, as Aidbox stores it
    "resourceType": "User",
    "id": "org-a-user",
    "meta": {
        "extension": [
            {
                "url": "https://aidbox.app/tenant-organization-id",
                "value": {"Reference": {"id": "org-a", "resourceType": "Organization"}},
            }
        ]
    },
}
EXAMPLES_10 = world(resource(EXAMPLE_10), users=[ORG_A_USER])
EXAMPLES_11 = world(resource(EXAMPLE_11))
EXAMPLES_12 = world(
    resource(EXAMPLE_12),
    users=[
        {"resourceType": "User", "id": "practitioner-user", "data": {"practitioner_id": "pr-1"}},
        {"resourceType": "User", "id": "clerk"},
    ],
)
EXAMPLES_13 = world(
    resource(EXAMPLE_13),
    users=[
        {"resourceType": "User", "id": "practitioner-user", "fhirUser": {"id": "pr-1", "resourceType": "Practitioner"}}
    ],
)
EXAMPLES_16 = world(resource(EXAMPLE_16, id=EXAMPLE_16_ID), users=[{"resourceType": "User", "id": EXAMPLE_16_USER}])
EXAMPLES_18 = world(resource(EXAMPLE_18))
CONSENT_SEARCH = (
    "/fhir/Patient?_has:Consent:patient:actor=pr-1&_has:Consent:patient:scope=Encounter&_revinclude=Encounter:subject"
)

ACCESSPOLICY_EXAMPLES = [
    # 1. allow-all: every request, with or without a token.
    pytest.param(EXAMPLES_1, Ask("GET", "/fhir/Patient"), ALLOWED, id="ex1-get-patients"),
    pytest.param(EXAMPLES_1, Ask("DELETE", "/fhir/Patient/pt-1"), ALLOWED, id="ex1-delete"),
    pytest.param(EXAMPLES_1, Ask("GET", "/fhir/Patient", None), ALLOWED, id="ex1-anonymous"),
    # 2. FhirRead of the Patient the user's fhirUser points to.
    pytest.param(EXAMPLES_2, Ask("GET", "/fhir/Patient/123", "patient-user"), ALLOWED, id="ex2-own-patient"),
    pytest.param(EXAMPLES_2, Ask("GET", "/fhir/Patient/456", "patient-user"), DENIED, id="ex2-other-patient"),
    pytest.param(EXAMPLES_2, Ask("GET", "/fhir/Observation/123", "patient-user"), DENIED, id="ex2-other-type"),
    pytest.param(EXAMPLES_2, Ask("GET", "/fhir/Patient?_id=123", "patient-user"), DENIED, id="ex2-search-not-linked"),
    pytest.param(EXAMPLES_2, Ask("PUT", "/fhir/Patient/123", "patient-user"), DENIED, id="ex2-update-not-linked"),
    pytest.param(EXAMPLES_2, Ask("GET", "/fhir/Patient/123", "plain-user"), DENIED, id="ex2-user-without-fhiruser"),
    pytest.param(EXAMPLES_2, Ask("GET", "/fhir/Patient/123", None), DENIED, id="ex2-anonymous"),
    # 3. As printed it reads `session`, which an ext_authz service has not: it never matches.
    pytest.param(EXAMPLES_3_VERBATIM, Ask("GET", "/fhir/Observation"), DENIED, id="ex3-verbatim-session-denies"),
    # ...ported to the top-level `role` it allows a user whose Role links a practitioner.
    pytest.param(EXAMPLES_3_PORTED, Ask("GET", "/fhir/Observation"), ALLOWED, id="ex3-ported-role"),
    pytest.param(
        EXAMPLES_3_PORTED, Ask("GET", "/fhir/Observation", "user-2"), DENIED, id="ex3-ported-user-without-role"
    ),
    pytest.param(EXAMPLES_3_PORTED, Ask("POST", "/fhir/Observation"), DENIED, id="ex3-ported-create-not-linked"),
    # 4. Reads the body (`resource`), which an ext_authz service never sees: it never matches.
    pytest.param(
        EXAMPLES_4, Ask("PUT", "/fhir/Patient/123", claims=client("system1-client")), DENIED, id="ex4-doc-request"
    ),
    pytest.param(
        EXAMPLES_4,
        Ask("PUT", "/fhir/Patient?identifier=http://system1|12345", claims=client("system1-client")),
        DENIED,
        id="ex4-conditional-update-body-unseen",
    ),
    # 5. The doc's request; links are OR-ed (best practices: "multiple links ... interpreted as OR").
    pytest.param(
        EXAMPLES_5,
        Ask("GET", "/fhir/Patient?id=123&identifier=http://system1|123", claims=client("system1-client")),
        ALLOWED,
        id="ex5-doc-request",
    ),
    pytest.param(
        EXAMPLES_5,
        Ask("GET", "/fhir/Patient?identifier=http://system2|123", claims=client("system1-client")),
        DENIED,
        id="ex5-other-system",
    ),
    pytest.param(
        EXAMPLES_5, Ask("GET", "/fhir/Patient?id=123", claims=client("system1-client")), DENIED, id="ex5-no-identifier"
    ),
    pytest.param(
        EXAMPLES_5,
        Ask("GET", "/fhir/Practitioner?identifier=http://system1|1", claims=client("system1-client")),
        DENIED,
        id="ex5-other-type",
    ),
    # The Operation/FhirSearch link makes it apply to every search, whoever sends it...
    pytest.param(
        EXAMPLES_5,
        Ask("GET", "/fhir/Patient?identifier=http://system1|123", claims=client("system2-client")),
        ALLOWED,
        id="ex5-any-client-searching",
    ),
    # ...and the Client link to every request of system1-client, a create included.
    pytest.param(
        EXAMPLES_5,
        Ask("POST", "/fhir/Patient?identifier=http://system1|123", claims=client("system1-client")),
        ALLOWED,
        id="ex5-client-link-any-operation",
    ),
    # 6. CRUD (get, post, patch, put) on Patient and Practitioner for client-id.
    pytest.param(EXAMPLES_6, Ask("GET", "/fhir/Patient", claims=client("client-id")), ALLOWED, id="ex6-doc-request"),
    pytest.param(
        EXAMPLES_6, Ask("POST", "/fhir/Practitioner", claims=client("client-id")), ALLOWED, id="ex6-create-practitioner"
    ),
    pytest.param(
        EXAMPLES_6, Ask("PATCH", "/fhir/Patient/pt-1", claims=client("client-id")), ALLOWED, id="ex6-patch-patient"
    ),
    pytest.param(
        EXAMPLES_6, Ask("DELETE", "/fhir/Patient/pt-1", claims=client("client-id")), DENIED, id="ex6-no-delete"
    ),
    pytest.param(EXAMPLES_6, Ask("GET", "/fhir/Observation", claims=client("client-id")), DENIED, id="ex6-other-type"),
    pytest.param(EXAMPLES_6, Ask("GET", "/fhir/Patient", claims=client("other-client")), DENIED, id="ex6-other-client"),
    pytest.param(EXAMPLES_6, Ask("GET", "/fhir/Patient"), DENIED, id="ex6-no-client"),
    # 7. Users in the Aidbox-Admins group: get, post, put, delete anywhere.
    pytest.param(EXAMPLES_7, Ask("GET", "/ui/console", "okta-admin"), ALLOWED, id="ex7-admin-console"),
    pytest.param(EXAMPLES_7, Ask("DELETE", "/fhir/Patient/pt-1", "okta-admin"), ALLOWED, id="ex7-admin-delete"),
    pytest.param(EXAMPLES_7, Ask("PATCH", "/fhir/Patient/pt-1", "okta-admin"), DENIED, id="ex7-admin-no-patch"),
    pytest.param(EXAMPLES_7, Ask("GET", "/ui/console", "okta-user"), DENIED, id="ex7-not-in-group"),
    # 8. The Workflow Engine screen calls `POST /rpc?_m=<method>` (no test request in the doc).
    pytest.param(
        EXAMPLES_8,
        Ask("POST", "/rpc?_m=awf.workflow/list", "john"),
        ALLOWED,
        id="ex8-workflow-list",
    ),
    pytest.param(EXAMPLES_8, Ask("POST", "/rpc?_m=aidbox.sql/query", "john"), DENIED, id="ex8-other-method"),
    pytest.param(EXAMPLES_8, Ask("POST", "/rpc?_m=awf.workflow/list", "jane"), DENIED, id="ex8-other-engineer"),
    # 9. GraphQL in rest-search mode is checked as the search it runs, GET /Patient.
    pytest.param(
        EXAMPLES_9, Ask("GET", "/Patient?_count=1", claims=client("my-client")), ALLOWED, id="ex9-patient-search"
    ),
    pytest.param(EXAMPLES_9, Ask("GET", "/fhir/Patient", claims=client("my-client")), DENIED, id="ex9-uri-is-exact"),
    pytest.param(EXAMPLES_9, Ask("GET", "/Patient", claims=client("other-client")), DENIED, id="ex9-other-client"),
    # 10. Patients of the user's own organization (Operation/FhirSearch).
    pytest.param(
        EXAMPLES_10, Ask("GET", "/Organization/org-a/fhir/Patient", "org-a-user"), ALLOWED, id="ex10-own-org-search"
    ),
    pytest.param(
        EXAMPLES_10, Ask("GET", "/Organization/org-b/fhir/Patient", "org-a-user"), DENIED, id="ex10-other-org"
    ),
    pytest.param(EXAMPLES_10, Ask("GET", "/fhir/Patient", "org-a-user"), DENIED, id="ex10-no-org-route"),
    pytest.param(
        EXAMPLES_10, Ask("GET", "/Organization/org-a/fhir/Patient", "user-1"), DENIED, id="ex10-user-without-org"
    ),
    # The doc's test request is a read (FhirRead), which the policy, linked to FhirSearch only,
    # does not apply to: Aidbox refuses it as well.
    pytest.param(
        EXAMPLES_10,
        Ask("GET", "/Organization/org-a/fhir/Patient/pt-1", "org-a-user"),
        DENIED,
        id="ex10-doc-request-is-a-read",
    ),
    # 11. Any request with a JWT from https://auth.example.com.
    pytest.param(EXAMPLES_11, Ask("GET", "/fhir/Patient", iss=AUTH_ISS), ALLOWED, id="ex11-issuer"),
    pytest.param(EXAMPLES_11, Ask("GET", "/fhir/Patient"), DENIED, id="ex11-other-issuer"),
    # 12. Patient search with general-practitioner = the user's practitioner_id.
    pytest.param(
        EXAMPLES_12,
        Ask("GET", "/fhir/Patient?general-practitioner=pr-1", "practitioner-user"),
        ALLOWED,
        id="ex12-doc-request",
    ),
    pytest.param(
        EXAMPLES_12,
        Ask("GET", "/fhir/Patient?general-practitioner=pr-2", "practitioner-user"),
        DENIED,
        id="ex12-other-practitioner",
    ),
    pytest.param(EXAMPLES_12, Ask("GET", "/fhir/Patient", "practitioner-user"), DENIED, id="ex12-no-param"),
    pytest.param(
        EXAMPLES_12,
        Ask("GET", "/fhir/Patient?general-practitioner=pr-1", "clerk"),
        DENIED,
        id="ex12-user-without-practitioner-id",
    ),
    pytest.param(
        EXAMPLES_12,
        Ask("GET", "/fhir/Patient/pt-1?general-practitioner=pr-1", "practitioner-user"),
        DENIED,
        id="ex12-read-not-linked",
    ),
    # 13. All three params, the actor being the user's fhirUser.
    pytest.param(EXAMPLES_13, Ask("GET", CONSENT_SEARCH, "practitioner-user"), ALLOWED, id="ex13-all-params"),
    pytest.param(
        EXAMPLES_13,
        Ask("GET", CONSENT_SEARCH.replace("actor=pr-1", "actor=pr-2"), "practitioner-user"),
        DENIED,
        id="ex13-other-actor",
    ),
    # The doc's test request (its <practitioner-id> filled in) has only the actor param, and the
    # policy wants all three: Aidbox refuses it as well.
    pytest.param(
        EXAMPLES_13,
        Ask("GET", "/fhir/Patient?_has:Consent:patient:actor=pr-1", "practitioner-user"),
        DENIED,
        id="ex13-doc-request-actor-only",
    ),
    pytest.param(EXAMPLES_13, Ask("GET", CONSENT_SEARCH, None), DENIED, id="ex13-anonymous"),
    # 16. Reads the body (`body.sql`): never matches here (the regex itself: test_example_16_regex).
    pytest.param(EXAMPLES_16, Ask("POST", "/$sql", EXAMPLE_16_USER), DENIED, id="ex16-body-unseen"),
    # 18. FhirTransaction (POST /fhir) for client-id.
    pytest.param(EXAMPLES_18, Ask("POST", "/fhir", claims=client("client-id")), ALLOWED, id="ex18-doc-request"),
    pytest.param(EXAMPLES_18, Ask("POST", "/fhir/", claims=client("client-id")), ALLOWED, id="ex18-trailing-slash"),
    pytest.param(
        EXAMPLES_18,
        Ask("POST", "/fhir/Patient", claims=client("client-id")),
        DENIED,
        id="ex18-create-is-not-transaction",
    ),
    pytest.param(EXAMPLES_18, Ask("POST", "/fhir", claims=client("other-client")), DENIED, id="ex18-other-client"),
]


@pytest.mark.parametrize(("where", "ask", "expected"), ACCESSPOLICY_EXAMPLES)
async def test_accesspolicy_examples(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        # 14 has `user:` twice in one mapping (Aidbox keeps the last), and an sql rule.
        pytest.param(EXAMPLE_14, "twice in one mapping", id="ex14-duplicate-key"),
        pytest.param(EXAMPLE_15, "sql", id="ex15-sql"),
        pytest.param(EXAMPLE_17, "sql", id="ex17-sql"),
    ],
)
def test_accesspolicy_examples_refused(text: str, error: str) -> None:
    assert error in refusal(text)


@pytest.mark.parametrize(
    ("query", "allowed"),
    [
        pytest.param("SELECT * FROM patient", True, id="select"),
        pytest.param("select id, resource#>>'{name,0,family}' from patient limit 10", True, id="select-lower-case"),
        pytest.param("INSERT INTO patient (id) VALUES ('x')", False, id="insert"),
        pytest.param("select 1; drop table patient", False, id="drop-after-select"),
        pytest.param("delete from patient", False, id="delete-any-case"),
        pytest.param("SELECT * FROM patient; Truncate patient", False, id="truncate-mixed-case"),
        # Java reads `(?i)` after `^` as "ignore case from here on"; the words are found anywhere,
        # so DO in "document" refuses this harmless query, in Java as here.
        pytest.param("SELECT * FROM document", False, id="keyword-inside-a-word"),
        # Java's `.` does not cross a line break and `^` is the input's start: the look-ahead only
        # reads the first line, so Aidbox lets a second-line statement through. So do we.
        pytest.param("select 1;\ndrop table patient", True, id="second-line-unchecked-as-in-java"),
    ],
)
def test_example_16_regex(query: str, allowed: bool) -> None:
    pattern = resource(EXAMPLE_16)["matcho"]["body"]["sql"]
    assert matches({"sql": pattern}, {"sql": query}) is allowed


# ======================== T/accesspolicy-best-practices.md

# T/accesspolicy-best-practices.md: Using Client and Operation in AccessPolicy
MYCLIENT_FHIR_READ = """\
{
  "resourceType": "AccessPolicy",
  "link": [{"reference": "Client/myclient"}],
  "engine": "matcho",
  "matcho": {"operation": {"id": "FhirRead"}}
}
"""
# T/accesspolicy-best-practices.md: Using Client and Operation in AccessPolicy (multiple links)
WRONG_ACCESS_POLICY = """\
{
  "id": "wrong-access-policy",
  "resourceType": "AccessPolicy",
  "link": [{"reference": "Client/myclient"}, {"reference": "Operation/FhirRead"}],
  "engine": "allow"
}
"""
# T/accesspolicy-best-practices.md: `.` path should be tested for `present?`
CREATE_OWNED_OBSERVATION = """\
{
  "engine": "matcho",
  "id": "as-patient-create-owned-observation",
  "link": [
    {
      "reference": "Operation/FhirCreate"
    }
  ],
  "matcho": {
    "uri": "/fhir/Observation",
    "body": {
      "subject": ".user.data.patient"
    },
    "request-method": "post"
  },
  "resourceType": "AccessPolicy"
}
"""
# T/accesspolicy-best-practices.md: `.` path should be tested for `present?` (the fix)
CREATE_OWNED_OBSERVATION_FIXED = """\
{
  "engine": "matcho",
  "id": "as-patient-create-owned-observation",
  "link": [
    {
      "reference": "Operation/FhirCreate"
    }
  ],
  "matcho": {
    "uri": "/fhir/Observation",
    "body": {
      "subject": ".user.data.patient"
    },
    "user": {
      "data": {
        "patient": "present?"
      }
    },
    "request-method": "post"
  },
  "resourceType": "AccessPolicy"
}
"""
# T/accesspolicy-best-practices.md: `complex` engine with `or` operator
PRACTITIONER_POLICIES = """\
id: practitioner-policies
resourceType: AccessPolicy
roleName: practitioner
engine: complex
or:
  - engine: matcho
    matcho:
      uri:
        $one-of:
          - /Patient
          - '#/Patient/[^/]+$'
        request-method: get
  - engine: matcho
    matcho:
      uri: /$graphql
      request-method: post
"""
# T/accesspolicy-best-practices.md: `complex` engine with `or` operator (split)
PRACTITIONER_POLICIES_SPLIT = """\
# see patients list & read certain patient resource
id: as-practitioner-see-patients-list-and-read-patient
resourceType: AccessPolicy
roleName: practitioner
engine: matcho
matcho:
  uri:
    $one-of:
      - /Patient
      - '#/Patient/[^/]+$'
  request-method: get

# grant access to graphql
id: as-practitioner-use-graphql
resourceType: AccessPolicy
roleName: practitioner
engine: matcho
matcho:
  uri: /$graphql
  request-method: post
"""
# T/accesspolicy-best-practices.md: Disable unsafe search parameters
UNSAFE_SEARCH = """\
engine: matcho
matcho:
  uri: /Practitioner
  request-method: GET
"""
# T/accesspolicy-best-practices.md: Disable unsafe search parameters (restricted)
UNSAFE_SEARCH_FIXED = """\
engine: matcho
matcho:
  uri: /fhir/Practitioner
  request-method: GET
  params:
    _include: nil?
    _revinclude: nil?
    _with: nil?
    _assoc: nil?
"""

# The "split" block holds two policies as one YAML document (so `id` twice): each is its half.
SPLIT_SEE_PATIENTS, SPLIT_GRAPHQL = PRACTITIONER_POLICIES_SPLIT.split("\n\n")
# A Role giving user-1 the `practitioner` role the policies name (as in rbac/flexible-rbac-built-in-to-aidbox.md).
PRACTITIONER_ROLE = {
    "resourceType": "Role",
    "id": "practioner-role-user-1",
    "name": "practitioner",
    "user": {"id": "user-1"},
}

MYCLIENT_WORLD = world(resource(MYCLIENT_FHIR_READ, id="myclient-fhir-read"))
WRONG_WORLD = world(resource(WRONG_ACCESS_POLICY))
OWNED_OBSERVATION_WORLD = world(
    resource(CREATE_OWNED_OBSERVATION),
    users=[{"resourceType": "User", "id": "patient-user", "data": {"patient": "pt-1"}}],
)
OWNED_OBSERVATION_FIXED_WORLD = world(
    resource(CREATE_OWNED_OBSERVATION_FIXED),
    users=[{"resourceType": "User", "id": "patient-user", "data": {"patient": "pt-1"}}],
)
SPLIT_WORLD = world(
    resource(SPLIT_SEE_PATIENTS),
    resource(SPLIT_GRAPHQL),
    users=[{"resourceType": "User", "id": "user-1"}, {"resourceType": "User", "id": "user-2"}],
    roles=[PRACTITIONER_ROLE],
)
UNSAFE_WORLD = world(resource(UNSAFE_SEARCH, id="public-practitioners"))
UNSAFE_FIXED_WORLD = world(resource(UNSAFE_SEARCH_FIXED, id="public-practitioners-safe"))
# A doc error: the page's policies match `request-method: GET`, but the request object's method is
# lower case (`get`) in Aidbox as here, so they match no request; the cases below say what they decide.
GET_UPPER_CASE = "request-method is lower case in Aidbox's request object, so `GET` never equals it"

BEST_PRACTICES = [
    # "It allows myclient Client reading every resource by ID."
    pytest.param(
        MYCLIENT_WORLD, Ask("GET", "/fhir/Patient/pt-1", claims=client("myclient")), ALLOWED, id="myclient-read"
    ),
    pytest.param(
        MYCLIENT_WORLD,
        Ask("GET", "/fhir/Observation/obs-1", claims=client("myclient")),
        ALLOWED,
        id="myclient-read-any-type",
    ),
    pytest.param(
        MYCLIENT_WORLD, Ask("GET", "/fhir/Patient", claims=client("myclient")), DENIED, id="myclient-not-search"
    ),
    pytest.param(
        MYCLIENT_WORLD,
        Ask("GET", "/fhir/Patient/pt-1", claims=client("yourclient")),
        DENIED,
        id="myclient-other-client",
    ),
    # "This policy will allow everything for Client myclient and FhirRead operation to anybody."
    pytest.param(
        WRONG_WORLD,
        Ask("DELETE", "/fhir/Patient/pt-1", claims=client("myclient")),
        ALLOWED,
        id="wrong-myclient-everything",
    ),
    pytest.param(
        WRONG_WORLD, Ask("GET", "/fhir/Patient/pt-1", claims=client("yourclient")), ALLOWED, id="wrong-fhirread-anybody"
    ),
    pytest.param(WRONG_WORLD, Ask("GET", "/fhir/Patient/pt-1", None), ALLOWED, id="wrong-fhirread-anonymous"),
    pytest.param(
        WRONG_WORLD,
        Ask("DELETE", "/fhir/Patient/pt-1", claims=client("yourclient")),
        DENIED,
        id="wrong-other-client-delete",
    ),
    # Both versions read the body: they never match here. The doc's point (both values missing
    # still match) is about Aidbox; docs/matcho.md: "Unresolved `.path` never matches".
    pytest.param(
        OWNED_OBSERVATION_WORLD, Ask("POST", "/fhir/Observation", "user-1"), DENIED, id="owned-observation-both-missing"
    ),
    pytest.param(
        OWNED_OBSERVATION_WORLD,
        Ask("POST", "/fhir/Observation", "patient-user"),
        DENIED,
        id="owned-observation-body-unseen",
    ),
    pytest.param(
        OWNED_OBSERVATION_FIXED_WORLD,
        Ask("POST", "/fhir/Observation", "patient-user"),
        DENIED,
        id="owned-observation-fixed-body-unseen",
    ),
    # The split policies: patients list and one patient; graphql; for the practitioner role only.
    pytest.param(
        SPLIT_WORLD,
        Ask("GET", "/Patient"),
        "as-practitioner-see-patients-list-and-read-patient",
        id="split-patients-list",
    ),
    pytest.param(
        SPLIT_WORLD,
        Ask("GET", "/Patient/pt-1"),
        "as-practitioner-see-patients-list-and-read-patient",
        id="split-read-patient",
    ),
    pytest.param(SPLIT_WORLD, Ask("GET", "/Patient/pt-1/_history"), DENIED, id="split-not-history"),
    pytest.param(SPLIT_WORLD, Ask("DELETE", "/Patient/pt-1"), DENIED, id="split-not-delete"),
    pytest.param(SPLIT_WORLD, Ask("POST", "/$graphql"), "as-practitioner-use-graphql", id="split-graphql"),
    pytest.param(SPLIT_WORLD, Ask("GET", "/Patient", "user-2"), DENIED, id="split-no-role-patients"),
    pytest.param(SPLIT_WORLD, Ask("POST", "/$graphql", "user-2"), DENIED, id="split-no-role-graphql"),
    # "This policy accepts GET /fhir/Practitioner request with any search parameter, including unsafe ones"
    pytest.param(
        UNSAFE_WORLD,
        Ask("GET", "/fhir/Practitioner?_include=Practitioner:organization", None),
        DENIED,  # the page says accepted; see GET_UPPER_CASE (and `uri: /Practitioner` is not this uri)
        id="unsafe-as-written-matches-nothing",
    ),
    pytest.param(
        UNSAFE_FIXED_WORLD,
        Ask("GET", "/fhir/Practitioner?name=John", None),
        DENIED,  # the page says accepted; see GET_UPPER_CASE
        id="unsafe-fixed-as-written-matches-nothing",
    ),
    pytest.param(
        UNSAFE_FIXED_WORLD,
        Ask("GET", "/fhir/Practitioner?_include=Practitioner:organization", None),
        DENIED,
        id="unsafe-fixed-include",
    ),
    pytest.param(
        UNSAFE_FIXED_WORLD,
        Ask("GET", "/fhir/Practitioner?_revinclude=PractitionerRole:practitioner", None),
        DENIED,
        id="unsafe-fixed-revinclude",
    ),
    pytest.param(UNSAFE_FIXED_WORLD, Ask("GET", "/fhir/Practitioner?_with=x", None), DENIED, id="unsafe-fixed-with"),
    pytest.param(UNSAFE_FIXED_WORLD, Ask("GET", "/fhir/Practitioner?_assoc=x", None), DENIED, id="unsafe-fixed-assoc"),
]


@pytest.mark.parametrize(("where", "ask", "expected"), BEST_PRACTICES)
async def test_accesspolicy_best_practices(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


def test_best_practices_complex_or_example_is_refused() -> None:
    # The "fat" policy nests `request-method: get` under `uri`, next to `$one-of`, which the matcho
    # reference says cannot share a map with other keys.
    assert "$one-of" in refusal(PRACTITIONER_POLICIES)
    # The split block as printed is one YAML mapping with `id` (and the rest) twice.
    assert "twice in one mapping" in refusal(PRACTITIONER_POLICIES_SPLIT)


def test_best_practices_unresolved_path() -> None:
    # "if both values are missing, the check may still evaluate to true": in Aidbox. Here an
    # unresolved `.path` never matches (docs/matcho.md, "Differences and decisions").
    pattern = resource(CREATE_OWNED_OBSERVATION)["matcho"]
    context = {"uri": "/fhir/Observation", "request-method": "post", "body": {"status": "final"}}
    assert matches(pattern, context) is False
    # With both present and equal, it matches; the fixed version also requires the user's patient.
    context = {**context, "body": {"subject": "pt-1"}, "user": {"data": {"patient": "pt-1"}}}
    assert matches(pattern, context) is True
    assert matches(resource(CREATE_OWNED_OBSERVATION_FIXED)["matcho"], context) is True


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        pytest.param("/Observation", True, id="observation"),
        pytest.param("/Observation/obs-1", False, id="observation-read"),
        pytest.param("/fhir/Observation", False, id="fhir-observation"),
        pytest.param("/some-path/operation-a", True, id="operation-a"),
        pytest.param("/some-path/operation-b", True, id="operation-b"),
        pytest.param("/some-path/operation-c", False, id="operation-c"),
        pytest.param("/some-path/operation-a/x", False, id="operation-a-deeper"),
    ],
)
def test_best_practices_needless_regex(uri: str, expected: bool) -> None:
    # "Needless RegEx usage": `"#^/Observation$" → "/Observation"`, and `$one-of` instead of `|`:
    # `"#^/some-path/(operation-a|operation-b)$"` → `$one-of: [/some-path/operation-a, /some-path/operation-b]`.
    if uri.startswith("/some-path"):
        regex: Any = "#^/some-path/(operation-a|operation-b)$"
        plain: Any = {"$one-of": ["/some-path/operation-a", "/some-path/operation-b"]}
    else:
        regex, plain = "#^/Observation$", "/Observation"
    assert matches({"uri": regex}, {"uri": uri}) is expected
    assert matches({"uri": plain}, {"uri": uri}) is expected


# ======================== T/rbac/flexible-rbac-built-in-to-aidbox.md, T/rbac/rbac-with-jwt-containing-role.md

# T/rbac/flexible-rbac-built-in-to-aidbox.md: Create a user
RBAC_USER = """\
id: user-1
password: password
resourceType: User
"""
# T/rbac/flexible-rbac-built-in-to-aidbox.md: Create a Role resource
RBAC_ROLE = """\
id: practioner-role-user-1
resourceType: Role
user:
  reference: User/user-1
name: practitioner
links:
  practitioner:
    reference: Practitioner/pr-1
"""
# T/rbac/flexible-rbac-built-in-to-aidbox.md: Create an access policy
RBAC_POLICY = """\
id: practitioner-role
resourceType: AccessPolicy

roleName: practitioner
engine: matcho
link:
  - id: FhirRead
    resourceType: Operation
matcho:
  uri: '#/fhir/Practitioner/.*'
  request-method: get
  params:
    resource/id: .session.role.0.links.practitioner.id
"""
# T/rbac/rbac-with-jwt-containing-role.md: Create `AccessPolicy` for the role `manager`
MANAGER_POLICY = """\
resourceType: AccessPolicy
id: as-manager-get-users-list
engine: json-schema
link:
  - reference: Operation/FhirSearch
schema:
  required:
  - jwt
  properties:
    uri:
      enum:
        - /User
      type: string
    request-method:
      constant: get
    jwt:
      required:
        - iss
        - role
      properties:
        iss:
          constant: https://auth.example.com
        role:
          constant: manager
"""
# T/rbac/rbac-with-jwt-containing-role.md: Create `JWT` token
MANAGER_JWT = """\
eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJodHRwczovL2F1dGguZXhhbXBsZS5jb20iLCJpYXQiOjE2NzU3NTgzMDEsImV4cCI6MTcwNzI5NDMwMSwiYXVkIjoiaHR0cHM6Ly9hdXRoLmV4YW1wbGUuY29tIiwic3ViIjoiYWxpY2VAZXhhbXBsZS5jb20iLCJyb2xlIjoibWFuYWdlciJ9.X7sibz1LloKlMPVV5Q39gSAJBxxutCORtYq4oRt1eAo
"""

# The policy ported from Aidbox's session to our context's top-level `role` (SPEC).
RBAC_POLICY_PORTED = RBAC_POLICY.replace(".session.role.0.", ".role.0.")
# The Role as Aidbox stores it after `POST /fhir/Role`: references in Aidbox's format
# (`{id, resourceType}`), which is what `.role.0.links.practitioner.id` reads.
RBAC_ROLE_STORED = {**resource(RBAC_ROLE), "links": {"practitioner": {"id": "pr-1", "resourceType": "Practitioner"}}}
RBAC_USERS = [resource(RBAC_USER), {"resourceType": "User", "id": "user-2"}]
RBAC_VERBATIM = world(resource(RBAC_POLICY), users=RBAC_USERS, roles=[resource(RBAC_ROLE)])
RBAC_PORTED = world(resource(RBAC_POLICY_PORTED), users=RBAC_USERS, roles=[resource(RBAC_ROLE)])
RBAC_PORTED_STORED = world(resource(RBAC_POLICY_PORTED), users=RBAC_USERS, roles=[RBAC_ROLE_STORED])
MANAGER_WORLD = world(resource(MANAGER_POLICY))
MANAGER = {"role": "manager", "aud": "https://auth.example.com"}  # the doc's sample token's claims

RBAC = [
    # "Log in as user-1 ... GET /fhir/Practitioner/pr-1 ... Aidbox returns you a Practitioner resource."
    pytest.param(RBAC_VERBATIM, Ask("GET", "/fhir/Practitioner/pr-1"), DENIED, id="flexible-verbatim-session-denies"),
    pytest.param(
        RBAC_PORTED,
        Ask("GET", "/fhir/Practitioner/pr-1"),
        ALLOWED,
        id="flexible-ported-role",  # the FHIR reference is also read in Aidbox's format, as Aidbox stores it
    ),
    pytest.param(RBAC_PORTED_STORED, Ask("GET", "/fhir/Practitioner/pr-1"), ALLOWED, id="flexible-ported-stored-role"),
    pytest.param(
        RBAC_PORTED_STORED, Ask("GET", "/fhir/Practitioner/pr-2"), DENIED, id="flexible-ported-other-practitioner"
    ),
    pytest.param(
        RBAC_PORTED_STORED, Ask("GET", "/fhir/Practitioner/pr-1", "user-2"), DENIED, id="flexible-ported-no-role"
    ),
    pytest.param(
        RBAC_PORTED_STORED, Ask("GET", "/fhir/Practitioner?_id=pr-1"), DENIED, id="flexible-ported-search-not-linked"
    ),
    pytest.param(RBAC_PORTED_STORED, Ask("PUT", "/fhir/Practitioner/pr-1"), DENIED, id="flexible-ported-update"),
    # rbac-with-jwt-containing-role.md says `GET /fhir/User` with the manager's JWT answers the
    # Bundle. A doc error: the policy's schema has `uri: {enum: [/User]}`, which `/fhir/User` is not
    # (the doc's own response links `/User?page=1`), and `GET /User` is Aidbox's `Search`, not the
    # linked `FhirSearch`; so, as written, the policy allows neither.
    pytest.param(
        MANAGER_WORLD,
        Ask("GET", "/fhir/User", "alice@example.com", MANAGER, AUTH_ISS),
        DENIED,
        id="jwt-role-manager-fhir-user-as-written",
    ),
    pytest.param(
        MANAGER_WORLD,
        Ask("GET", "/User", "alice@example.com", MANAGER, AUTH_ISS),
        DENIED,
        id="jwt-role-manager-user-as-written",
    ),
    pytest.param(
        MANAGER_WORLD,
        Ask("GET", "/fhir/User", "alice@example.com", {**MANAGER, "role": "nurse"}, AUTH_ISS),
        DENIED,
        id="jwt-role-nurse",
    ),
    pytest.param(
        MANAGER_WORLD, Ask("GET", "/fhir/User", "alice@example.com", MANAGER), DENIED, id="jwt-role-other-issuer"
    ),
]


@pytest.mark.parametrize(("where", "ask", "expected"), RBAC)
async def test_rbac(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


async def test_rbac_jwt_sample_token_is_signed_with_very_secret_and_expired() -> None:
    # The tutorial's token (HS256 with `very-secret`) verifies, but its exp (2024-02-07) has passed.
    decision = await decide(MANAGER_WORLD, Ask("GET", "/fhir/User", token=MANAGER_JWT.strip()))
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, Reason.EXPIRED)


async def test_rbac_role_context() -> None:
    # "In this case Aidbox adds the corresponding Role resource to the `role` property of the
    # request object" (and the user gets no role information of its own).
    request = Ask("GET", "/fhir/Practitioner/pr-1").request(RBAC_PORTED_STORED)
    engine = RBAC_PORTED_STORED.engine()
    decision = await engine.authorizer.check(request)
    context = engine.authorizer.context(request, decision.identity)
    # As Aidbox stores it: the user reference also as {resourceType, id}.
    user = {"reference": "User/user-1", "resourceType": "User", "id": "user-1"}
    assert context["role"] == [{**RBAC_ROLE_STORED, "user": user}]
    assert context["params"]["resource/id"] == "pr-1"
    assert context["user"] == {"id": "user-1", "password": "password", "resourceType": "User"}


# ======================== T/allow-patients-to-see-their-own-data.md

# T/allow-patients-to-see-their-own-data.md: User Login (Response)
PATIENT_LOGIN_RESPONSE = """\
{
  "token_type": "Bearer",
  "userinfo": {
    "data": {
      "roles": ["Patient"],
      "patient_id": "new-patient"
    },
    "resourceType": "User",
    "id": "patient-user",
    "meta": {
      "lastUpdated": "2020-11-06T12:18:19.530001Z",
      "createdAt": "2020-11-03T14:09:03.010136Z",
      "versionId": "426"
    }
  },
  "access_token": "MjYzOTkyZDEtODg4ZC00NTBlLTgxNDEtNjIzM2Y4NWQ1M2Vk"
}
"""
# T/allow-patients-to-see-their-own-data.md: Patient Resource access
PATIENT_ACCESS = """\
id: patient-access
engine: matcho
matcho:
  uri: '#/Patient/.*'
  params:
    resource/id: .user.data.patient_id  
  request-method: get
"""  # noqa: W291
# T/allow-patients-to-see-their-own-data.md: Encounter access
SEARCH_PATIENT_ENCOUNTER = """\
id: search-patient-encounter
engine: matcho
matcho:
  uri: /Encounter
  params:
    patient: .user.data.patient_id
  request-method: get
"""
# T/allow-patients-to-see-their-own-data.md: Observation access, Write access
CREATE_PATIENT_OBSERVATION = """\
id: create-patient-observation
engine: matcho
matcho:
  uri: '/Observation'
  body:
    subject:
      id: .user.data.patient_id
      resourceType: Patient
    performer:
      $contains:
        id: .user.data.patient_id
        resourceType: Patient
  request-method: post
"""
# T/allow-patients-to-see-their-own-data.md: Observation access, Write access (PATCH)
PATCH_OBSERVATION = """\
id: patch-observation
link:
  - id: Patch
    resourceType: Operation
engine: complex
and:
  - engine: sql
    sql:
      query: > 
        select true from observation 
        where resource#>>'{subject,id}' = {{user.data.patient_id}} 
        and id = {{params.resource/id}}
        and resource->'performer' @> jsonb_build_array(jsonb_build_object('resourceType', 'Patient', 'id', {{user.data.patient_id}}::text))
  - engine: json-schema
    schema:
      properties:
        body:
          properties:
            subject:
              optional: true
              properties:
                id:
                  constant:
                    $data: '#/user/data/patient_id’
"""  # noqa: W291, E501
# T/allow-patients-to-see-their-own-data.md: Access to the next of kin records
USER_PATCH = """\
data:
  related_patients:
    - new-patient1
"""
# T/allow-patients-to-see-their-own-data.md: Access to the next of kin records (policy)
PATIENT_ACCESS_V2 = """\
engine: matcho
matcho:
  uri: '#/Patient/.*'
  user:
    data:
      $one-of:
        - related_patients:
            $contains: .params.resource/id
        - patient_id: .params.resource/id
  request-method: get
"""

PATIENT_USER = json.loads(PATIENT_LOGIN_RESPONSE)["userinfo"]  # the User, as /auth/token shows it
# `PATCH /User/patient-user` merges `data` (Aidbox's PATCH is a merge patch).
PATCHED_PATIENT_USER = {**PATIENT_USER, "data": {**PATIENT_USER["data"], **parsed(USER_PATCH)["data"]}}
OWN_DATA = world(
    resource(PATIENT_ACCESS),
    resource(SEARCH_PATIENT_ENCOUNTER),
    resource(CREATE_PATIENT_OBSERVATION),
    users=[PATIENT_USER],
)
OWN_DATA_V2 = world(resource(PATIENT_ACCESS_V2, id="patient-access"), users=[PATCHED_PATIENT_USER])
ME = "patient-user"

OWN_DATA_CASES = [
    pytest.param(OWN_DATA, Ask("GET", "/Patient/new-patient", ME), "patient-access", id="read-own-patient"),
    # "access to any other existing Patient resource, for instance, that one with id new-patient1, will be denied"
    pytest.param(OWN_DATA, Ask("GET", "/Patient/new-patient1", ME), DENIED, id="read-other-patient"),
    pytest.param(OWN_DATA, Ask("DELETE", "/Patient/new-patient", ME), DENIED, id="delete-own-patient"),
    pytest.param(OWN_DATA, Ask("GET", "/Patient/new-patient", "someone"), DENIED, id="read-as-unknown-user"),
    pytest.param(
        OWN_DATA, Ask("GET", "/Encounter?patient=new-patient", ME), "search-patient-encounter", id="own-encounters"
    ),
    pytest.param(OWN_DATA, Ask("GET", "/Encounter?patient=new-patient1", ME), DENIED, id="other-encounters"),
    pytest.param(OWN_DATA, Ask("GET", "/Encounter", ME), DENIED, id="all-encounters"),
    # "We don't even need to add more policies, since we already have the policy that allows the
    # user to access URIs that match /Patient/.* regex."
    pytest.param(OWN_DATA, Ask("GET", "/Patient/new-patient/Observation", ME), "patient-access", id="own-compartment"),
    pytest.param(OWN_DATA, Ask("GET", "/Patient/new-patient1/Observation", ME), DENIED, id="other-compartment"),
    # create-patient-observation reads the body: never matches here.
    pytest.param(OWN_DATA, Ask("POST", "/Observation", ME), DENIED, id="create-observation-body-unseen"),
    # After `PATCH /User/patient-user` (related_patients: [new-patient1]) and the updated policy.
    pytest.param(OWN_DATA_V2, Ask("GET", "/Patient/new-patient1", ME), ALLOWED, id="v2-related-patient"),
    pytest.param(OWN_DATA_V2, Ask("GET", "/Patient/new-patient", ME), ALLOWED, id="v2-own-patient"),
    pytest.param(OWN_DATA_V2, Ask("GET", "/Patient/new-patient2", ME), DENIED, id="v2-unrelated-patient"),
    pytest.param(OWN_DATA_V2, Ask("POST", "/Patient/new-patient1", ME), DENIED, id="v2-not-get"),
]


@pytest.mark.parametrize(("where", "ask", "expected"), OWN_DATA_CASES)
async def test_allow_patients_to_see_their_own_data(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


def test_allow_patients_patch_observation_is_refused() -> None:
    # An sql rule, and the closing quote of `'#/user/data/patient_id’` is a typographic one, so
    # the YAML string never ends.
    assert "not valid YAML" in refusal(PATCH_OBSERVATION)


# ======================== T/restricting-access-to-patient-data.md

# T/restricting-access-to-patient-data.md:
#   Create AccessPolicy resource which will allow all GET requests for /fhir/Patient/*
PATIENT_COMPARTMENT = """\
{
    "resourceType": "AccessPolicy",
    "id": "allow-to-get-patient-compartment",
    "engine": "json-schema",
    "schema": {
        "type": "object",
        "properties": {
            "uri": {
              "type": "string",
              "pattern": "^/fhir/Patient/"
            },
            "params": {
                "type": "object",
                "required": ["resource/id"],
                "properties": {
                    "resource/id": {"constant": {"$data": "#/jwt/pid"}}
                }
            }
        }
    }
}
"""

COMPARTMENT_WORLD = world(resource(PATIENT_COMPARTMENT))
PID = {"pid": "pt-1"}

COMPARTMENT_CASES = [
    # "Put your patient ID value into the pid claim of your JWT."
    pytest.param(COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient/pt-1", claims=PID), ALLOWED, id="read-own"),
    pytest.param(
        COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient/pt-1/Observation", claims=PID), ALLOWED, id="own-compartment"
    ),
    pytest.param(COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient/pt-1/_history/2", claims=PID), ALLOWED, id="own-vread"),
    pytest.param(COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient/pt-2", claims=PID), DENIED, id="read-other"),
    pytest.param(
        COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient/pt-2/Observation", claims=PID), DENIED, id="other-compartment"
    ),
    pytest.param(COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient/pt-1"), DENIED, id="no-pid-claim"),
    pytest.param(COMPARTMENT_WORLD, Ask("GET", "/fhir/Observation/pt-1", claims=PID), DENIED, id="not-a-patient-uri"),
    pytest.param(COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient?_id=pt-1", claims=PID), DENIED, id="search"),
    # The same paths with a trailing slash (an upstream FHIR server may well serve them as the
    # search and the read): the policy means "your own patient's data only".
    # The router reads them as a FHIR server does (the search, the read), so the schema sees
    # resource/id (or its absence) and denies.
    pytest.param(COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient/"), DENIED, id="search-trailing-slash"),
    pytest.param(
        COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient/pt-2/", claims=PID), DENIED, id="read-other-trailing-slash"
    ),
    pytest.param(
        COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient/pt-1/", claims=PID), ALLOWED, id="read-own-trailing-slash"
    ),
    pytest.param(
        COMPARTMENT_WORLD, Ask("GET", "/fhir/Patient//Observation", claims=PID), DENIED, id="double-slash-compartment"
    ),
]


@pytest.mark.parametrize(("where", "ask", "expected"), COMPARTMENT_CASES)
async def test_restricting_access_to_patient_data(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


# ======================== T/restrict-operations-on-resource-type.md

# T/restrict-operations-on-resource-type.md: Create an access policy
READ_PATIENT_ONLY = """\
engine: matcho
matcho:
  operation:
    id:
      $enum: [Read, FhirRead]
  params:
    resource/type: Patient
"""

READ_ONLY_WORLD = world(resource(READ_PATIENT_ONLY, id="read-patient-only"))

RESTRICT_OPERATIONS = [
    # "We won't be able to create new patient because we're not allowed to use [Fhir]Create operation"
    pytest.param(READ_ONLY_WORLD, Ask("POST", "/Patient"), DENIED, id="create-forbidden"),
    pytest.param(READ_ONLY_WORLD, Ask("POST", "/fhir/Patient"), DENIED, id="fhir-create-forbidden"),
    # "[Fhir]Read operation works as expected"
    pytest.param(READ_ONLY_WORLD, Ask("GET", "/Patient/pt-1"), ALLOWED, id="read"),
    pytest.param(READ_ONLY_WORLD, Ask("GET", "/fhir/Patient/pt-1"), ALLOWED, id="fhir-read"),
    pytest.param(READ_ONLY_WORLD, Ask("GET", "/Patient"), DENIED, id="search-forbidden"),
    pytest.param(READ_ONLY_WORLD, Ask("PUT", "/fhir/Patient/pt-1"), DENIED, id="update-forbidden"),
    pytest.param(READ_ONLY_WORLD, Ask("DELETE", "/Patient/pt-1"), DENIED, id="delete-forbidden"),
    pytest.param(READ_ONLY_WORLD, Ask("GET", "/Observation/obs-1"), DENIED, id="read-other-type"),
]


@pytest.mark.parametrize(("where", "ask", "expected"), RESTRICT_OPERATIONS)
async def test_restrict_operations_on_resource_type(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


# ======================== T/debug-access-control.md

# T/debug-access-control.md: `/auth/test-policy` Operation
TEST_POLICY_BODY = """\
request:
  uri: '/fhir/Patient'
  request-method: get
  headers:
    authorization: Bearer <your-jwt>
  user:
    data: {role: 'admin'}
  -- or 
  -- user-id: 'user-1' -- aidbox will find user in database
  client:
    id: basic
    grant_types: ['basic']
  -- or 
  -- client-id: 'client-1' -- aidbox will find client in database
    
policy:
  engine: sql
  sql:
    query: 'SELECT {{user.role}} FROM {{!params.resource/type}}'
"""  # noqa: W291, W293
# T/debug-access-control.md: `/auth/test-policy` Operation (response)
TEST_POLICY_ANSWER = """\
request:
  uri: /fhir/Patient
  request-method: get
  user: {role: admin}
  params: {resource/type: Patient}
  #jwt: ...jwt-claims
operation:
  request:
  - get
  - {name: resource/type}
  action: proto.operations/search
  module: proto
  id: Search
policy:
  engine: sql
  sql: {query: 'SELECT {{user.role}} FROM {{!params.resource/type}}'}
result:
  eval-result: false
  query: ['SELECT ? FROM "patient"', admin]
"""


def test_debug_test_policy_body() -> None:
    # As printed, its `-- or` lines are not YAML (our API answers 400).
    with pytest.raises(yamlload.YamlError) as caught:
        yamlload.load(TEST_POLICY_BODY)
    assert caught.value.syntax
    # Without them: our test-policy takes the user and the client from the token, as Check does,
    # and refuses a request that names them (422).
    body = parsed("\n".join(line for line in TEST_POLICY_BODY.split("\n") if not line.strip().startswith("--")))
    config = world(resource(EXAMPLE_1)).config()
    with pytest.raises(PolicyTestError) as refused:
        parse_policy_test(body, config)
    assert refused.value.status == 422
    assert any(problem.startswith("request.user:") for problem in refused.value.problems)
    assert any(problem.startswith("request.client:") for problem in refused.value.problems)


async def test_debug_test_policy_request_object() -> None:
    # The answer's request object: uri, request-method and the router's `params: {resource/type: Patient}`.
    where = world(resource(EXAMPLE_1))
    engine = where.engine()
    config = where.config()
    token = Ask("GET", "/fhir/Patient").request(where).headers["authorization"]
    test = parse_policy_test(
        {"request": {"uri": "/fhir/Patient", "request-method": "get", "headers": {"authorization": token}}}, config
    )
    answer = await run_policy_test(engine.authorizer, config, test)
    documented = parsed(TEST_POLICY_ANSWER)["request"]
    for name in ("uri", "request-method", "params"):
        assert answer["context"][name] == documented[name]
    assert answer["decision"] == "allow"
    assert answer["policy"] == "allow-all"


# ======================== T/create-and-test-access-control.md

# T/create-and-test-access-control.md: JSON-schema version
POSTMAN_SCHEMA = """\
resourceType: AccessPolicy
id: policy-for-postman
engine: json-schema
schema:
  required:
    - client
    - uri
    - request-method
  properties:
    uri:
      type: string
      pattern: '^/fhir/.*'
    client:
      required:
        - id
      properties:
        id:
          const: postman
    request-method:
      const: get
"""
# T/create-and-test-access-control.md: `Matcho` engine version
POSTMAN_MATCHO = """\
resourceType: AccessPolicy
id: policy-for-postman
engine: matcho
matcho:
  client:
    id: postman
  uri: '#^/fhir/.*'
  request-method: get
"""
# T/create-and-test-access-control.md: User 1
USER_1 = """\
data:
  name: Camila Harrington
  roles:
    - Administrator
    - Doctor
email: user1@health-samurai.io
password: password1
id: user1
resourceType: User
"""
# T/create-and-test-access-control.md: User 2
USER_2 = """\
data:
  name: Jazmin Holmes
  roles:
    - Patient
email: user2@health-samurai.io
password: password2
id: user2
resourceType: User
"""
# T/create-and-test-access-control.md: Read-Only Access for Patient Role (matcho)
PATIENT_ROLE_MATCHO = """\
# matcho version
resourceType: AccessPolicy
id: policy-for-postman-users-role-patient
engine: matcho
matcho:
  user:
    data: { roles: {$contains: Patient} }
  client: { id: postman }
  request-method: get
"""
# T/create-and-test-access-control.md: Read-Only Access for Patient Role (json-schema)
PATIENT_ROLE_SCHEMA = """\
resourceType: AccessPolicy
id: policy-for-postman-users-role-patient
engine: json-schema
schema:
  required:
    - client
    - user
    - request-method
  properties:
    user:
      required:
        - data
      properties:
        data:
          required:
            - roles
          properties:
            roles:
              not:
                items:
                  not:
                    enum:
                      - Patient
              type: array
    client:
      required:
        - id
      properties:
        id:
          const: postman
    request-method:
      const: get
description: Read-only access for users with role Patient from client Postman
"""
# T/create-and-test-access-control.md: Full Access for Administrator Role (matcho)
ADMIN_ROLE_MATCHO = """\
# matcho version
engine: matcho
matcho:
  request-method: {$enum: ['get','post','put','delete','patch']}
  user:
    data: {roles: {$contains: 'Administrator'}}
  client: { id: postman }
"""
# T/create-and-test-access-control.md: Full Access for Administrator Role (json-schema)
ADMIN_ROLE_SCHEMA = """\
engine: json-schema
schema:
  required:
    - client
    - user
    - request-method
  properties:
    user:
      required:
        - data
      properties:
        data:
          required:
            - roles
          properties:
            roles:
              not:
                items:
                  not:
                    enum:
                      - Administrator
              type: array
    client:
      required:
        - id
      properties:
        id:
          const: postman
    request-method:
      enum:
        - get
        - post
        - put
        - delete
        - option
        - patch
        - head
description: Full access for users with role Administrator from client Postman
id: policy-for-postman-users-role-administrator
resourceType: AccessPolicy
"""

POSTMAN = client("postman")
POSTMAN_USERS = [resource(USER_1), resource(USER_2)]
ADMIN_ROLE_ID = "policy-for-postman-users-role-administrator"  # the json-schema version's id
PATIENT_ROLE_ID = "policy-for-postman-users-role-patient"
ROLE_WORLDS = {
    "matcho": world(resource(PATIENT_ROLE_MATCHO), resource(ADMIN_ROLE_MATCHO, id=ADMIN_ROLE_ID), users=POSTMAN_USERS),
    "json-schema": world(resource(PATIENT_ROLE_SCHEMA), resource(ADMIN_ROLE_SCHEMA), users=POSTMAN_USERS),
}
POSTMAN_WORLDS = {"json-schema": world(resource(POSTMAN_SCHEMA)), "matcho": world(resource(POSTMAN_MATCHO))}


@pytest.mark.parametrize("engine", ["json-schema", "matcho"])
@pytest.mark.parametrize(
    ("ask", "expected"),
    [
        # "it is allowed to use only the GET method; ... only request URIs starting with /fhir/"
        pytest.param(Ask("GET", "/fhir/Patient", claims=POSTMAN), ALLOWED, id="positive-test"),
        pytest.param(Ask("POST", "/fhir/Patient", claims=POSTMAN), DENIED, id="negative-test"),
        pytest.param(Ask("GET", "/Patient", claims=POSTMAN), DENIED, id="not-fhir"),
        pytest.param(Ask("GET", "/fhir/Patient", claims=client("insomnia")), DENIED, id="other-client"),
        pytest.param(Ask("GET", "/fhir/Patient"), DENIED, id="no-client"),
    ],
)
async def test_create_and_test_postman_policy(engine: str, ask: Ask, expected: str | None) -> None:
    await check(POSTMAN_WORLDS[engine], ask, expected)


@pytest.mark.parametrize("engine", ["matcho", "json-schema"])
@pytest.mark.parametrize(
    ("ask", "expected"),
    [
        # | Request/User | User 1 (Administrator) | User 2 (Patient) |
        # | GET          | True                   | True             |
        # | POST         | True                   | False            |
        pytest.param(Ask("GET", "/fhir/Patient", "user1", POSTMAN), ADMIN_ROLE_ID, id="get-user1"),
        pytest.param(Ask("GET", "/fhir/Patient", "user2", POSTMAN), PATIENT_ROLE_ID, id="get-user2"),
        pytest.param(Ask("POST", "/fhir/Patient", "user1", POSTMAN), ADMIN_ROLE_ID, id="post-user1"),
        pytest.param(Ask("POST", "/fhir/Patient", "user2", POSTMAN), DENIED, id="post-user2"),
        # ...from client Postman only.
        pytest.param(Ask("GET", "/fhir/Patient", "user2", client("insomnia")), DENIED, id="get-user2-other-client"),
        pytest.param(
            Ask("DELETE", "/fhir/Patient/pt-1", "user1", client("insomnia")), DENIED, id="delete-user1-other-client"
        ),
    ],
)
async def test_create_and_test_user_roles(engine: str, ask: Ask, expected: str | None) -> None:
    await check(ROLE_WORLDS[engine], ask, expected)


# ======================== T/creating-user-and-set-up-full-user-access.md

# T/creating-user-and-set-up-full-user-access.md: User resource example
EXAMPLE_USER = """\
email: test@example.com
password: '123456'
"""
# T/creating-user-and-set-up-full-user-access.md: AccessPolicy resource example
FULL_ACCESS = """\
engine: allow
link:
  - resourceType: User
    id: exampleuser
"""

FULL_ACCESS_WORLD = world(
    resource(FULL_ACCESS, id="allow-all"),  # PUT /AccessPolicy/allow-all
    users=[resource(EXAMPLE_USER, id="exampleuser")],  # PUT /User/exampleuser
)


@pytest.mark.parametrize(
    ("ask", "expected"),
    [
        pytest.param(Ask("DELETE", "/fhir/Patient/pt-1", "exampleuser"), ALLOWED, id="exampleuser-full-access"),
        pytest.param(Ask("GET", "/ui/console", "exampleuser"), ALLOWED, id="exampleuser-console"),
        pytest.param(Ask("GET", "/fhir/Patient", "user-1"), DENIED, id="other-user"),
        pytest.param(Ask("GET", "/fhir/Patient", None), DENIED, id="anonymous"),
    ],
)
async def test_creating_user_and_set_up_full_user_access(ask: Ask, expected: str | None) -> None:
    await check(FULL_ACCESS_WORLD, ask, expected)


# ======================== T/relationship-based-access-control.md

# T/relationship-based-access-control.md: Upload sample data
REBAC_DATA = """\
- {"id":"jane","resourceType":"User"}
- {"id":"janes-session","resourceType":"Session","user":{"id":"jane","resourceType":"User"},"access_token":"janes-access-token"}
- {"id":"oscar","resourceType":"User"}
- {"id":"oscars-session","resourceType":"Session","user":{"id":"oscar","resourceType":"User"},"access_token":"oscars-access-token"}
- {"id":"patient-1","resourceType":"Patient"}
- {"id":"patient-1-obs-1","resourceType":"Observation","subject":{"id":"patient-1","resourceType":"Patient"},"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"718-7","display":"hemoglobin [mass/volume] in blood"}]}}
- {"id":"patient-2","resourceType":"Patient"}
- {"id":"patient-2-obs-1","resourceType":"Observation","subject":{"id":"patient-2","resourceType":"Patient"},"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"718-7","display":"hemoglobin [mass/volume] in blood"}]}}
- {"id":"patient-3","resourceType":"Patient"}
- {"id":"patient-3-obs-1","resourceType":"Observation","subject":{"id":"patient-3","resourceType":"Patient"},"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"718-7","display":"hemoglobin [mass/volume] in blood"}]}}
- {"id":"group-1","resourceType":"Group","actual":true,"type":"person","member":[{"entity":{"id":"patient-1","resourceType":"Patient"}},{"entity":{"id":"patient-2","resourceType":"Patient"}}]}
- {"id":"group-2","resourceType":"Group","actual":true,"type":"person","member":[{"entity":{"id":"patient-2","resourceType":"Patient"}},{"entity":{"id":"patient-3","resourceType":"Patient"}}]}
- {"id":"smoking-research","resourceType":"ResearchStudy","status":"active","enrollment":[{"id":"group-1","resourceType":"Group"}],"collaborator":[{"id":"jane","resourceType":"User"},{"id":"oscar","resourceType":"User"}]}
- {"id":"diet-research","resourceType":"ResearchStudy","status":"active","enrollment":[{"id":"group-2","resourceType":"Group"}],"collaborator":[{"id":"oscar","resourceType":"User"}]}
"""  # noqa: E501
# T/relationship-based-access-control.md: List of studies
SEARCH_STUDIES = """\
description: User can search for research studies, they collaborate on
engine: matcho
matcho:
  request-method: get
  uri: /ResearchStudy
  params:
    collaborator: .user.id
    _with: nil?
    _include: nil?
    _revinclude: nil?
  user:
    id: present?
"""
# T/relationship-based-access-control.md: Read study details
READ_STUDY = """\
description: User can research study, they collaborate on
engine: complex
and:
- engine: matcho
  matcho:
    request-method: get
    uri: "#/ResearchStudy/.+"
    user:
      id: present?
- engine: sql
  sql:
    query: |
      SELECT true
      FROM "researchstudy"
      WHERE 
        id = {{params.resource/id}}
        and "researchstudy".resource @> jsonb_build_object('collaborator', jsonb_build_array(jsonb_build_object('id', {{user.id}}::text)))
      limit 1

# 201 Created, 200 OK
"""  # noqa: W291, E501
# T/relationship-based-access-control.md: Search for patients
GROUP_PATIENTS = """\
engine: complex
and:
- engine: matcho
  matcho:
    request-method: get
    uri: /Patient
    params:
      '_has:Group:member:_id': present?
      _include: nil?
      _revinclude: nil?
      _with: nil?
    user:
      id: present?
- engine: sql
  sql:
    query: |
      SELECT true
      FROM "researchstudy"
      WHERE "researchstudy".resource @>
      jsonb_build_object('collaborator', jsonb_build_array(jsonb_build_object('id', {{user.id}}::text)),
                         'enrollment', jsonb_build_array(jsonb_build_object('id', {{params._has:Group:member:_id}}::text)))
      limit 1
"""  # noqa: E501
# T/relationship-based-access-control.md: Search for observations
GROUP_OBSERVATIONS = """\
engine: complex
and:
- engine: matcho
  matcho:
    request-method: get
    uri: /Observation
    params:
      group: present?
      _include: nil?
      _revinclude: nil?
      _with: nil?
    user:
      id: present?
- engine: sql
  sql:
    query: |
      SELECT true
      FROM "researchstudy"
      WHERE "researchstudy".resource @>
      jsonb_build_object('collaborator', jsonb_build_array(jsonb_build_object('id', {{user.id}}::text)),
                         'enrollment', jsonb_build_array(jsonb_build_object('id', {{params.group}}::text)))
      limit 1
"""

REBAC_USERS = [item for item in parsed(REBAC_DATA) if item["resourceType"] == "User"]  # jane and oscar
STUDIES_WORLD = world(resource(SEARCH_STUDIES, id="user-can-search-their-research-studies"), users=REBAC_USERS)


def first_rule(text: str, ident: str) -> World:
    """The matcho rule of a complex `and` policy alone. Aidbox allows only when it matches (and
    the sql rule too), so the documented 200s need it to match, and it alone refuses some 403s."""
    rule = resource(text)["and"][0]
    assert rule["engine"] == "matcho"
    return world({"id": ident, **rule}, users=REBAC_USERS)


READ_STUDY_MATCHO = first_rule(READ_STUDY, "read-study-and-0")
GROUP_PATIENTS_MATCHO = first_rule(GROUP_PATIENTS, "group-patients-and-0")
GROUP_OBSERVATIONS_MATCHO = first_rule(GROUP_OBSERVATIONS, "group-observations-and-0")

REBAC = [
    # "Jane searches for her studies: 200 OK", "for all studies: 403", "for Oscar: 403"
    pytest.param(STUDIES_WORLD, Ask("GET", "/ResearchStudy?collaborator=jane", "jane"), ALLOWED, id="jane-her-studies"),
    pytest.param(STUDIES_WORLD, Ask("GET", "/ResearchStudy", "jane"), DENIED, id="jane-all-studies"),
    pytest.param(
        STUDIES_WORLD, Ask("GET", "/ResearchStudy?collaborator=oscar", "jane"), DENIED, id="jane-searches-oscar"
    ),
    pytest.param(
        STUDIES_WORLD, Ask("GET", "/ResearchStudy?collaborator=oscar", "oscar"), ALLOWED, id="oscar-his-studies"
    ),
    # "Why did we explicitly exclude _include, _revinclude and _with parameters?"
    pytest.param(
        STUDIES_WORLD,
        Ask("GET", "/ResearchStudy?collaborator=jane&_include=ResearchStudy:enrollment", "jane"),
        DENIED,
        id="jane-with-include",
    ),
    pytest.param(
        STUDIES_WORLD,
        Ask("GET", "/ResearchStudy?collaborator=jane&_revinclude=Observation:focus", "jane"),
        DENIED,
        id="jane-with-revinclude",
    ),
    pytest.param(STUDIES_WORLD, Ask("GET", "/ResearchStudy?collaborator=jane", None), DENIED, id="anonymous"),
    # The complex policies' matcho rules: they match each documented 200...
    pytest.param(
        READ_STUDY_MATCHO,
        Ask("GET", "/ResearchStudy/smoking-research", "jane"),
        ALLOWED,
        id="read-study-jane-smoking-matcho-part",
    ),
    pytest.param(
        READ_STUDY_MATCHO,
        Ask("GET", "/ResearchStudy/diet-research", "oscar"),
        ALLOWED,
        id="read-study-oscar-diet-matcho-part",
    ),
    pytest.param(
        GROUP_PATIENTS_MATCHO,
        Ask("GET", "/Patient?_has:Group:member:_id=group-1", "jane"),
        ALLOWED,
        id="patients-jane-group-1-matcho-part",
    ),
    pytest.param(
        GROUP_PATIENTS_MATCHO,
        Ask("GET", "/Patient?_has:Group:member:_id=group-2", "oscar"),
        ALLOWED,
        id="patients-oscar-group-2-matcho-part",
    ),
    pytest.param(
        GROUP_OBSERVATIONS_MATCHO,
        Ask("GET", "/Observation?group=group-1", "jane"),
        ALLOWED,
        id="observations-jane-group-1-matcho-part",
    ),
    pytest.param(
        GROUP_OBSERVATIONS_MATCHO,
        Ask("GET", "/Observation?group=group-2", "oscar"),
        ALLOWED,
        id="observations-oscar-group-2-matcho-part",
    ),
    # ...and alone refuse "Jane searches for all patients: 403" and "for all observations: 403".
    pytest.param(GROUP_PATIENTS_MATCHO, Ask("GET", "/Patient", "jane"), DENIED, id="patients-jane-all"),
    pytest.param(GROUP_OBSERVATIONS_MATCHO, Ask("GET", "/Observation", "jane"), DENIED, id="observations-jane-all"),
]


@pytest.mark.parametrize(("where", "ask", "expected"), REBAC)
async def test_relationship_based_access_control(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(READ_STUDY, id="read-study"),
        pytest.param(GROUP_PATIENTS, id="group-patients"),
        pytest.param(GROUP_OBSERVATIONS, id="group-observations"),
    ],
)
def test_relationship_based_sql_is_refused(text: str) -> None:
    assert "sql" in refusal(text)


# ======================== T/set-up-token-introspection.md, access-control/authentication/token-introspector.md

# T/set-up-token-introspection.md: JWT Token, 3. Cryptographic keys
KEYS_INTROSPECTOR = """\
resourceType: TokenIntrospector
id: external-auth-server
resourceType: TokenIntrospector
id: with-keys
type: jwt
jwt:
  iss: <AUTH_SERVER_URL>
  keys:
    - pub: <RSA_PUBLIC_KEY>
      kty: RSA
      alg: RS256
      format: PEM
    - pub: <RSA_PUBLIC_KEY>
      kty: RSA
      alg: RS384
      format: PEM
    - pub: <EC_PUBLIC_KEY>
      kty: EC
      alg: ES256
      format: PEM
    - k: <OCT_SECRET>
      kty: OCT
      alg: HS256
      format: plain
"""
# T/set-up-token-introspection.md: Configure Cache TTL, Example with Opaque Token
OPAQUE_INTROSPECTOR = """\
resourceType: TokenIntrospector
id: external-auth-server
type: opaque
cache_ttl: 7200  # Cache introspection results for 2 hours
introspection_endpoint:
  url: https://auth.example.com/introspect
  authorization: Basic base64credentials
"""
# T/set-up-token-introspection.md: Define `AccessPolicy`
ISSUER_POLICY = """\
resourceType: AccessPolicy
id: external-auth-server
engine: json-schema
schema:
  required:
    - jwt
  properties:
    jwt:
      required:
        - iss
      properties:
        iss:
          constant: https://auth.example.com
"""
# T/set-up-token-introspection.md: Create `User`
SOME_USER = """\
resourceType: User
id: some-user-id
data:
  id: basic
  sub: basic
  email: basic@example.com
"""
# T/set-up-token-introspection.md: Using `box_user` claim
BOX_USER_PAYLOAD = """\
{
  "iss": "https://auth.example.com",
  "sub": "keycloak-uuid-1234",
  "box_user": "some-user-id",
  "exp": 1700000000
}
"""
# T/set-up-token-introspection.md: Opaque Token, Create AccessPolicy
TOKEN_POLICY = """\
engine: matcho
matcho:
  // Everything Aidbox retrieved from  introspection_endpoint
  // will be available under `token` in AccessPolicy
  token:
    active: true
resourceType: AccessPolicy
"""
# access-control/authentication/token-introspector.md: User Resolution
MY_USER = """\
resourceType: User
id: my-user
email: user@example.com
data:
  practitioner_id: pract-123
  department: cardiology
"""
# access-control/authentication/token-introspector.md: User Resolution (policy)
CARDIOLOGY_POLICY = """\
resourceType: AccessPolicy
engine: matcho
matcho:
  user:
    data:
      department: cardiology
"""
# access-control/authentication/token-introspector.md: The `box_user` claim
MY_AIDBOX_USER_PAYLOAD = """\
{
  "iss": "https://auth.example.com",
  "sub": "keycloak-uuid-1234",
  "box_user": "my-aidbox-user",
  "exp": 1700000000
}
"""


def payload(text: str) -> tuple[str, dict[str, Any]]:
    """(sub, the other claims) of a documented JWT payload; Ask sets `iss` and a future `exp`."""
    claims = json.loads(text)
    del claims["exp"], claims["iss"]
    return claims.pop("sub"), claims


ISSUER_WORLD = world(resource(ISSUER_POLICY), users=[resource(SOME_USER)])
CARDIOLOGY_WORLD = world(resource(CARDIOLOGY_POLICY, id="cardiology"), users=[resource(MY_USER)])
# The `//` lines of the doc's policy are not YAML comments: they become `#` ones here.
TOKEN_POLICY_PORTED = TOKEN_POLICY.replace("  // ", "  # ")
OPAQUE_WORLD = world(
    resource(TOKEN_POLICY_PORTED, id="external-auth-server"),  # PUT /AccessPolicy/external-auth-server
    introspectors=[resource(OPAQUE_INTROSPECTOR)],
    introspection={"active": True, "sub": "some-user-id", "scope": "openid"},
)
SOME_USER_SUB, SOME_USER_CLAIMS = payload(BOX_USER_PAYLOAD)
MY_AIDBOX_SUB, MY_AIDBOX_CLAIMS = payload(MY_AIDBOX_USER_PAYLOAD)

TOKEN_INTROSPECTION = [
    # "JWT ... issuer should be https://auth.example.com"
    pytest.param(ISSUER_WORLD, Ask("GET", "/fhir/Patient", "basic", iss=AUTH_ISS), ALLOWED, id="issuer-allowed"),
    pytest.param(ISSUER_WORLD, Ask("GET", "/fhir/Patient", "basic"), DENIED, id="other-issuer"),
    pytest.param(
        ISSUER_WORLD,
        Ask("GET", "/fhir/Patient", SOME_USER_SUB, SOME_USER_CLAIMS, AUTH_ISS),
        ALLOWED,
        id="box-user-payload",
    ),
    # "Everything Aidbox retrieved from introspection_endpoint will be available under `token`"
    pytest.param(OPAQUE_WORLD, Ask("GET", "/fhir/Patient", token="opaque-access-token"), ALLOWED, id="opaque-active"),
    # token-introspector.md: "you can restrict access based on user.data.department"
    pytest.param(
        CARDIOLOGY_WORLD, Ask("GET", "/fhir/Patient", "my-user", iss=AUTH_ISS), ALLOWED, id="cardiology-by-sub"
    ),
    pytest.param(
        CARDIOLOGY_WORLD,
        Ask("GET", "/fhir/Patient", MY_AIDBOX_SUB, {**MY_AIDBOX_CLAIMS, "box_user": "my-user"}, AUTH_ISS),
        ALLOWED,
        id="cardiology-by-box-user",
    ),
    # The doc's payload names User/my-aidbox-user, which this store does not have.
    pytest.param(
        CARDIOLOGY_WORLD,
        Ask("GET", "/fhir/Patient", MY_AIDBOX_SUB, MY_AIDBOX_CLAIMS, AUTH_ISS),
        DENIED,
        id="cardiology-unknown-box-user",
    ),
    pytest.param(
        CARDIOLOGY_WORLD,
        Ask("GET", "/fhir/Patient", "keycloak-uuid-1234", iss=AUTH_ISS),
        DENIED,
        id="cardiology-sub-not-a-user",
    ),
]


@pytest.mark.parametrize(("where", "ask", "expected"), TOKEN_INTROSPECTION)
async def test_token_introspection(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


async def test_token_introspection_inactive_opaque_token() -> None:
    inactive = world(*OPAQUE_WORLD.policies, introspectors=OPAQUE_WORLD.introspectors, introspection={"active": False})
    decision = await decide(inactive, Ask("GET", "/fhir/Patient", token="revoked-token"))
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, Reason.INACTIVE)


async def test_token_introspection_box_user_resolution() -> None:
    # "Aidbox will resolve User/some-user-id using the box_user claim, while sub remains available
    # in the JWT claims for AccessPolicy evaluation."
    ask = Ask("GET", "/fhir/Patient", SOME_USER_SUB, SOME_USER_CLAIMS, AUTH_ISS)
    engine = ISSUER_WORLD.engine()
    request = ask.request(ISSUER_WORLD)
    decision = await engine.authorizer.check(request)
    context = engine.authorizer.context(request, decision.identity)
    assert context["user"] == resource(SOME_USER)
    assert context["jwt"]["sub"] == "keycloak-uuid-1234"
    assert context["jwt"]["box_user"] == "some-user-id"


def test_token_introspection_configs() -> None:
    # The short secret is accepted, with a warning (SPEC).
    warnings = ISSUER_WORLD.config().warnings
    assert any("external-auth-server" in warning and "jwt.secret" in warning for warning in warnings)
    # The keys example repeats `resourceType` and `id`: refused as duplicate keys.
    text = f"introspectors:\n  - {textwrap.indent(KEYS_INTROSPECTOR, '    ')[4:]}"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    assert "twice in one mapping" in str(caught.value)
    # The opaque policy as printed: its `//` lines are not YAML.
    assert "not valid YAML" in refusal(TOKEN_POLICY)


# ======================== T/keycloak-auto-create-user.md, okta, apple, basic-auth, client-credentials-grant

# T/keycloak-auto-create-user.md: 3. Create AccessPolicy
KEYCLOAK_POLICY = """\
resourceType: AccessPolicy
engine: matcho
matcho:
  jwt:
    iss: http://localhost:8180/realms/myrealm
"""
# T/keycloak-auto-create-user.md: Getting JWT token (Example JWT)
KEYCLOAK_JWT = """\
{
  "exp": 1758805244,
  "iat": 1758804944,
  "jti": "trrtcc:0380f499-624a-be8d-9e0f-f3c9b47f2074",
  "iss": "http://localhost:8180/realms/myrealm",
  "aud": "account",
  "sub": "74ae9aaf-5681-4231-96d3-eeec940a20b4",
  "typ": "Bearer",
  "azp": "my-client",
  "acr": "1",
  "allowed-origins": [
    "/*"
  ],
  "realm_access": {
    "roles": [
      "default-roles-myrealm",
      "offline_access",
      "uma_authorization"
    ]
  },
  "resource_access": {
    "account": {
      "roles": [
        "manage-account",
        "manage-account-links",
        "view-profile"
      ]
    }
  },
  "scope": "profile email",
  "email_verified": false,
  "clientHost": "192.168.112.1",
  "preferred_username": "service-account-my-client",
  "clientAddress": "192.168.112.1",
  "client_id": "my-client"
}
"""
# T/managing-admin-access-to-the-aidbox-ui-using-okta-groups.md: Create the AccessPolicy
OKTA_POLICY = """\
{
 "engine": "matcho",
 "matcho": {
  "user": {
   "data": {
    "groups": {
     "$contains": "Aidbox-Admins"
    }
   }
  },
  "request-method": {
   "$enum": [
    "get",
    "post",
    "put",
    "delete"
   ]
  }
 },
 "resourceType": "AccessPolicy"
}
"""
# T/apple.md: Create the AccessPolicy
APPLE_POLICY = """\
{
 "engine": "matcho",
 "matcho": {
  "user": {
   "email": "aleksandr.kislitsyn@health-samurai.io"
  },
  "request-method": {
   "$enum": [
    "get",
    "post",
    "put",
    "delete"
   ]
  }
 },
 "resourceType": "AccessPolicy"
}
"""
# T/basic-auth.md: Basic Auth (AccessPolicy)
BASIC_CLIENT_POLICY = """\
id: api-clients
engine: allow # which means it has permisions for everything
description: Root access to specific clients
link:
  # link policy with client
  - reference: Client/basic

"""
# T/client-credentials-grant.md: Client Credentials Grant (AccessPolicy)
API_CLIENT_POLICY = """\
engine: allow
link:
  - id: api-client
    resourceType: Client
"""

KEYCLOAK_SUB, KEYCLOAK_CLAIMS = payload(KEYCLOAK_JWT)
KEYCLOAK_WORLD = world(resource(KEYCLOAK_POLICY, id="keycloak-users-policy"))
OKTA_WORLD = world(
    resource(OKTA_POLICY, id="okta-admins-policy"),
    users=[
        {"resourceType": "User", "id": "okta-admin", "data": {"groups": ["Aidbox-Admins"]}},
        {"resourceType": "User", "id": "okta-user", "data": {"groups": ["Everyone"]}},
    ],
)
APPLE_WORLD = world(
    resource(APPLE_POLICY, id="apple-admins-policy"),
    users=[
        {"resourceType": "User", "id": "apple-admin", "email": "aleksandr.kislitsyn@health-samurai.io"},
        {"resourceType": "User", "id": "apple-user", "email": "someone@example.com"},
    ],
)
CLIENTS_WORLD = world(resource(BASIC_CLIENT_POLICY), resource(API_CLIENT_POLICY, id="api-client"))

IDENTITY_PROVIDERS = [
    # "With this AccessPolicy, we allow every request with iss: http://localhost:8180/realms/myrealm."
    pytest.param(
        KEYCLOAK_WORLD,
        Ask("GET", "/fhir/User", KEYCLOAK_SUB, KEYCLOAK_CLAIMS, KEYCLOAK_ISS),
        ALLOWED,
        id="keycloak-service-account",
    ),
    pytest.param(
        KEYCLOAK_WORLD,
        Ask("DELETE", "/fhir/Patient/pt-1", KEYCLOAK_SUB, KEYCLOAK_CLAIMS, KEYCLOAK_ISS),
        ALLOWED,
        id="keycloak-any-request",
    ),
    pytest.param(
        KEYCLOAK_WORLD, Ask("GET", "/fhir/User", KEYCLOAK_SUB, KEYCLOAK_CLAIMS), DENIED, id="keycloak-other-issuer"
    ),
    # Okta groups: "relogin with your Okta user and the user will be granted admin access"
    pytest.param(OKTA_WORLD, Ask("GET", "/ui/console", "okta-admin"), ALLOWED, id="okta-admin"),
    pytest.param(OKTA_WORLD, Ask("PUT", "/fhir/Patient/pt-1", "okta-admin"), ALLOWED, id="okta-admin-put"),
    pytest.param(OKTA_WORLD, Ask("GET", "/ui/console", "okta-user"), DENIED, id="okta-not-admin"),
    pytest.param(OKTA_WORLD, Ask("PATCH", "/fhir/Patient/pt-1", "okta-admin"), DENIED, id="okta-no-patch"),
    # Apple: the user with that email.
    pytest.param(APPLE_WORLD, Ask("POST", "/fhir/Patient", "apple-admin"), ALLOWED, id="apple-admin"),
    pytest.param(APPLE_WORLD, Ask("GET", "/fhir/Patient", "apple-user"), DENIED, id="apple-other-email"),
    # Basic auth and client credentials: engine allow, linked to the client.
    pytest.param(CLIENTS_WORLD, Ask("GET", "/fhir/Patient", claims=client("basic")), "api-clients", id="basic-client"),
    pytest.param(
        CLIENTS_WORLD,
        Ask("DELETE", "/Patient/pt-1", claims=client("api-client")),
        "api-client",
        id="client-credentials",
    ),
    pytest.param(
        CLIENTS_WORLD, Ask("GET", "/fhir/Patient", claims=client("my-smart-client")), DENIED, id="unlinked-client"
    ),
    pytest.param(CLIENTS_WORLD, Ask("GET", "/fhir/Patient", "basic"), DENIED, id="user-named-like-the-client"),
]


@pytest.mark.parametrize(("where", "ask", "expected"), IDENTITY_PROVIDERS)
async def test_identity_provider_tutorials(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


async def test_keycloak_token_client_is_its_azp() -> None:
    ask = Ask("GET", "/fhir/User", KEYCLOAK_SUB, KEYCLOAK_CLAIMS, KEYCLOAK_ISS)
    engine = KEYCLOAK_WORLD.engine()
    request = ask.request(KEYCLOAK_WORLD)
    decision = await engine.authorizer.check(request)
    assert engine.authorizer.context(request, decision.identity)["client"] == {"id": "my-client"}


# ======================== T/how-to-enable-{labels-based,hierarchical}-access-control.md, consent, SMART

# T/how-to-enable-labels-based-access-control.md: Create TokenIntrospector
LABELS_INTROSPECTOR = """\
resourceType: TokenIntrospector
id: security-labels-demo-client
type: jwt
jwt:
  iss: https://auth.example.com
  secret: secret
"""
# T/how-to-enable-labels-based-access-control.md: Create AccessPolicy
LABELS_POLICY = """\
resourceType: AccessPolicy
id: as-security-labels-demo-client-do-read-search
link:
- resourceType: Operation
  id: FhirRead
- resourceType: Operation
  id: FhirSearch
engine: matcho
matcho:
  jwt:
    iss: https://auth.example.com
"""
# T/how-to-enable-labels-based-access-control.md: Ensure the security labels access control works (JWT)
LABELS_JWT = """\
eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2F1dGguZXhhbXBsZS5jb20iLCJzY29wZSI6Imh0dHA6Ly90ZXJtaW5vbG9neS5obDcub3JnL0NvZGVTeXN0ZW0vdjMtQ29uZmlkZW50aWFsaXR5fFIgaHR0cDovL3Rlcm1pbm9sb2d5LmhsNy5vcmcvQ29kZVN5c3RlbS92My1BY3RDb2RlfFBTWSBodHRwOi8vdGVybWlub2xvZ3kuaGw3Lm9yZy9Db2RlU3lzdGVtL3YzLUFjdENvZGV8Q1RDT01QVCJ9.7QZ65gtJPjiWVYjtvtuatvhq6262Sth3z4un_8rDdQg
"""
# T/how-to-enable-hierarchical-access-control.md: Configuring AccessPolicies (Recommended way)
ORG_PATIENTS = """\
description: A user should be able to get every patient in their organization.
engine: matcho
matcho:
  params:
    resource/type: Patient
  request-method: get
  user:
    meta:
      extension:
        $contains:
          url: https://aidbox.app/tenant-organization-id
          value:
            Reference:
              id: .params.organization/id
"""
# T/how-to-enable-hierarchical-access-control.md: Configuring AccessPolicies (Correct Aidbox format is false)
ORG_PATIENTS_FHIR_FORMAT = """\
description: A user should be able to get every patient in their organization.
engine: matcho
matcho:
  params:
    resource/type: Patient
  request-method: get
  user:
    meta:
      extension:
        $contains:
          url: https://aidbox.app/tenant-organization-id
          valueReference:
            $reference:
              id: .params.organization/id
"""
# T/how-to-implement-consent-based-access-control-using-fhir-search-and-aidbox-access-policy.md:
#   Create the AccessPolicy
CONSENT_POLICY = """\
{
  "engine": "matcho",
  "id": "practitioner-consent-based-observation",
  "link": [
    {
      "reference": "Operation/FhirSearch"
    }
  ],
  "matcho": {
    "user": "present?",
    "params": {
      "actor": ".user.fhirUser.id",
      "scope": "Observation",
      "_include": "Consent:patient",
      "_revinclude:iterate": "Observation:subject"
    }
  },
  "resourceType": "AccessPolicy"
}
"""
# T/how-to-implement-consent-based-access-control-using-fhir-search-and-aidbox-access-policy.md:
#   Construct the FHIR Search
CONSENT_SEARCH_REQUEST = """\
GET /fhir/Consent?actor=pr-1&scope=Observation&_include=Consent:patient&_revinclude:iterate=Observation:subject
content-type: application/json
accept: application/json
"""
# T/how-to-enable-smart-on-fhir-on-patient-access-api.md: Create AccessPolicy resources
SMART_POLICIES = """\
- id: allow-public-operation
  resourceType: AccessPolicy
  engine: matcho
  matcho:
    uri:
      $one-of:
      - /patient/fhir/metadata
      - /patient/fhir/style-v1.json
      - /patient/fhir/.well-known/smart-configuration
      - /patient/auth/login
      - /patient/auth/authorize
      - /patient/auth/authenticate
      - /patient/auth/grant
- id: allow-patient-access-api-over-smart-on-fhir
  resourceType: AccessPolicy
  engine: complex
  and:
  - engine: matcho
    matcho:
      uri: '#/patient/fhir/.+'
      client:
        type: smart-app
  - engine: smart-on-fhir
"""

LABELS_WORLD = world(resource(LABELS_POLICY), introspectors=[resource(LABELS_INTROSPECTOR)])
ORG_B_USER = {**ORG_A_USER, "id": "org-b-user"}
ORG_B_USER["meta"] = {"extension": [{**ORG_A_USER["meta"]["extension"][0], "value": {"Reference": {"id": "org-b"}}}]}
ORG_WORLD = world(resource(ORG_PATIENTS, id="as-user-allow-org-patients"), users=[ORG_A_USER, ORG_B_USER])
ORG_FHIR_FORMAT_WORLD = world(
    resource(ORG_PATIENTS_FHIR_FORMAT, id="as-user-allow-org-patients"),
    users=[  # with "Correct Aidbox format" off, the extension keeps FHIR's valueReference
        {
            "resourceType": "User",
            "id": "org-a-user",
            "meta": {
                "extension": [
                    {
                        "url": "https://aidbox.app/tenant-organization-id",
                        "valueReference": {"reference": "Organization/org-a"},
                    }
                ]
            },
        }
    ],
)
CONSENT_WORLD = world(
    resource(CONSENT_POLICY),
    users=[  # "we have linked the Aidbox User resource to the Practitioner resource with User.fhirUser"
        {"resourceType": "User", "id": "pr-1-user", "fhirUser": {"id": "pr-1", "resourceType": "Practitioner"}},
        {"resourceType": "User", "id": "pr-2-user", "fhirUser": {"id": "pr-2", "resourceType": "Practitioner"}},
    ],
)
CONSENT_PATH = CONSENT_SEARCH_REQUEST.split("\n")[0].removeprefix("GET ")
SMART_PUBLIC_WORLD = world(parsed(SMART_POLICIES)[0])

MORE_TUTORIALS = [
    # Labels: "allows FhirRead and FhirSearch operations for requesters having JWT with iss https://auth.example.com"
    pytest.param(LABELS_WORLD, Ask("GET", "/fhir/Patient/pt-1", iss=AUTH_ISS), ALLOWED, id="labels-read"),
    pytest.param(LABELS_WORLD, Ask("GET", "/fhir/Observation", iss=AUTH_ISS), ALLOWED, id="labels-search"),
    pytest.param(LABELS_WORLD, Ask("POST", "/fhir/Patient", iss=AUTH_ISS), DENIED, id="labels-create-not-linked"),
    pytest.param(
        LABELS_WORLD, Ask("DELETE", "/fhir/Patient/pt-1", iss=AUTH_ISS), DENIED, id="labels-delete-not-linked"
    ),
    # Hierarchical: "allows an org-based user ... to see patients that are also created in the same organization"
    pytest.param(
        ORG_WORLD,
        Ask("GET", "/Organization/org-a/fhir/Patient/pt-1", "org-a-user"),
        ALLOWED,
        id="org-a-user-reads-in-org-a",
    ),
    pytest.param(
        ORG_WORLD, Ask("GET", "/Organization/org-a/fhir/Patient", "org-a-user"), ALLOWED, id="org-a-user-searches-org-a"
    ),
    pytest.param(
        ORG_WORLD,
        Ask("GET", "/Organization/org-b/fhir/Patient/pt-1", "org-b-user"),
        ALLOWED,
        id="org-b-user-reads-in-org-b",
    ),
    pytest.param(
        ORG_WORLD, Ask("GET", "/Organization/org-b/fhir/Patient/pt-1", "org-a-user"), DENIED, id="org-a-user-in-org-b"
    ),
    pytest.param(
        ORG_WORLD, Ask("GET", "/Organization/org-c/fhir/Patient/pt-1", "org-b-user"), DENIED, id="org-b-user-in-org-c"
    ),
    pytest.param(ORG_WORLD, Ask("GET", "/fhir/Patient/pt-1", "org-a-user"), DENIED, id="org-user-outside-org-routes"),
    pytest.param(
        ORG_WORLD, Ask("DELETE", "/Organization/org-a/fhir/Patient/pt-1", "org-a-user"), DENIED, id="org-user-delete"
    ),
    pytest.param(
        ORG_FHIR_FORMAT_WORLD,
        Ask("GET", "/Organization/org-a/fhir/Patient/pt-1", "org-a-user"),
        ALLOWED,
        id="org-fhir-format-reference",
    ),
    pytest.param(
        ORG_FHIR_FORMAT_WORLD,
        Ask("GET", "/Organization/org-b/fhir/Patient/pt-1", "org-a-user"),
        DENIED,
        id="org-fhir-format-other-org",
    ),
    # Consent: "the access policy that allows the FHIR Search above"
    pytest.param(CONSENT_WORLD, Ask("GET", CONSENT_PATH, "pr-1-user"), ALLOWED, id="consent-search"),
    pytest.param(CONSENT_WORLD, Ask("GET", CONSENT_PATH, "pr-2-user"), DENIED, id="consent-other-practitioner"),
    pytest.param(
        CONSENT_WORLD,
        Ask("GET", CONSENT_PATH.replace("&_include=Consent:patient", ""), "pr-1-user"),
        DENIED,
        id="consent-no-include",
    ),
    pytest.param(
        CONSENT_WORLD,
        Ask("GET", CONSENT_PATH.replace("actor=pr-1", "actor=pr-2"), "pr-1-user"),
        DENIED,
        id="consent-other-actor",
    ),
    pytest.param(CONSENT_WORLD, Ask("GET", CONSENT_PATH, None), DENIED, id="consent-anonymous"),
    # SMART on FHIR: the public endpoints, with no token at all.
    pytest.param(SMART_PUBLIC_WORLD, Ask("GET", "/patient/fhir/metadata", None), ALLOWED, id="smart-metadata-public"),
    pytest.param(
        SMART_PUBLIC_WORLD,
        Ask("GET", "/patient/fhir/.well-known/smart-configuration", None),
        ALLOWED,
        id="smart-configuration-public",
    ),
    pytest.param(SMART_PUBLIC_WORLD, Ask("POST", "/patient/auth/token", None), DENIED, id="smart-token-not-listed"),
    pytest.param(
        SMART_PUBLIC_WORLD, Ask("GET", "/patient/fhir/Patient/my-patient", None), DENIED, id="smart-data-not-public"
    ),
]


@pytest.mark.parametrize(("where", "ask", "expected"), MORE_TUTORIALS)
async def test_more_tutorials(where: World, ask: Ask, expected: str | None) -> None:
    await check(where, ask, expected)


async def test_labels_sample_token_has_no_exp() -> None:
    # The tutorial's tokens (HS256 with `secret`) have no `exp`, which SPEC requires.
    decision = await decide(LABELS_WORLD, Ask("GET", "/fhir/Patient/pt-1", token=LABELS_JWT.strip()))
    # (BAD_CLAIMS, not BAD_SIGNATURE: the signature checks out with the tutorial's `secret`.)
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, Reason.BAD_CLAIMS)


def test_smart_on_fhir_engine_is_refused() -> None:
    # `engine: smart-on-fhir` (SMART scopes over Aidbox's own clients) is not an engine we have.
    error = refusal(*(json.dumps(item) + "\n" for item in parsed(SMART_POLICIES)))
    assert "smart-on-fhir" in error


# ======================== api/bulk-api/configure-access-policies-for-bulk-api.md

# api/bulk-api/configure-access-policies-for-bulk-api.md: Configure access policies for bulk API
BULK_RESOURCES = r"""- resourceType: Client
  id: bulk-client
  secret: secret
  grant_types: ['basic']

- resourceType: AccessPolicy
  id: bulk-client-dump
  engine: matcho
  matcho:
    $one-of:
    - uri: /$dump-sql
      request-method: post
    - uri: "#/.*/\\$dump$"
      request-method: get
    - uri: "#/.*/\\$dump-csv$"
      request-method: get
    - uri:
        $one-of:
          - /$import
          - /fhir/$import
      request-method: post
    - uri:
        $one-of:
          - /$load
          - /fhir/$load
          - "#/.*/\\$load$"
  link:
  - {id: 'bulk-client', resourceType: 'Client'}
"""

BULK_WORLD = world(*(item for item in parsed(BULK_RESOURCES) if item["resourceType"] == "AccessPolicy"))
BULK = client("bulk-client")


@pytest.mark.parametrize(
    ("ask", "expected"),
    [
        pytest.param(Ask("POST", "/$dump-sql", claims=BULK), ALLOWED, id="dump-sql"),
        pytest.param(Ask("GET", "/fhir/Patient/$dump", claims=BULK), ALLOWED, id="dump"),
        pytest.param(Ask("GET", "/Observation/$dump-csv", claims=BULK), ALLOWED, id="dump-csv"),
        pytest.param(Ask("POST", "/$import", claims=BULK), ALLOWED, id="import"),
        pytest.param(Ask("POST", "/fhir/$import", claims=BULK), ALLOWED, id="fhir-import"),
        pytest.param(Ask("POST", "/fhir/$load", claims=BULK), ALLOWED, id="load"),
        pytest.param(Ask("PUT", "/fhir/Patient/$load", claims=BULK), ALLOWED, id="load-any-method"),
        pytest.param(Ask("GET", "/$dump-sql", claims=BULK), DENIED, id="dump-sql-not-get"),
        pytest.param(Ask("POST", "/fhir/Patient/$dump", claims=BULK), DENIED, id="dump-not-post"),
        pytest.param(Ask("GET", "/$import", claims=BULK), DENIED, id="import-not-get"),
        pytest.param(Ask("GET", "/fhir/Patient", claims=BULK), DENIED, id="not-bulk"),
        pytest.param(Ask("POST", "/$dump-sql", claims=client("other-client")), DENIED, id="other-client"),
    ],
)
async def test_bulk_api_policy(ask: Ask, expected: str | None) -> None:
    await check(BULK_WORLD, ask, expected)
