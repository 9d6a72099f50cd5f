"""The request context policies see."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from authz_service.config.model import ResponseConfig, RoleConfig
from authz_service.context import (
    CONTEXT_KEYS,
    LIST_KEYS,
    MAP_KEYS,
    STRING_KEYS,
    build_context,
    query_params,
    strip_empty,
)
from authz_service.engine import IdentityShaper
from authz_service.model import HttpRequest, Identity
from authz_service.registries import parse_config
from authz_service.routes import ROUTE_PARAMS, route


def test_context_fields_and_empty_values_removed() -> None:
    request = HttpRequest(
        method="POST",
        path="/fhir/Patient?name=x&tag=a&tag=b&empty=",
        host="api.local",
        scheme="https",
        headers={":path": "/fhir/Patient", "x-trace": "1", "x-empty": ""},
        remote_addr="10.0.0.1",
        context_extensions={"route": "fhir"},
    )
    verified = Identity("u-1", {"sub": "u-1", "roles": [], "org": {}, "name": None, "tenant": "t"}, "idp", "jwt")
    # Identities reach build_context shaped, once per verification: claims stripped of empty values.
    identity = IdentityShaper(ResponseConfig(), keep_claims=True)(verified)
    # Users reach build_context as Config stores them: stripped once at load.
    users = parse_config("users: [{id: u-1, roles: [{value: doctor}], data: {}}]\n", {}).users
    assert dict(users["u-1"]) == {"id": "u-1", "roles": [{"value": "doctor"}]}
    context = build_context(request, identity, users["u-1"])
    assert dict(context.pop("user")) == {"id": "u-1", "roles": [{"value": "doctor"}]}
    assert context == {
        "request-method": "post",
        "uri": "/fhir/Patient",
        "query-string": "name=x&tag=a&tag=b&empty=",
        # The router's parameters join the query's, as in Aidbox's request object.
        "params": {"name": "x", "tag": ["a", "b"], "resource/type": "Patient"},
        "operation": {"id": "FhirCreate"},
        "headers": {"x-trace": "1"},
        "host": "api.local",
        "scheme": "https",
        "remote-addr": "10.0.0.1",
        "context_extensions": {"route": "fhir"},
        "jwt": {"sub": "u-1", "tenant": "t"},
        "introspector": "idp",
    }


def test_opaque_identity_is_token_and_anonymous_has_no_identity() -> None:
    request = HttpRequest(method="GET", path="/public")
    opaque = build_context(request, Identity("u", {"active": True, "sub": "u"}, "op", "opaque"), None)
    assert opaque["token"] == {"active": True, "sub": "u"}
    assert "jwt" not in opaque
    assert "user" not in opaque
    anonymous = build_context(request, None, None)
    assert not {"jwt", "token", "user", "introspector"} & anonymous.keys()
    assert anonymous == {"request-method": "get", "uri": "/public"}


def test_strip_empty_keeps_false_and_zero() -> None:
    assert strip_empty({"a": 0, "b": False, "c": [None, "", {}, [[]], 1], "d": {"e": {"f": ""}}}) == {
        "a": 0,
        "b": False,
        "c": [1],
    }
    assert query_params("a=1&a=2&b=3") == {"a": ["1", "2"], "b": "3"}


def test_the_declared_context_keys_are_what_build_context_builds() -> None:
    # check-config's matcho warnings (a key no context has, a literal of the wrong type) trust these.
    request = HttpRequest(
        method="GET",
        path="/fhir/Patient/pt-1?_elements=id",
        host="api.local",
        scheme="https",
        headers={"x-trace": "1"},
        remote_addr="10.0.0.1",
        context_extensions={"route": "fhir"},
    )
    role = RoleConfig("r", "doctor", "u-1", {"id": "r", "name": "doctor"})
    jwt = build_context(
        request, Identity("u-1", {"sub": "u-1", "client_id": "app"}, "idp", "jwt"), {"id": "u-1"}, [role]
    )
    opaque = build_context(request, Identity("u-1", {"sub": "u-1"}, "op", "opaque"), None)
    assert jwt.keys() | opaque.keys() == CONTEXT_KEYS
    for context in (jwt, opaque):
        for key, value in context.items():
            kind = str if key in STRING_KEYS else dict if key in MAP_KEYS else list
            assert isinstance(value, kind), key
    assert not STRING_KEYS & MAP_KEYS
    assert not (STRING_KEYS | MAP_KEYS) & LIST_KEYS


def _reference_context(request: HttpRequest) -> dict[str, Any]:
    """The request part of a context as Aidbox's rule defines it: everything, then strip_empty."""
    path, _, query = request.path.partition("?")
    method = request.method.lower()
    params = query_params(query)
    found = route(method, path)
    params = {name: value for name, value in params.items() if name not in ROUTE_PARAMS}
    params.update(found.params)
    context = strip_empty(
        {
            "request-method": method,
            "uri": path,
            "query-string": query,
            "params": params,
            "headers": {name: value for name, value in request.headers.items() if not name.startswith(":")},
            "host": request.host,
            "scheme": request.scheme,
            "remote-addr": request.remote_addr,
            "context_extensions": dict(request.context_extensions),
        }
    )
    if found.operation is not None:
        context["operation"] = {"id": found.operation}
    return dict(context)


_TEXT = st.sampled_from(["", "a", "Patient", "pt-1", "_id", "x y", "%20", "=", "&"]) | st.text(max_size=6)
_SEGMENTS = st.lists(st.sampled_from(["", "fhir", "Patient", "pt-1", "_history", "1", "$everything", "x"]), max_size=5)


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "put", "DELETE", ""]),
    segments=_SEGMENTS,
    query=st.lists(st.tuples(_TEXT, _TEXT), max_size=4),
    headers=st.dictionaries(st.sampled_from(["a", "b", ":path", "x-empty"]), _TEXT, max_size=4),
    extensions=st.dictionaries(st.sampled_from(["k", "l"]), _TEXT, max_size=2),
    host=_TEXT,
    scheme=st.sampled_from(["", "https"]),
    remote=st.sampled_from(["", "10.0.0.1"]),
)
def test_the_request_part_is_what_strip_empty_leaves_of_it(
    method: str,
    segments: list[str],
    query: list[tuple[str, str]],
    headers: dict[str, str],
    extensions: dict[str, str],
    host: str,
    scheme: str,
    remote: str,
) -> None:
    # build_context builds the stripped form directly (for speed); it must equal the rule's.
    target = "/" + "/".join(segments) + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")
    request = HttpRequest(
        method=method,
        path=target,
        host=host,
        scheme=scheme,
        headers=headers,
        remote_addr=remote,
        context_extensions=extensions,
    )
    assert build_context(request, None, None) == _reference_context(request)
