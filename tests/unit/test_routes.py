"""routes: what Aidbox's router reads from a FHIR-style path, and how build_context merges it.

Each case is the curl path it comes from; `route` sees the lower-case method and the path
without its query. Route parameters are reserved: only the path may set them.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_service.context import build_context
from authz_service.engine import Engine, build_engine
from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.registries import parse_config
from authz_service.routes import (
    OPERATION_NAME,
    ORGANIZATION_ID,
    RESOURCE_ID,
    RESOURCE_TYPE,
    RESOURCE_VERSION,
    ROUTE_PARAMS,
    Route,
    parse_reference,
    route,
    unrouted,
    with_aidbox_references,
)
from authz_service.tokens.cache import CacheFactory
from tests.unit.fakes import FakeIdpClient, hs_token

TYPE = RESOURCE_TYPE
ID = RESOURCE_ID
VERSION = RESOURCE_VERSION
ORG = ORGANIZATION_ID
OP = OPERATION_NAME

INTERACTIONS = {
    "Read",
    "Vread",
    "Search",
    "Create",
    "Update",
    "Patch",
    "Delete",
    "ConditionalUpdate",
    "ConditionalPatch",
    "ConditionalDelete",
    "History",
    "Transaction",
    "Operation",
    "CompartmentSearch",
}
OPERATION_IDS = INTERACTIONS | {"Fhir" + name for name in INTERACTIONS}


def case(method: str, path: str, params: dict[str, str], operation: str | None) -> object:
    return pytest.param(method, path, Route(params, operation), id=f"{method} {path}")


FHIR_ROUTES = [
    # instance level
    case("get", "/fhir/Patient/pt-1", {TYPE: "Patient", ID: "pt-1"}, "FhirRead"),
    case("head", "/fhir/Patient/pt-1", {TYPE: "Patient", ID: "pt-1"}, "FhirRead"),
    case("put", "/fhir/Patient/pt-1", {TYPE: "Patient", ID: "pt-1"}, "FhirUpdate"),
    case("patch", "/fhir/Patient/pt-1", {TYPE: "Patient", ID: "pt-1"}, "FhirPatch"),
    case("delete", "/fhir/Patient/pt-1", {TYPE: "Patient", ID: "pt-1"}, "FhirDelete"),
    case("get", "/fhir/Patient/pt-1/_history/2", {TYPE: "Patient", ID: "pt-1", VERSION: "2"}, "FhirVread"),
    case("get", "/fhir/Patient/pt-1/_history", {TYPE: "Patient", ID: "pt-1"}, "FhirHistory"),
    # type level
    case("get", "/fhir/Patient", {TYPE: "Patient"}, "FhirSearch"),
    case("head", "/fhir/Patient", {TYPE: "Patient"}, "FhirSearch"),
    case("post", "/fhir/Patient/_search", {TYPE: "Patient"}, "FhirSearch"),
    case("post", "/fhir/Patient", {TYPE: "Patient"}, "FhirCreate"),
    case("put", "/fhir/Patient", {TYPE: "Patient"}, "FhirConditionalUpdate"),
    case("patch", "/fhir/Patient", {TYPE: "Patient"}, "FhirConditionalPatch"),
    case("delete", "/fhir/Patient", {TYPE: "Patient"}, "FhirConditionalDelete"),
    case("get", "/fhir/Patient/_history", {TYPE: "Patient"}, "FhirHistory"),
    # system level: transactions and operations
    case("post", "/fhir", {}, "FhirTransaction"),
    case("post", "/fhir/", {}, "FhirTransaction"),
    case("get", "/fhir/$export", {OP: "$export"}, "FhirOperation"),
    case("post", "/fhir/$graphql", {OP: "$graphql"}, "FhirOperation"),
    # operations at type and instance level, whatever the method
    case("post", "/fhir/Patient/$validate", {TYPE: "Patient", OP: "$validate"}, "FhirOperation"),
    case("get", "/fhir/Patient/pt-1/$everything", {TYPE: "Patient", ID: "pt-1", OP: "$everything"}, "FhirOperation"),
    case("delete", "/fhir/Patient/pt-1/$purge", {TYPE: "Patient", ID: "pt-1", OP: "$purge"}, "FhirOperation"),
    # a compartment: the compartment's own type and id
    case("get", "/fhir/Patient/pt-1/Observation", {TYPE: "Patient", ID: "pt-1"}, "FhirCompartmentSearch"),
    # Aidbox's own API: the same routes without /fhir, the same names without Fhir
    case("get", "/Patient/pt-1", {TYPE: "Patient", ID: "pt-1"}, "Read"),
    case("get", "/Patient/pt-1/_history/7", {TYPE: "Patient", ID: "pt-1", VERSION: "7"}, "Vread"),
    case("get", "/Patient", {TYPE: "Patient"}, "Search"),
    case("post", "/Patient", {TYPE: "Patient"}, "Create"),
    case("delete", "/Patient", {TYPE: "Patient"}, "ConditionalDelete"),
    case("get", "/Patient/_history", {TYPE: "Patient"}, "History"),
    case("post", "/", {}, "Transaction"),
    case("post", "/$sql", {OP: "$sql"}, "Operation"),
    case("get", "/Patient/pt-1/Observation", {TYPE: "Patient", ID: "pt-1"}, "CompartmentSearch"),
    # the organization prefix (only in front of /fhir)
    case("get", "/Organization/org-1/fhir/Patient/pt-1", {ORG: "org-1", TYPE: "Patient", ID: "pt-1"}, "FhirRead"),
    case("post", "/Organization/org-1/fhir", {ORG: "org-1"}, "FhirTransaction"),
    case("post", "/Organization/org-1/fhir/", {ORG: "org-1"}, "FhirTransaction"),
    case("get", "/Organization/org-1/fhir/Patient", {ORG: "org-1", TYPE: "Patient"}, "FhirSearch"),
    case("get", "/Organization/org-1/fhir/$export", {ORG: "org-1", OP: "$export"}, "FhirOperation"),
    case(
        "get",
        "/Organization/org-1/fhir/Patient/pt-1/_history/2",  # 8 segments: the longest route
        {ORG: "org-1", TYPE: "Patient", ID: "pt-1", VERSION: "2"},
        "FhirVread",
    ),
    # without /fhir after it, /Organization/<id>/... is an Organization compartment
    case("get", "/Organization/org-1/Patient", {TYPE: "Organization", ID: "org-1"}, "CompartmentSearch"),
    # FHIR ids: letters, digits, '-' and '.', 1 to 64 characters; types: an upper-case letter first
    case("get", "/fhir/Patient/a.B-9", {TYPE: "Patient", ID: "a.B-9"}, "FhirRead"),
    case("get", "/fhir/Patient/" + "x" * 64, {TYPE: "Patient", ID: "x" * 64}, "FhirRead"),
    case("get", "/fhir/" + "P" * 64, {TYPE: "P" * 64}, "FhirSearch"),
    case("get", "/fhir/Patient/pt-1/_history/v.1-a", {TYPE: "Patient", ID: "pt-1", VERSION: "v.1-a"}, "FhirVread"),
    # Aidbox's RPC endpoint: the Operation `rpc` (the method is in the body or `_m`)
    case("post", "/rpc", {}, "rpc"),
    # A trailing slash and repeated slashes do not count, as for a FHIR server (and Envoy's merge_slashes)
    case("get", "/fhir/Patient/", {TYPE: "Patient"}, "FhirSearch"),
    case("get", "/fhir/Patient/pt-2/", {TYPE: "Patient", ID: "pt-2"}, "FhirRead"),
    case("get", "/fhir//Patient//pt-2", {TYPE: "Patient", ID: "pt-2"}, "FhirRead"),
    case("get", "//fhir/Patient", {TYPE: "Patient"}, "FhirSearch"),
    case("get", "/fhir/Patient/pt-1/_history/2/", {TYPE: "Patient", ID: "pt-1", VERSION: "2"}, "FhirVread"),
]


@pytest.mark.parametrize(("method", "path", "expected"), FHIR_ROUTES)
def test_fhir_routes(method: str, path: str, expected: Route) -> None:
    assert route(method, path) == expected


NOT_ROUTES = [
    # not FHIR-style at all
    ("get", "/api/Patient"),  # lower-case first segment
    ("get", "/fhir/patient"),
    ("get", "/fhir/fhir/Patient"),
    ("get", "/healthz"),
    ("get", "/"),
    ("get", "/fhir"),  # the base is a route for POST (a transaction) only
    ("get", "/fhir/"),
    ("get", "fhir/Patient"),  # not absolute
    ("get", "/fhir/_history"),
    ("get", "/fhir/" + "P" * 65),  # a type longer than 64
    # bad ids and versions
    ("get", "/fhir/Patient/pt_1"),
    ("get", "/fhir/Patient/.."),  # never an id: a path segment that climbs
    ("get", "/fhir/Patient/."),
    ("get", "/fhir/Patient/pt%201"),
    ("get", "/fhir/Patient/pt 1"),
    ("get", "/fhir/Patient/" + "x" * 65),
    ("get", "/fhir/Patient/pt-1/_history/v_2"),
    ("get", "/Organization/org_1/fhir/Patient"),
    ("get", "/Organization/org-1/fhir/"),  # the organization's base, but not a POST
    ("get", "/Organization/o1/Organization/o2/fhir/Patient"),
    # bad operation names: a letter after `$`
    ("get", "/fhir/Patient/$"),
    ("get", "/fhir/Patient/$1x"),
    ("get", "/fhir/$"),
    # too many or unknown segments
    ("get", "/fhir/Patient/pt-1/$everything/x"),
    ("get", "/fhir/Patient/pt-1/Observation/obs-1"),
    ("get", "/fhir/Patient/pt-1/_history/2/x"),
    ("get", "/Organization/org-1/fhir/Patient/pt-1/_history/2/x"),  # 9 segments
    ("get", "/a/b/c/d/e/f/g/h/i"),
    # a shape that exists, with a method it does not take
    ("get", "/fhir/Patient/_search"),
    ("post", "/fhir/Patient/_history"),
    ("head", "/fhir/Patient/_history"),
    ("post", "/fhir/Patient/pt-1/_history"),
    ("post", "/fhir/Patient/pt-1/_history/2"),
    ("delete", "/fhir/Patient/pt-1/_history/2"),
    ("post", "/fhir/Patient/pt-1/Observation"),
    ("put", "/fhir"),
]


@pytest.mark.parametrize(("method", "path"), NOT_ROUTES, ids=[f"{m} {p}"[:60] for m, p in NOT_ROUTES])
def test_paths_that_are_not_fhir_routes_give_nothing(method: str, path: str) -> None:
    assert route(method, path) == Route({}, None)


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/fhir/Patient/pt-1"), ("options", "/fhir/Patient/pt-1"), ("options", "/fhir/Patient")],
)
def test_an_instance_or_type_route_with_a_method_it_does_not_take_gives_nothing(method: str, path: str) -> None:
    assert route(method, path) == Route({}, None)


# unrouted: a FHIR-shaped path that is no route is refused before any policy judges it.
UNROUTED = [
    # What a policy written for a FHIR instance would otherwise judge with no `params` at all.
    ("post", "/fhir/Patient/pt-2", True),  # a method the instance does not take
    ("options", "/fhir/Patient/pt-2", True),
    ("options", "/fhir/Patient", True),
    ("get", "/fhir/Patient/pt_2", True),  # an id FHIR forbids
    ("get", "/fhir/Patient/pt%202", True),
    ("get", "/fhir/Patient/" + "x" * 65, True),
    ("get", "/fhir/Patient/pt-1/Observation/obs-1", True),  # segments the router does not know
    ("get", "/fhir/Patient/pt-1/_history/2/x", True),
    ("get", "/fhir/Patient/_search", True),
    ("get", "/fhir/Patient/$", True),
    ("post", "/Patient/pt-2", True),  # Aidbox's own API: the same rule
    ("get", "/Organization/org-1/fhir/Patient/pt_1", True),
    # `;`: a servlet strips `;x=1` and serves pt-2; Aidbox's router reads no route.
    ("get", "/fhir/Patient/pt-2;x=1", True),
    ("get", "/fhir/Patient;x=1/pt-2", True),
    ("get", "/fhir;x=1/Patient/pt-2", True),
    ("get", "/Patient/pt-2;x=1", True),
    ("get", "/Organization/o-1;x/fhir/Patient/pt-2", True),
    ("get", "/fhir/Patient/pt-2/_history/1;v", True),
    # Routes are judged by policies ...
    ("get", "/fhir/Patient/pt-2", False),
    ("GET", "/fhir/Patient/pt-2?_format=json;x", False),  # any case; `;` in the query is the query's
    ("post", "/fhir/Patient", False),
    ("get", "/fhir/$export", False),
    ("post", "/fhir", False),
    # ... and so is every path that is not FHIR-shaped, routed or not.
    ("get", "/fhir", False),
    ("get", "/fhir/metadata", False),  # the CapabilityStatement
    ("get", "/fhir/.well-known/smart-configuration", False),  # SMART discovery
    ("get", "/fhir/_history", False),
    ("get", "/api/Patient/pt-2", False),
    ("post", "/api/x;y=1", False),
    ("get", "/", False),
    ("get", "/rpc", False),
    ("get", "/healthz", False),
]


@pytest.mark.parametrize(("method", "path", "refused"), UNROUTED, ids=[f"{m} {p}"[:60] for m, p, _ in UNROUTED])
def test_a_fhir_shaped_path_that_is_no_route_is_refused(method: str, path: str, refused: bool) -> None:
    assert unrouted(method, path) is refused


@pytest.mark.parametrize(("method", "path", "expected"), FHIR_ROUTES)
def test_no_route_is_ever_refused_as_unrouted(method: str, path: str, expected: Route) -> None:
    # Every route of the table above; the normalized form is what unrouted is asked about.
    assert not unrouted(method.upper(), "/" + "/".join(part for part in path.split("/") if part))


def test_an_empty_path_is_not_the_base() -> None:
    assert route("post", "") == Route({}, None)


def test_route_param_names_are_aidbox_names() -> None:
    assert sorted(ROUTE_PARAMS) == [
        "operation/name",
        "organization/id",
        "resource/id",
        "resource/type",
        "resource/version",
    ]


# --------------------------------------------------------------------------- through build_context


def params_of(path: str, method: str = "GET") -> dict[str, object]:
    context = build_context(HttpRequest(method=method, path=path), None, None)
    params: dict[str, object] = context.get("params", {})
    return params


def test_a_route_parameter_wins_over_a_query_parameter_of_the_same_name() -> None:
    # curl 'http://api.example.com/fhir/Observation?resource/type=Patient'
    assert params_of("/fhir/Observation?resource/type=Patient") == {TYPE: "Observation"}
    assert params_of("/fhir/Patient/pt-1?resource/id=pt-2&resource/type=Group&name=x") == {
        TYPE: "Patient",
        ID: "pt-1",
        "name": "x",
    }
    assert params_of("/Organization/o1/fhir/Patient?organization/id=o2") == {ORG: "o1", TYPE: "Patient"}


def test_a_reserved_query_parameter_is_dropped_even_when_the_path_does_not_yield_it() -> None:
    # A search has no resource/id: a client cannot add one.
    assert params_of("/fhir/Patient?resource/id=x") == {TYPE: "Patient"}
    assert params_of("/fhir/Patient/pt-1?resource/version=3&_format=json") == {
        TYPE: "Patient",
        ID: "pt-1",
        "_format": "json",
    }
    everything = "resource/type=A&resource/id=b&resource/version=1&organization/id=o&operation/name=$x&q=1"
    assert params_of(f"/api/things?{everything}") == {"q": "1"}
    assert params_of(f"/fhir/$export?{everything}") == {OP: "$export", "q": "1"}


def test_reserved_names_are_dropped_whatever_their_spelling_in_the_query() -> None:
    # percent-encoded, repeated, or with an empty value: the decoded name is what counts
    assert params_of("/fhir/Patient?resource%2Fid=x&resource%2fid=y") == {TYPE: "Patient"}
    assert params_of("/fhir/Observation?resource/type=A&resource/type=B") == {TYPE: "Observation"}
    assert params_of("/fhir/Patient?resource/id=&name=") == {TYPE: "Patient"}
    # other names (other case, other separator) are ordinary parameters
    assert params_of("/fhir/Patient?Resource/Id=x&resource.id=y") == {
        TYPE: "Patient",
        "Resource/Id": "x",
        "resource.id": "y",
    }


def test_context_names_the_operation_only_for_routes() -> None:
    read = build_context(HttpRequest(method="GET", path="/fhir/Patient/pt-1?_elements=id"), None, None)
    assert read["operation"] == {"id": "FhirRead"}
    assert read["params"] == {TYPE: "Patient", ID: "pt-1", "_elements": "id"}
    assert read["uri"] == "/fhir/Patient/pt-1"
    # the method reaches route() lower-cased
    assert build_context(HttpRequest(method="DELETE", path="/Patient/pt-1"), None, None)["operation"] == {
        "id": "Delete"
    }
    plain = build_context(HttpRequest(method="GET", path="/healthz?resource/type=Patient"), None, None)
    assert "operation" not in plain
    assert "params" not in plain  # nothing left after the reserved name is dropped: empty values go


# --------------------------------------------------------------------------- properties

PATHS = [
    "/fhir/Patient",
    "/fhir/Patient/pt-1",
    "/fhir/Patient/pt-1/_history/2",
    "/fhir/$export",
    "/Organization/o1/fhir/Patient/pt-1",
    "/fhir",
    "/api/things",
    "/",
]
RESERVED = sorted(ROUTE_PARAMS)
names = st.one_of(
    st.sampled_from(RESERVED),
    st.sampled_from([quote(name, safe="") for name in RESERVED]),
    st.text(max_size=12),
)
pairs = st.lists(st.tuples(names, st.text(max_size=12)), max_size=6)
queries = st.one_of(st.text(max_size=60), pairs.map(lambda items: "&".join(f"{n}={v}" for n, v in items)))
PROPERTY = settings(max_examples=100, deadline=None, database=None)


@PROPERTY
@given(
    path=st.sampled_from(PATHS),
    query=queries,
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]),
)
def test_reserved_params_only_ever_come_from_the_path(path: str, query: str, method: str) -> None:
    found = route(method.lower(), path)
    params = build_context(HttpRequest(method=method, path=f"{path}?{query}"), None, None).get("params", {})
    assert {name: value for name, value in params.items() if name in ROUTE_PARAMS} == found.params


SEGMENTS = [
    "fhir",
    "Organization",
    "o1",
    "Patient",
    "Observation",
    "pt-1",
    "_history",
    "_search",
    "2",
    "$op",
    "",
    "a_b",
]
route_like = st.lists(st.sampled_from(SEGMENTS), max_size=9).map(lambda segments: "/" + "/".join(segments))


@PROPERTY
@given(
    method=st.sampled_from(["get", "post", "put", "patch", "delete", "head", "options"]),
    path=st.one_of(route_like, st.text(max_size=80)),
)
def test_route_never_raises_and_takes_params_from_path_segments(method: str, path: str) -> None:
    found = route(method, path)
    assert set(found.params) <= ROUTE_PARAMS
    assert found.operation is None or found.operation in OPERATION_IDS
    segments = path.split("/")
    assert all(value in segments for value in found.params.values())


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("Patient/pt-1", {"resourceType": "Patient", "id": "pt-1"}),
        ("Patient/pt-1/_history/2", {"resourceType": "Patient", "id": "pt-1"}),
        ({"reference": "Patient/pt-1", "display": "Ann"}, {"resourceType": "Patient", "id": "pt-1", "display": "Ann"}),
        ({"resourceType": "Patient", "id": "pt-1"}, {"resourceType": "Patient", "id": "pt-1"}),
        # Only relative references: another server's resource, a contained one, or a climbing id is none.
        ("https://other.example/fhir/Patient/pt-1", None),
        ("#contained", None),
        ("Patient/..", None),
        ("Patient/../_history/1", None),
        ("patient/pt-1", None),
        ({"reference": 42}, None),
        ({"id": "pt-1"}, None),
        (7, None),
    ],
)
def test_references_read_in_aidbox_format(value: Any, parsed: dict[str, Any] | None) -> None:
    assert parse_reference(value) == parsed


def test_resources_keep_their_references_and_gain_aidbox_format() -> None:
    role = {"user": {"reference": "User/u1"}, "links": [{"reference": "https://x/Practitioner/p"}, {"id": "kept"}]}
    assert with_aidbox_references(role) == {
        "user": {"reference": "User/u1", "resourceType": "User", "id": "u1"},
        "links": [{"reference": "https://x/Practitioner/p"}, {"id": "kept"}],
    }


# Aidbox's own-patient example, verbatim (T/restricting-access-to-patient-data.md, "Create
# AccessPolicy resource which will allow all GET requests for /fhir/Patient/*"; also in
# tests/aidbox/07-restricting-access-to-patient-data.yaml). Its schema constrains
# `params.resource/id` only when `params` is there, so a path that looks like the patient's
# instance but yields no route (and has no query) would satisfy it for any patient.
OWN_PATIENT = """\
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
ISS = "https://idp.example"
SECRET = b"an-hmac-secret-of-at-least-32-bytes!"


