"""sources: where a request's one credential comes from.

`Authorization: Bearer` first; then each introspector's own sources (from_headers, from_params,
cookie), introspectors in config order. A token from an introspector's own source is bound to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from authz_service.errors import MalformedCredentials, TokenRejected
from authz_service.model import HttpRequest, Reason
from authz_service.registries import validate_config
from authz_service.tokens.base import Credential, DPoPCredential
from authz_service.tokens.jws import MAX_TOKEN_BYTES
from authz_service.tokens.sources import CredentialFinder

ENDPOINT = {"url": "https://idp.example/introspect"}


def finder(*resources: Mapping[str, Any]) -> CredentialFinder:
    """The finder for these TokenIntrospector resources, validated as the service validates them."""
    return CredentialFinder(validate_config({"introspectors": list(resources)}, None).introspectors)


def opaque(ident: str, **sources: Any) -> dict[str, Any]:
    return {"id": ident, "type": "opaque", "introspection_endpoint": ENDPOINT, **sources}


BEARER_ONLY = CredentialFinder()
# Aidbox's ASPXAUTH case (`type: aspxauth` reads the .ASPXAUTH cookie), and a session cookie.
WITH_COOKIES = finder(
    {"id": "aspx", "type": "aspxauth", "introspection_endpoint": ENDPOINT},
    opaque("sessions", cookie="sid"),
)


def find(finder: CredentialFinder, path: str = "/", **headers: str) -> Credential | None:
    return finder.find(HttpRequest(path=path, headers={k.replace("_", "-"): v for k, v in headers.items()}))


def rejected(finder: CredentialFinder, path: str = "/", **headers: str) -> Reason:
    with pytest.raises(TokenRejected) as caught:
        find(finder, path, **headers)
    return caught.value.reason


# --------------------------------------------------------------------------- Authorization: Bearer


@pytest.mark.parametrize(
    "value", ["Bearer abc.def.ghi", "bearer abc.def.ghi", "BEARER abc.def.ghi", "  Bearer   abc.def.ghi  "]
)
def test_bearer_scheme_is_case_insensitive(value: str) -> None:
    # curl -H "Authorization: bearer abc.def.ghi" ...
    assert find(BEARER_ONLY, authorization=value) == Credential("abc.def.ghi")


def test_bearer_credential_is_bound_to_no_introspector() -> None:
    credential = find(WITH_COOKIES, authorization="Bearer t0k")
    assert credential is not None
    assert credential.introspector is None


def test_no_credentials_is_anonymous() -> None:
    assert find(BEARER_ONLY) is None
    assert find(BEARER_ONLY, x_api_key="t0k") is None


def test_another_scheme_is_anonymous() -> None:
    # curl -u alice:secret ...  (Basic is not ours to judge, as with Envoy's jwt_authn)
    assert find(BEARER_ONLY, authorization="Basic YWxpY2U6c2VjcmV0") is None


def test_two_authorization_values_are_an_invalid_request() -> None:
    # curl -H "Authorization: Bearer a" -H "Authorization: Bearer b" ...  (Envoy joins them with ",")
    with pytest.raises(MalformedCredentials) as caught:
        find(BEARER_ONLY, authorization="Bearer a,Bearer b")
    assert caught.value.reason is Reason.MULTIPLE_CREDENTIALS


def test_a_second_value_of_another_scheme_is_still_two_values() -> None:
    with pytest.raises(MalformedCredentials):
        find(BEARER_ONLY, authorization="Basic YWxpY2U6c2VjcmV0,Bearer b")


def test_token_at_the_size_limit_is_accepted() -> None:
    token = "a" * MAX_TOKEN_BYTES
    assert find(BEARER_ONLY, authorization=f"Bearer {token}") == Credential(token)


def test_token_over_8_kib_is_too_large() -> None:
    assert rejected(BEARER_ONLY, authorization="Bearer " + "a" * (MAX_TOKEN_BYTES + 1)) is Reason.TOO_LARGE


@pytest.mark.parametrize(
    "value",
    [
        "Bearer",  # no token at all
        "Bearer ",
        "Bearer two words",
        "Bearer t\x00k",
        "Bearer tök",  # not visible ASCII
        "Bearer t\x7fk",
    ],
)
def test_broken_bearer_tokens_are_malformed(value: str) -> None:
    assert rejected(BEARER_ONLY, authorization=value) is Reason.MALFORMED


# --------------------------------------------------------------------------- cookies


def test_configured_cookie_is_bound_to_its_introspector() -> None:
    # curl -b ".ASPXAUTH=C0FFEE; theme=dark" ...
    assert find(WITH_COOKIES, cookie=".ASPXAUTH=C0FFEE; theme=dark") == Credential("C0FFEE", "aspx")


def test_unconfigured_cookies_are_not_credentials() -> None:
    assert find(WITH_COOKIES, cookie="theme=dark; session=abc") is None
    assert find(BEARER_ONLY, cookie=".ASPXAUTH=C0FFEE") is None


def test_authorization_wins_over_a_cookie() -> None:
    credential = find(WITH_COOKIES, authorization="Bearer from-header", cookie=".ASPXAUTH=from-cookie")
    assert credential == Credential("from-header")


def test_another_scheme_falls_through_to_the_cookie() -> None:
    assert find(WITH_COOKIES, authorization="Basic YWxpY2U6c2VjcmV0", cookie="sid=S1") == Credential("S1", "sessions")


def test_introspectors_are_tried_in_config_order() -> None:
    # The request lists `sid` first; config lists the .ASPXAUTH introspector first: config decides.
    assert find(WITH_COOKIES, cookie="sid=S1; .ASPXAUTH=A1") == Credential("A1", "aspx")


def test_first_occurrence_of_a_repeated_cookie_counts() -> None:
    assert find(WITH_COOKIES, cookie="sid=first; sid=second") == Credential("first", "sessions")


def test_quoted_cookie_value_is_unquoted() -> None:
    assert find(WITH_COOKIES, cookie='sid="S1"') == Credential("S1", "sessions")


def test_cookie_tokens_get_the_same_checks() -> None:
    assert rejected(WITH_COOKIES, cookie="sid=" + "a" * (MAX_TOKEN_BYTES + 1)) is Reason.TOO_LARGE
    assert rejected(WITH_COOKIES, cookie="sid=") is Reason.MALFORMED


def test_cookie_name_must_match_exactly() -> None:
    assert find(WITH_COOKIES, cookie="SID=S1; xsid=S2") is None


# --------------------------------------------------------------------------- from_headers, from_params


API_TOKEN = finder(opaque("api", from_headers=[{"name": "X-Api-Token", "prefix": "Token "}]))
IAP = finder(opaque("iap", from_headers=[{"name": "x-goog-iap-jwt-assertion"}]))
QUERY = finder(opaque("ws", from_params=["access_token"]))


def test_named_header_without_prefix() -> None:
    assert find(IAP, x_goog_iap_jwt_assertion="abc.def.ghi") == Credential("abc.def.ghi", "iap")


def test_named_header_prefix_is_case_insensitive_and_stripped() -> None:
    # curl -H "X-Api-Token: token T1" ...
    assert find(API_TOKEN, x_api_token="Token T1") == Credential("T1", "api")
    assert find(API_TOKEN, x_api_token="token T1") == Credential("T1", "api")


def test_named_header_without_its_prefix_holds_no_token() -> None:
    assert find(API_TOKEN, x_api_token="T1") is None


def test_named_header_twice_is_an_invalid_request() -> None:
    with pytest.raises(MalformedCredentials):
        find(IAP, x_goog_iap_jwt_assertion="a,b")


def test_query_parameter_token_is_percent_decoded() -> None:
    # curl "http://api.example.com/download?file=a.pdf&access_token=T%7E1"
    assert find(QUERY, "/download?file=a.pdf&access_token=T%7E1") == Credential("T~1", "ws")


def test_query_parameter_twice_is_an_invalid_request() -> None:
    with pytest.raises(MalformedCredentials) as caught:
        find(QUERY, "/x?access_token=a&access_token=b")
    assert caught.value.reason is Reason.MULTIPLE_CREDENTIALS


def test_empty_query_parameter_is_malformed() -> None:
    assert rejected(QUERY, "/x?access_token=") is Reason.MALFORMED


def test_bearer_wins_over_the_query() -> None:
    assert find(QUERY, "/x?access_token=from-query", authorization="Bearer from-header") == Credential("from-header")


@pytest.mark.parametrize(
    "query",
    [
        "access%5Ftoken=T1",  # an encoded unreserved character: `access_token` to a decoding server
        "access%5ftoken=T1",
        "%61ccess_token=T1",
        "Access_Token=T1",  # `access_token` to a server that compares names case-insensitively
        "ACCESS_TOKEN=T1",
        "access_token%20=T1",  # ... or trims them
        "+access_token=T1",
        "x=1;access_token=T1",  # a parameter to a server that also splits on `;`
        "access_token=T1;access_token=T2",
        "a=b&x=1;Access%5Ftoken=T1",
    ],
)
def test_a_parameter_read_as_a_token_parameter_only_by_another_parser_is_refused(query: str) -> None:
    # Envoy removes `access_token` by its exact name: such a parameter would reach the upstream
    # unremoved and unverified, so the request is refused, whatever carries its own token.
    for headers in ({}, {"authorization": "Bearer from-header"}):
        with pytest.raises(MalformedCredentials) as caught:
            find(QUERY, "/x?" + query, **headers)
        assert caught.value.reason is Reason.AMBIGUOUS_QUERY


def test_a_token_parameter_counts_under_its_exact_name_only() -> None:
    assert find(QUERY, "/x?access_token=T1&access_tokens=2&my_access_token=3&q=access_token") == Credential("T1", "ws")
    assert find(QUERY, "/x?accesstoken=T1&access-token=T2") is None
    # Without from_params nothing in the query is a token source, and nothing is refused.
    assert find(BEARER_ONLY, "/x?access%5Ftoken=T1") is None
    # The path is not the query.
    assert find(QUERY, "/access%5Ftoken=T1") is None


def test_every_query_parameter_that_may_carry_a_token_is_listed() -> None:
    # The upstream never sees them, whichever source this request's token came from.
    both = finder(opaque("a", from_params=["access_token", "t"]), opaque("b", from_params=["token"]))
    assert both.token_params == ("access_token", "t", "token")
    assert BEARER_ONLY.token_params == ()


def test_within_one_introspector_headers_then_params_then_cookie() -> None:
    one = finder(opaque("one", from_headers=[{"name": "x-t"}], from_params=["t"], cookie="t"))
    assert find(one, "/?t=P", x_t="H", cookie="t=C") == Credential("H", "one")
    assert find(one, "/?t=P", cookie="t=C") == Credential("P", "one")
    assert find(one, "/", cookie="t=C") == Credential("C", "one")


def test_an_earlier_introspector_wins_whatever_its_source() -> None:
    two = finder(opaque("first", cookie="c"), opaque("second", from_headers=[{"name": "x-t"}]))
    assert find(two, x_t="H", cookie="c=C") == Credential("C", "first")


# --------------------------------------------------------------------------- the DPoP scheme (RFC 9449 7.1)


def test_a_dpop_scheme_credential_carries_its_proof() -> None:
    found = BEARER_ONLY.find(HttpRequest(headers={"authorization": "DPoP tok", "dpop": " a.b.c "}))
    assert found == DPoPCredential("tok", proof="a.b.c")
    assert (found.scheme, found.proof) == ("dpop", "a.b.c")
    assert BEARER_ONLY.find(HttpRequest(headers={"authorization": "dpop tok", "dpop": "a.b.c"})) == found
    # Bearer stays Bearer, a proof beside it or not: the binding decides what it needs.
    bearer = BEARER_ONLY.find(HttpRequest(headers={"authorization": "Bearer tok", "dpop": "a.b.c"}))
    assert bearer == Credential("tok")
    assert bearer is not None
    assert (bearer.scheme, bearer.proof) == ("bearer", None)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"authorization": "DPoP tok"}, Reason.DPOP_MISSING_PROOF),
        ({"authorization": "DPoP tok", "dpop": ""}, Reason.DPOP_MISSING_PROOF),
        ({"authorization": "DPoP tok", "dpop": "a.b.c,d.e.f"}, Reason.DPOP_MULTIPLE_PROOFS),
    ],
)
def test_a_dpop_scheme_credential_without_one_proof_is_refused(headers: dict[str, str], reason: Reason) -> None:
    with pytest.raises(TokenRejected) as caught:
        BEARER_ONLY.find(HttpRequest(headers=headers))
    assert caught.value.reason is reason
