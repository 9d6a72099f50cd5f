"""envoy: CheckRequest -> HttpRequest, Identity -> headers, Decision -> CheckResponse (the OUTCOMES table)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from google.rpc import code_pb2

from authz_service._pb.envoy.config.core.v3 import base_pb2
from authz_service._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_service.config.model import ResponseConfig
from authz_service.envoy import (
    HEADERS_TO_REMOVE,
    MAX_HEADER_VALUE,
    OUTCOMES,
    Denial,
    HttpAnswers,
    IdentityHeaders,
    ResponseBuilder,
    encode_claims,
    header_safe,
    to_http_request,
)
from authz_service.errors import TokenRejected
from authz_service.model import Decision, Identity, Outcome, Reason, header_pairs
from tests.harness import check_request

RESPONSE = ResponseConfig(claim_headers=(("email", "x-user-email"), ("roles", "x-user-roles")))
IDENTITY_HEADERS = {"x-user-id", "x-auth-claims", "x-user-email", "x-user-roles"}


def decode_claims(value: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))


def answer(decision: Decision, response: ResponseConfig = RESPONSE) -> pb.CheckResponse:
    return pb.CheckResponse.FromString(ResponseBuilder(response).encode(decision))


def allow(identity: Identity | None, response: ResponseConfig = RESPONSE) -> pb.CheckResponse:
    headers = IdentityHeaders(response).build(identity) if identity is not None else ()
    reason = Reason.ALLOWED if identity is not None else Reason.ANONYMOUS
    return answer(Decision(Outcome.ALLOW, reason, identity, headers), response)


def header_options(options: Any) -> dict[str, base_pb2.HeaderValueOption]:
    return {o.header.key: o for o in options}


# --------------------------------------------------------------------------- CheckRequest -> HttpRequest


def test_check_request_becomes_our_request() -> None:
    # curl -X POST -H "x-request-id: r-9" -H "Authorization: Bearer t0k" "http://api.example.com/fhir/Patient?_count=1"
    check = check_request(
        "/fhir/Patient?_count=1",
        method="POST",
        headers={"x-request-id": "r-9"},
        token="t0k",
        context_extensions={"route": "fhir"},
    )
    request = to_http_request(check)
    assert request.method == "POST"
    assert request.path == "/fhir/Patient?_count=1"
    assert request.host == "api.example.com"
    assert request.scheme == "http"
    assert request.headers["authorization"] == "Bearer t0k"
    assert request.remote_addr == "203.0.113.7"
    assert request.request_id == "r-9"
    assert dict(request.context_extensions) == {"route": "fhir"}


def test_request_id_is_the_x_request_id_header_before_the_stream_id() -> None:
    # The UUID Envoy's access log shows, so a decision line can be joined to it (not the stream id).
    check = check_request("/", headers={"x-request-id": "a37ddb78-0b1c-4d6e-9f00-5a1b2c3d4e5f"})
    check.attributes.request.http.id = "15890269275850917356"
    assert to_http_request(check).request_id == "a37ddb78-0b1c-4d6e-9f00-5a1b2c3d4e5f"
    del check.attributes.request.http.headers["x-request-id"]
    assert to_http_request(check).request_id == "15890269275850917356"


def raw_header_request(*entries: tuple[str, bytes]) -> pb.CheckRequest:
    """What Envoy sends with `encode_raw_headers: true`: a header map with byte values, repeats kept."""
    header_map = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in entries])
    return pb.CheckRequest(
        attributes=ac.AttributeContext(
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(method="GET", path="/", header_map=header_map)
            )
        )
    )


def test_raw_header_map_means_the_same_as_the_headers_map() -> None:
    # curl -H "Authorization: Bearer a" -H "Authorization: Bearer b" -H "X-Trace: 1" http://api.example.com/
    check = raw_header_request(("Authorization", b"Bearer a"), ("authorization", b"Bearer b"), ("X-Trace", b"1"))
    headers = to_http_request(check).headers
    # Repeats are joined with "," exactly as Envoy joins them in `headers`: the finder then sees two values.
    assert headers == {"authorization": "Bearer a,Bearer b", "x-trace": "1"}


def test_raw_header_bytes_that_are_not_utf8_do_not_fail() -> None:
    headers = to_http_request(raw_header_request(("x-odd", b"\xff\xfe"))).headers
    assert headers["x-odd"] == "\ufffd\ufffd"


# --------------------------------------------------------------------------- header values


def test_header_safe_refuses_control_characters() -> None:
    assert header_safe("alice@example.com")
    for bad in ("a\r\nx-user-id: admin", "a\x00", "a\x7f", "tab\there"):
        assert not header_safe(bad), bad


def test_header_safe_caps_the_size() -> None:
    assert header_safe("a" * MAX_HEADER_VALUE)
    assert not header_safe("a" * (MAX_HEADER_VALUE + 1))


def test_claims_are_base64url_json_without_padding() -> None:
    claims = {"sub": "ü-1", "roles": ["a", "b"], "n": 1}
    encoded = encode_claims(claims)
    assert "=" not in encoded
    assert "+" not in encoded
    assert "/" not in encoded
    assert decode_claims(encoded) == claims


def test_claims_encoding_is_canonical() -> None:
    assert encode_claims({"b": 1, "a": 2}) == encode_claims({"a": 2, "b": 1})


# --------------------------------------------------------------------------- identity headers


def test_identity_headers_carry_user_id_claims_and_claim_headers() -> None:
    claims = {"sub": "user-1", "email": "a@example.com", "roles": ["admin", "ops"]}
    headers = dict(header_pairs(IdentityHeaders(RESPONSE).build(Identity("user-1", claims, "idp", "jwt"))))
    assert headers["x-user-id"] == "user-1"
    assert decode_claims(headers["x-auth-claims"]) == claims
    assert headers["x-user-email"] == "a@example.com"
    assert json.loads(headers["x-user-roles"]) == ["admin", "ops"]  # non-strings as compact JSON


def test_missing_claim_gets_no_header() -> None:
    headers = dict(header_pairs(IdentityHeaders(RESPONSE).build(Identity("user-1", {"sub": "user-1"}, "idp", "jwt"))))
    assert set(headers) == {"x-user-id", "x-auth-claims"}


def test_unsafe_claim_is_left_out_not_mangled() -> None:
    identity = Identity("user-1", {"sub": "user-1", "email": "a@x\r\nx-user-id: admin"}, "idp", "jwt")
    headers = dict(header_pairs(IdentityHeaders(RESPONSE).build(identity)))
    assert "x-user-email" not in headers
    assert headers["x-user-id"] == "user-1"


def test_unsafe_user_id_rejects_the_token() -> None:
    identity = Identity("admin\r\nx-injected: 1", {}, "idp", "jwt")
    with pytest.raises(TokenRejected) as caught:
        IdentityHeaders(RESPONSE).build(identity)
    assert caught.value.reason is Reason.BAD_CLAIMS


def test_claims_too_large_for_a_header_are_left_out() -> None:
    identity = Identity("user-1", {"sub": "user-1", "blob": "x" * MAX_HEADER_VALUE}, "idp", "jwt")
    headers = dict(header_pairs(IdentityHeaders(RESPONSE).build(identity)))
    assert "x-auth-claims" not in headers
    assert headers["x-user-id"] == "user-1"


def test_header_names_come_from_config() -> None:
    response = ResponseConfig(user_id_header="x-aidbox-user", claims_header="x-jwt")
    headers = dict(header_pairs(IdentityHeaders(response).build(Identity("u", {"sub": "u"}, "idp", "jwt"))))
    assert set(headers) == {"x-aidbox-user", "x-jwt"}


# --------------------------------------------------------------------------- allow


def test_allow_sets_identity_headers_with_append_false() -> None:
    identity = Identity("user-1", {"sub": "user-1", "email": "a@example.com"}, "idp", "jwt")
    response = allow(identity)
    assert response.status.code == code_pb2.OK
    options = header_options(response.ok_response.headers)
    assert set(options) == {"x-user-id", "x-auth-claims", "x-user-email"}
    for option in options.values():
        # Explicitly false (not merely unset): Envoy then overwrites a client-sent header of that name.
        assert option.HasField("append")
        assert option.append.value is False
    assert options["x-user-id"].header.value == "user-1"


def test_allow_removes_every_identity_header_it_does_not_set() -> None:
    identity = Identity("user-1", {"sub": "user-1", "email": "a@example.com"}, "idp", "jwt")
    ok = allow(identity).ok_response
    set_names = {o.header.key for o in ok.headers}
    assert set(ok.headers_to_remove) == IDENTITY_HEADERS - set_names
    assert set(ok.headers_to_remove) == {"x-user-roles"}


def test_anonymous_allow_removes_all_identity_headers() -> None:
    response = allow(None)
    assert response.status.code == code_pb2.OK
    assert list(response.ok_response.headers) == []
    assert set(response.ok_response.headers_to_remove) == IDENTITY_HEADERS
    assert dict(response.dynamic_metadata) == {}


def test_identity_without_user_id_removes_the_user_id_header() -> None:
    ok = allow(Identity(None, {"scope": "read"}, "ext", "opaque")).ok_response
    assert "x-user-id" in ok.headers_to_remove
    assert "x-user-id" not in {o.header.key for o in ok.headers}


def test_allow_metadata_names_user_and_introspector() -> None:
    response = allow(Identity("user-1", {"sub": "user-1"}, "idp", "jwt"))
    assert dict(response.dynamic_metadata) == {"user_id": "user-1", "introspector": "idp"}


def test_allows_of_the_same_user_with_different_claims_differ() -> None:
    # The encoded allow is remembered per identity; the claims it carries must not be confused.
    builder = ResponseBuilder(RESPONSE)
    decisions = []
    for role in ("reader", "admin"):
        identity = Identity("user-1", {"sub": "user-1", "roles": [role]}, "idp", "jwt")
        decisions.append(Decision(Outcome.ALLOW, Reason.ALLOWED, identity, IdentityHeaders(RESPONSE).build(identity)))
    first, second = (pb.CheckResponse.FromString(builder.encode(d)) for d in decisions)
    roles = [header_options(r.ok_response.headers)["x-user-roles"].header.value for r in (first, second)]
    assert roles == ['["reader"]', '["admin"]']


def test_allow_answers_are_stable() -> None:
    builder = ResponseBuilder(RESPONSE)
    identity = Identity("user-1", {"sub": "user-1"}, "idp", "jwt")
    decision = Decision(Outcome.ALLOW, Reason.ALLOWED, identity, IdentityHeaders(RESPONSE).build(identity))
    assert builder.encode(decision) == builder.encode(decision)


def test_remembered_allows_are_bounded_and_the_least_recently_used_go_first() -> None:
    builder = ResponseBuilder(RESPONSE, memo_entries=64)
    headers = IdentityHeaders(RESPONSE)

    def decision(n: int) -> Decision:
        identity = Identity(f"user-{n}", {"sub": f"user-{n}"}, "idp", "jwt")
        return Decision(Outcome.ALLOW, Reason.ALLOWED, identity, headers.build(identity))

    first = builder.encode(decision(0))
    for n in range(1, 64):
        builder.encode(decision(n))
        assert builder.encode(decision(0)) is first  # used again: moved to the newest end
    builder.encode(decision(64))  # one over the bound: the oldest 1/64 (user-1) goes
    assert builder.encode(decision(0)) is first
    assert len(builder._allowed) <= 64
    for n in range(65, 1000):
        builder.encode(decision(n))
    assert len(builder._allowed) <= 64
    user_id = header_options(pb.CheckResponse.FromString(builder.encode(decision(0))).ok_response.headers)["x-user-id"]
    assert user_id.header.value == "user-0"


def test_remembered_http_answers_are_bounded_too() -> None:
    answers = HttpAnswers(RESPONSE, memo_entries=64)
    headers = IdentityHeaders(RESPONSE)
    kept = Identity("user-0", {"sub": "user-0"}, "idp", "jwt")
    kept_decision = Decision(Outcome.ALLOW, Reason.ALLOWED, kept, headers.build(kept))
    first = answers.answer(kept_decision)
    for n in range(1, 1000):
        identity = Identity(f"user-{n}", {"sub": f"user-{n}"}, "idp", "jwt")
        answer = answers.answer(Decision(Outcome.ALLOW, Reason.ALLOWED, identity, headers.build(identity)))
        assert dict(answer.headers)["x-user-id"] == f"user-{n}"
        assert answers.answer(kept_decision) is first  # used on every round: never the oldest
        assert len(answers._allowed) <= 64


# --------------------------------------------------------------------------- deny: the one table


def test_the_table_covers_every_denial() -> None:
    assert set(OUTCOMES) == set(Outcome) - {Outcome.ALLOW}


@pytest.mark.parametrize(
    ("outcome", "reason", "grpc_code", "http_status", "error"),
    [
        (Outcome.UNAUTHENTICATED, Reason.EXPIRED, code_pb2.UNAUTHENTICATED, 401, "invalid_token"),
        (Outcome.UNAUTHENTICATED, Reason.BAD_SIGNATURE, code_pb2.UNAUTHENTICATED, 401, "invalid_token"),
        (Outcome.FORBIDDEN, Reason.FORBIDDEN, code_pb2.PERMISSION_DENIED, 403, "access_denied"),
        (Outcome.INVALID_REQUEST, Reason.MULTIPLE_CREDENTIALS, code_pb2.INVALID_ARGUMENT, 400, "invalid_request"),
        (Outcome.UNAVAILABLE, Reason.IDP_UNAVAILABLE, code_pb2.UNAVAILABLE, 503, "temporarily_unavailable"),
        (Outcome.UNAVAILABLE, Reason.INTERNAL_ERROR, code_pb2.UNAVAILABLE, 503, "temporarily_unavailable"),
    ],
)
def test_denial_codes_status_and_body(
    outcome: Outcome, reason: Reason, grpc_code: int, http_status: int, error: str
) -> None:
    response = answer(Decision(outcome, reason))
    assert response.status.code == grpc_code
    assert response.status.message == reason.label
    assert not response.HasField("ok_response")
    denied = response.denied_response
    assert denied.status.code == http_status
    assert json.loads(denied.body) == {"error": error, "error_description": reason.description}
    headers = {o.header.key: o.header.value for o in denied.headers}
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("outcome", "reason", "challenge"),
    [
        (
            Outcome.UNAUTHENTICATED,
            Reason.EXPIRED,
            'Bearer realm="authz-service", error="invalid_token", error_description="token expired"',
        ),
        (
            Outcome.INVALID_REQUEST,
            Reason.MULTIPLE_CREDENTIALS,
            'Bearer realm="authz-service", error="invalid_request", '
            'error_description="more than one Authorization value"',
        ),
    ],
)
def test_401_and_400_carry_a_bearer_challenge(outcome: Outcome, reason: Reason, challenge: str) -> None:
    headers = {o.header.key: o.header.value for o in answer(Decision(outcome, reason)).denied_response.headers}
    assert headers["www-authenticate"] == challenge


def test_missing_token_challenge_has_no_error_code() -> None:
    # RFC 6750 3.1: a request without credentials gets the bare challenge.
    response = answer(Decision(Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN))
    headers = {o.header.key: o.header.value for o in response.denied_response.headers}
    assert headers["www-authenticate"] == 'Bearer realm="authz-service"'
    assert response.denied_response.status.code == 401


@pytest.mark.parametrize("outcome", [Outcome.FORBIDDEN, Outcome.UNAVAILABLE])
def test_403_and_503_have_no_challenge(outcome: Outcome) -> None:
    reason = Reason.FORBIDDEN if outcome is Outcome.FORBIDDEN else Reason.IDP_UNAVAILABLE
    headers = {o.header.key for o in answer(Decision(outcome, reason)).denied_response.headers}
    assert "www-authenticate" not in headers


def test_denial_depends_on_outcome_and_reason_only() -> None:
    # A forbidden decision knows the identity; the answer must not leak it (nor vary with it).
    builder = ResponseBuilder(RESPONSE)
    alice = Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, Identity("alice", {"sub": "alice"}, "idp", "jwt"))
    bob = Decision(Outcome.FORBIDDEN, Reason.FORBIDDEN, Identity("bob", {"sub": "bob"}, "idp", "jwt"))
    encoded = builder.encode(alice)
    assert encoded == builder.encode(bob)
    assert b"alice" not in encoded


@pytest.mark.parametrize("reason", list(Reason))
def test_every_denial_is_well_formed(reason: Reason) -> None:
    response = answer(Decision(Outcome.UNAUTHENTICATED, reason))
    for option in response.denied_response.headers:
        assert header_safe(option.header.value)
    assert json.loads(response.denied_response.body)["error_description"] == reason.description


# --------------------------------------------------------------------------- HTTP mode: the same table


DENIALS = [
    (Outcome.UNAUTHENTICATED, Reason.MISSING_TOKEN),
    (Outcome.UNAUTHENTICATED, Reason.EXPIRED),
    (Outcome.FORBIDDEN, Reason.FORBIDDEN),
    (Outcome.INVALID_REQUEST, Reason.MULTIPLE_CREDENTIALS),
    (Outcome.UNAVAILABLE, Reason.IDP_UNAVAILABLE),
]


@pytest.mark.parametrize(("outcome", "reason"), DENIALS)
def test_http_mode_denies_exactly_as_grpc_does(outcome: Outcome, reason: Reason) -> None:
    http = HttpAnswers(RESPONSE).answer(Decision(outcome, reason))
    denied = answer(Decision(outcome, reason)).denied_response
    assert http.status == denied.status.code
    headers = dict(http.headers)
    for option in denied.headers:
        assert headers[option.header.key] == option.header.value
    body = json.loads(http.body)
    assert body == json.loads(denied.body)
    # nginx's auth_request drops a denial's body: the same two fields ride in headers too.
    assert headers["x-authz-error"] == body["error"]
    assert headers["x-authz-error-description"] == body["error_description"]
    for value in headers.values():
        assert header_safe(value)


@pytest.mark.parametrize(("outcome", "reason"), DENIALS)
def test_denial_is_read_from_the_one_table(outcome: Outcome, reason: Reason) -> None:
    denial = Denial.of(outcome, reason)
    grpc_code, http_status, _ = OUTCOMES[outcome]
    assert (denial.grpc_code, denial.http_status) == (grpc_code, http_status)


def test_http_mode_allow_is_200_with_identity_headers_and_no_body() -> None:
    identity = Identity("user-1", {"sub": "user-1", "email": "a@example.com"}, "idp", "jwt")
    decision = Decision(Outcome.ALLOW, Reason.ALLOWED, identity, IdentityHeaders(RESPONSE).build(identity))
    http = HttpAnswers(RESPONSE).answer(decision)
    assert http.status == 200
    assert http.body == b""
    headers = dict(http.headers)
    assert headers["x-user-id"] == "user-1"
    assert headers["x-user-email"] == "a@example.com"
    # Envoy's http_service strips these from the upstream request: the client cannot spoof them.
    assert headers[HEADERS_TO_REMOVE] == "x-user-roles"


def test_http_mode_anonymous_allow_removes_every_identity_header() -> None:
    http = HttpAnswers(RESPONSE).answer(Decision(Outcome.ALLOW, Reason.ANONYMOUS))
    assert http.status == 200
    assert set(dict(http.headers)[HEADERS_TO_REMOVE].split(",")) == IDENTITY_HEADERS


def test_http_mode_allow_setting_every_identity_header_removes_none() -> None:
    claims = {"sub": "u", "email": "e@x", "roles": ["r"]}
    identity = Identity("u", claims, "idp", "jwt")
    decision = Decision(Outcome.ALLOW, Reason.ALLOWED, identity, IdentityHeaders(RESPONSE).build(identity))
    assert HEADERS_TO_REMOVE not in dict(HttpAnswers(RESPONSE).answer(decision).headers)


# --------------------------------------------------------------------------- sender-constrained tokens


@pytest.mark.parametrize(
    ("reason", "challenge"),
    [
        (
            Reason.DPOP_HTU_MISMATCH,
            'DPoP error="invalid_dpop_proof", error_description="DPoP proof htu does not match the request", '
            'algs="ES256 RS256"',
        ),
        (
            Reason.DPOP_REQUIRED,
            'DPoP error="invalid_token", error_description="the token is bound to a key and needs a DPoP proof", '
            'algs="ES256 RS256"',
        ),
        (
            Reason.CERTIFICATE_MISMATCH,
            'Bearer realm="authz-service", error="invalid_token", '
            'error_description="the token is bound to another certificate"',
        ),
    ],
)
def test_a_sender_constraint_refusal_carries_its_schemes_challenge(reason: Reason, challenge: str) -> None:
    decision = Decision(Outcome.UNAUTHENTICATED, reason)
    grpc_answer = pb.CheckResponse.FromString(ResponseBuilder(RESPONSE, dpop_algs="ES256 RS256").encode(decision))
    assert grpc_answer.denied_response.status.code == 401
    assert {o.header.key: o.header.value for o in grpc_answer.denied_response.headers}["www-authenticate"] == challenge
    http_answer = HttpAnswers(RESPONSE, dpop_algs="ES256 RS256").answer(decision)
    assert http_answer.status == 401
    assert dict(http_answer.headers)["www-authenticate"] == challenge
    error = "invalid_dpop_proof" if reason is Reason.DPOP_HTU_MISMATCH else "invalid_token"
    assert json.loads(http_answer.body) == {"error": error, "error_description": reason.description}


def test_the_peer_certificate_reaches_the_request() -> None:
    check = check_request("/")
    check.attributes.source.certificate = "-----BEGIN%20CERTIFICATE-----%0AMIIB"
    assert to_http_request(check).certificate == "-----BEGIN%20CERTIFICATE-----%0AMIIB"
    assert to_http_request(check_request("/")).certificate == ""