def own_patient_engine() -> Engine:
    introspector = {"id": "idp", "type": "jwt", "jwt": {"iss": ISS, "secret": SECRET.decode()}}
    config = parse_config(f"introspectors: [{json.dumps(introspector)}]\npolicies: [{OWN_PATIENT}]", {})
    return build_engine(config, FakeIdpClient(), CacheFactory(config.cache))


async def ask_own_patient(method: str, path: str, *, pid: str | None = "pt-1") -> tuple[Decision, HttpRequest]:
    """The decision for `curl -X METHOD http://aidbox.example/PATH` by patient pt-1 (None: anonymous)."""
    headers = {}
    if pid is not None:
        token = hs_token({"iss": ISS, "sub": "patient-1", "pid": pid, "exp": 4_000_000_000}, SECRET)
        headers["authorization"] = f"Bearer {token}"
    request = HttpRequest(method=method, path=path, host="aidbox.example", headers=headers)
    return await own_patient_engine().authorizer.check(request), request


OWN_PATIENT_PATHS = [
    ("POST", "/fhir/Patient/pt-2"),
    ("OPTIONS", "/fhir/Patient/pt-2"),
    ("GET", "/fhir/Patient/pt-2;x=1"),  # a servlet strips `;x=1` and serves pt-2
    ("GET", "/fhir/Patient/pt-1;x=1"),  # even the caller's own: a `;` is never judged
    ("GET", "/fhir/Patient/pt_2"),
    ("GET", "/fhir/Patient/pt-2/Observation/obs-1"),
]


