"""HTTP mode's adapter, fed plain values: what a route means, how a check is read, what refuses it.

The same requests through a real aiohttp listener are in tests/integration/test_http_mode.py and
tests/integration/test_seams_service.py."""

from __future__ import annotations

import pytest

from authz_service.config.model import ResponseConfig
from authz_service.envoy import HEADERS_TOO_LARGE_STATUS, HttpAnswers, join_headers
from authz_service.httpmode import (
    CONFLICTING,
    NO_URI,
    Route,
    client_address,
    ext_authz_request,
    forward_auth_request,
    route,
    too_large,
)
from authz_service.model import Decision, HttpRequest, Outcome, Reason

# What Traefik's forwardAuth sends for `curl -X POST https://notes.example/notes?draft=1 -H 'Authorization: Bearer t'`.
TRAEFIK = (
    ("Host", "authz:9002"),
    ("Authorization", "Bearer t"),
    ("X-Forwarded-Method", "POST"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "notes.example"),
    ("X-Forwarded-Uri", "/notes?draft=1"),
    ("X-Forwarded-For", "198.51.100.23"),
    ("X-Request-Id", "req-7"),
)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/ext_authz", Route.EXT_AUTHZ),
        ("/ext_authz/", Route.EXT_AUTHZ),
        ("/ext_authz?a=1", Route.EXT_AUTHZ),
        ("/ext_authz/../admin", Route.EXT_AUTHZ),  # a check of /../admin, judged (and refused) as such
        ("/ext_authzz/x", Route.NOT_FOUND),
        ("/forward_auth", Route.FORWARD_AUTH),
        ("/forward_auth?x=1", Route.FORWARD_AUTH),
        ("/forward_auth/", Route.NOT_FOUND),
        ("/forward%5Fauth", Route.NOT_FOUND),  # routed as sent, never decoded
        ("/x/../forward_auth", Route.NOT_FOUND),
        ("/healthz", Route.HEALTHZ),
        ("/readyz", Route.READYZ),
        ("/", Route.NOT_FOUND),
    ],
)
def test_a_target_is_routed_as_sent(target: str, expected: Route) -> None:
    assert route(target) is expected