@pytest.mark.parametrize(("method", "path"), OWN_PATIENT_PATHS, ids=[f"{m} {p}" for m, p in OWN_PATIENT_PATHS])
async def test_the_own_patient_policy_never_judges_a_path_that_is_no_route(method: str, path: str) -> None:
    decision, request = await ask_own_patient(method, path)
    # What the schema would see: no params, so nothing it constrains.
    assert "params" not in build_context(request, None, None)
    assert (decision.outcome, decision.reason) == (Outcome.INVALID_REQUEST, Reason.NOT_A_ROUTE)
    anonymous, _ = await ask_own_patient(method, path, pid=None)
    assert (anonymous.outcome, anonymous.reason) == (Outcome.INVALID_REQUEST, Reason.NOT_A_ROUTE)


async def test_the_own_patient_policy_still_allows_the_own_patient_only() -> None:
    for path in ("/fhir/Patient/pt-1", "/fhir/Patient/pt-1/", "/fhir/Patient//pt-1", "/fhir/Patient/x/../pt-1"):
        decision, _ = await ask_own_patient("GET", path)
        assert decision.outcome is Outcome.ALLOW, path
    for path in ("/fhir/Patient/pt-2", "/fhir/Patient/pt-1/../pt-2"):  # judged as pt-2
        decision, _ = await ask_own_patient("GET", path)
        assert (decision.outcome, decision.reason) == (Outcome.FORBIDDEN, Reason.FORBIDDEN), path