def test_ext_authz_reads_the_original_request_after_the_prefix() -> None:
    # curl -H 'Authorization: Bearer t' 'http://api.example/fhir/Patient?name=x' through Envoy's http_service.
    pairs = [
        ("Host", "api.example"),
        ("Authorization", "Bearer t"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-For", "10.0.0.1,192.0.2.10"),
        ("X-Request-Id", "req-1"),
    ]
    request = ext_authz_request("DELETE", "/ext_authz/fhir/Patient?name=x", pairs, "127.0.0.1")
    assert request == HttpRequest(
        method="DELETE",
        path="/fhir/Patient?name=x",
        host="api.example",
        scheme="https",
        headers={
            "host": "api.example",
            "authorization": "Bearer t",
            "x-forwarded-proto": "https",
            "x-forwarded-for": "10.0.0.1,192.0.2.10",
            "x-request-id": "req-1",
        },
        remote_addr="192.0.2.10",
        request_id="req-1",
    )


@pytest.mark.parametrize(("target", "path"), [("/ext_authz", "/"), ("/ext_authz?a=1", "/?a=1"), ("/ext_authz/", "/")])
def test_ext_authz_of_the_root(target: str, path: str) -> None:
    request = ext_authz_request("GET", target, [], "127.0.0.1")
    assert (request.path, request.scheme, request.host, request.remote_addr) == (path, "http", "", "127.0.0.1")


def test_forward_auth_reads_traefiks_forwarded_headers() -> None:
    request = forward_auth_request("GET", "/forward_auth", TRAEFIK, "10.1.1.1")
    assert isinstance(request, HttpRequest)
    assert (request.method, request.path, request.host, request.scheme) == (
        "POST",
        "/notes?draft=1",
        "notes.example",
        "https",
    )
    assert (request.remote_addr, request.request_id) == ("198.51.100.23", "req-7")
    assert request.headers["authorization"] == "Bearer t"


def test_forward_auth_reads_nginxs_original_headers() -> None:
    # nginx auth_request with the shipped config: X-Original-*, Host, no X-Forwarded-Host.
    pairs = [("Host", "notes.example"), ("X-Original-Method", "post"), ("X-Original-URI", "/notes")]
    request = forward_auth_request("GET", "/forward_auth", pairs, "10.1.1.1")
    assert isinstance(request, HttpRequest)
    assert (request.method, request.path, request.host, request.remote_addr) == (
        "POST",
        "/notes",
        "notes.example",
        "10.1.1.1",
    )


def test_forward_auth_both_pairs_agreeing_is_one_request() -> None:
    pairs = [*TRAEFIK, ("X-Original-URI", "/notes?draft=1"), ("X-Original-Method", "post")]
    request = forward_auth_request("GET", "/forward_auth", pairs, "")
    assert isinstance(request, HttpRequest)
    assert (request.method, request.path) == ("POST", "/notes?draft=1")


def test_forward_auth_without_a_method_uses_the_checks_own() -> None:
    request = forward_auth_request("head", "/forward_auth", [("X-Forwarded-Uri", "/a")], "")
    assert isinstance(request, HttpRequest)
    assert request.method == "HEAD"


@pytest.mark.parametrize(
    "extra",
    [
        [("X-Original-URI", "/public/x")],  # disagrees with X-Forwarded-Uri
        [("X-Original-Method", "GET")],  # disagrees with X-Forwarded-Method
        [("X-Forwarded-Uri", "/notes?draft=1")],  # repeated, even with the same value
        [("x-forwarded-uri", "/public/x")],  # repeated under another case
        [("X-Forwarded-Method", "POST")],
    ],
)
def test_forward_auth_refuses_original_headers_that_disagree_or_repeat(extra: list[tuple[str, str]]) -> None:
    assert forward_auth_request("GET", "/forward_auth", [*TRAEFIK, *extra], "") is CONFLICTING


def test_a_repeat_of_any_other_header_is_joined_not_refused() -> None:
    pairs = [*TRAEFIK, ("Accept", "text/html"), ("accept", "application/json")]
    request = forward_auth_request("GET", "/forward_auth", pairs, "")
    assert isinstance(request, HttpRequest)
    assert request.headers["accept"] == "text/html,application/json"


def test_forward_auth_without_the_original_uri_is_refused() -> None:
    assert forward_auth_request("GET", "/forward_auth", [("X-Forwarded-Method", "GET")], "") is NO_URI
    assert forward_auth_request("GET", "/forward_auth", [("X-Forwarded-Uri", "")], "") is NO_URI


def test_headers_are_joined_as_envoy_joins_them() -> None:
    # The one rule for gRPC's raw header map and HTTP mode alike: lower-case names, repeats joined
    # with "," in the order received.
    assert join_headers([("Cookie", "a=1"), ("X-A", "1"), ("cookie", "b=2"), ("COOKIE", "c=3")]) == {
        "cookie": "a=1,b=2,c=3",
        "x-a": "1",
    }


def test_the_client_address_is_the_last_forwarded_for_entry() -> None:
    assert client_address({"x-forwarded-for": " 10.0.0.1 ,192.0.2.10 "}, "127.0.0.1") == "192.0.2.10"
    assert client_address({"x-forwarded-for": "192.0.2.10"}, "127.0.0.1") == "192.0.2.10"
    assert client_address({}, "127.0.0.1") == "127.0.0.1"


@pytest.mark.parametrize(
    ("start", "reason"),
    [
        (b"Bearer eyJhbGciOi", Reason.TOO_LARGE),
        (b"bearer eyJ", Reason.TOO_LARGE),
        (b"Authorization: Bearer eyJ", Reason.TOO_LARGE),
        (b"DPoP eyJhbGciOi", Reason.TOO_LARGE),  # the DPoP scheme's token (RFC 9449 7.1)
        (b"Authorization: DPoP eyJ", Reason.TOO_LARGE),
        (b"DPoP: eyJ0eXAiOiJkcG9w", Reason.HEADERS_TOO_LARGE),  # the proof header itself
        (b"Cookie: sid=", Reason.HEADERS_TOO_LARGE),
        (b"/ext_authz/ppp", Reason.HEADERS_TOO_LARGE),
        (b"", Reason.HEADERS_TOO_LARGE),
    ],
)
def test_what_is_too_large_is_judged_by_its_start(start: bytes, reason: Reason) -> None:
    assert too_large(start).reason is reason


def test_answers_status_headers_and_body() -> None:
    answers = HttpAnswers(ResponseConfig())
    too_many = answers.answer(Decision(Outcome.INVALID_REQUEST, Reason.HEADERS_TOO_LARGE))
    assert too_many.status == HEADERS_TOO_LARGE_STATUS == 431
    assert ("x-authz-error", "invalid_request") in too_many.headers
    token = answers.answer(Decision(Outcome.UNAUTHENTICATED, Reason.TOO_LARGE))
    assert token.status == 401
    assert answers.answer(CONFLICTING).status == 400
    allowed = answers.answer(Decision(Outcome.ALLOW, Reason.ALLOWED, headers=("x-user-id", "u1")))
    assert (allowed.status, allowed.body) == (200, b"")
    assert ("x-user-id", "u1") in allowed.headers
