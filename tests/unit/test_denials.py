"""denials: the `responses` block (issue #23 item 2): templates escaped for where they land,
Accept negotiation for the login redirect, bad templates refused by field, the default unchanged."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2
from authz_service.config.model import ResponseConfig
from authz_service.denials import (
    DENY_STATUS,
    MAX_FILE_BYTES,
    MAX_HEADER_VALUE,
    DenyAnswer,
    Responses,
    parse_responses,
    prefers,
    quality,
)
from authz_service.envoy import OUTCOMES, Denial, HttpAnswers, ResponseBuilder, http_denial
from authz_service.errors import ConfigError
from authz_service.model import Decision, HttpRequest, Outcome, Reason

HOSTILE = [
    "a\r\nset-cookie: x=1",
    'he said "hi" \\ there',
    "<script>alert(1)</script>",
    "zürich ☃ 日本",
    "100%25 %0d%0a & ?q=1#frag",
    "\x00\x1b[31m\x7f",
]


_VISIBLE = re.compile(r"[\x21-\x7e]*")
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


def render(
    responses: Responses,
    outcome: Outcome = Outcome.UNAUTHENTICATED,
    reason: Reason = Reason.EXPIRED,
    url: str = "https://app.example.com/orders?x=1",
    method: str = "GET",
    path: str = "/orders",
    accept: str | None = None,
) -> DenyAnswer:
    answer = responses.render(outcome, reason, url, method, path, accept)
    assert answer is not None
    return answer


def refused(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_responses(raw, "responses")
    return str(caught.value)


def header(answer: DenyAnswer, name: str) -> str | None:
    values = [value for key, value in answer.headers if key == name]
    assert len(values) <= 1
    return values[0] if values else None


# --- the default ----------------------------------------------------------------------------------


def test_the_status_table_is_envoys() -> None:
    assert {outcome: (status, error) for outcome, (_, status, error) in OUTCOMES.items()} == dict(DENY_STATUS)


def test_no_block_leaves_every_denial_to_todays_answer() -> None:
    responses = parse_responses({}, "responses")
    assert not responses
    for outcome in DENY_STATUS:
        assert responses.render(outcome, Reason.EXPIRED, "https://h/", "GET", "/", BROWSER) is None


def test_an_outcome_the_block_does_not_name_keeps_todays_answer() -> None:
    responses = parse_responses({"forbidden": {"headers": {"x-a": "b"}}}, "responses")
    assert responses.render(Outcome.UNAUTHENTICATED, Reason.EXPIRED, "https://h/", "GET", "/", BROWSER) is None


@pytest.mark.parametrize("outcome", list(DENY_STATUS))
@pytest.mark.parametrize("reason", [Reason.MISSING_TOKEN, Reason.EXPIRED, Reason.FORBIDDEN, Reason.HEADERS_TOO_LARGE])
def test_headers_only_keeps_todays_status_body_and_challenge(outcome: Outcome, reason: Reason) -> None:
    responses = parse_responses({outcome.value: {"headers": {"x-reason": "{reason}"}}}, "responses")
    answer = render(responses, outcome, reason)
    today = http_denial(outcome, reason)
    assert answer.status == today.status
    assert answer.body == today.body
    assert answer.content_type == "application/json"
    assert answer.headers == (*Denial.of(outcome, reason).headers, ("x-reason", reason.label))


# --- escaping, per context ------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE)
def test_a_header_value_is_printable_ascii_and_decodes_back(value: str) -> None:
    responses = parse_responses({"forbidden": {"headers": {"x-path": "p={path}"}}}, "responses")
    got = header(render(responses, Outcome.FORBIDDEN, Reason.FORBIDDEN, path=value), "x-path")
    assert got is not None
    assert got.isascii()
    assert got.isprintable()
    assert "\r" not in got
    assert "\n" not in got
    if value.isascii() and value.isprintable():
        assert got == f"p={value}"  # kept as it is, % and all
    else:
        assert unquote(got) == f"p={value}"


@pytest.mark.parametrize("value", HOSTILE)
def test_the_redirect_url_carries_the_value_as_one_query_component(value: str) -> None:
    responses = parse_responses(
        {"unauthenticated": {"redirect": {"url": "https://login.example.com/start?rd={url}&m={method}"}}}, "responses"
    )
    original = "https://app.example.com/a?b=" + value
    location = header(render(responses, url=original, method=value, accept=BROWSER), "location")
    assert location is not None
    assert location.isascii()
    assert location.isprintable()
    assert " " not in location
    parts = urlsplit(location)
    assert (parts.scheme, parts.netloc, parts.path, parts.fragment) == ("https", "login.example.com", "/start", "")
    assert parse_qs(parts.query, keep_blank_values=True) == {"rd": [original], "m": [value]}


@pytest.mark.parametrize("value", HOSTILE)
def test_a_json_body_stays_json_and_holds_the_value(value: str) -> None:
    responses = parse_responses(
        {
            "forbidden": {
                "body": {"content_type": "application/json", "text": '{"error": "{error}", "where": "{method} {path}"}'}
            }
        },
        "responses",
    )
    answer = render(responses, Outcome.FORBIDDEN, Reason.FORBIDDEN, method="GET", path=value)
    assert json.loads(answer.body) == {"error": "access_denied", "where": f"GET {value}"}
    assert answer.body.isascii()
    assert b"<" not in answer.body
    assert b">" not in answer.body


@pytest.mark.parametrize("value", HOSTILE)
def test_an_html_body_holds_the_value_as_text(value: str) -> None:
    responses = parse_responses(
        {"forbidden": {"body": {"content_type": "text/html", "text": '<p title="{path}">{path}</p>'}}}, "responses"
    )
    answer = render(responses, Outcome.FORBIDDEN, Reason.FORBIDDEN, path=value)
    text = answer.body.decode()
    # The template's own markup is the only markup: two tags, one quoted attribute.
    assert (text.count("<"), text.count(">"), text.count('"'), text.count("'")) == (2, 2, 2, 0), text
    assert not any(ch in text for ch in "\x00\x1b\x7f")
    shown = text.removeprefix('<p title="').partition('">')[0]
    expected = "".join("\ufffd" if ch in "\x00\x1b\x7f" else ch for ch in value)
    assert html.unescape(shown) == expected
    assert answer.content_type == "text/html; charset=utf-8"
    assert ("x-content-type-options", "nosniff") in answer.headers


EVERYWHERE = parse_responses(
    {
        "unauthenticated": {
            "redirect": {"url": "/login?rd={url}&p={path}"},
            "headers": {"x-path": "{path}"},
            "body": {"content_type": "application/json", "text": '{"path": "{path}", "url": "{url}"}'},
        },
        "forbidden": {"body": {"content_type": "text/html", "text": '<a href="/x?p={path}">{path}</a>'}},
    },
    "responses",
)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_no_value_breaks_out_of_any_context(value: str) -> None:
    url = "https://h/?q=" + value
    redirect = render(EVERYWHERE, url=url, path=value, accept="text/html")
    location = header(redirect, "location")
    assert location is not None
    assert _VISIBLE.fullmatch(location)
    assert parse_qs(urlsplit(location).query, keep_blank_values=True) == {"rd": [url], "p": [value]}
    api = render(EVERYWHERE, url=url, path=value, accept="application/json")
    for _, got in api.headers:
        assert got.isascii()
        assert got.isprintable()
    # Printable ASCII as it is, every other character as its UTF-8 percent escapes.
    assert header(api, "x-path") == "".join(ch if " " <= ch <= "~" else quote(ch, safe="") for ch in value)
    assert json.loads(api.body) == {"path": value, "url": url}
    page = render(EVERYWHERE, Outcome.FORBIDDEN, Reason.FORBIDDEN, path=value).body.decode()
    assert (page.count("<"), page.count(">"), page.count('"')) == (2, 2, 2)


def test_a_text_body_replaces_control_characters() -> None:
    responses = parse_responses(
        {"forbidden": {"body": {"content_type": "text/plain", "text": "no: {path}"}}}, "responses"
    )
    answer = render(responses, Outcome.FORBIDDEN, Reason.FORBIDDEN, path="/a\x1b[2J\x00b\tc")
    assert answer.body == "no: /a\ufffd[2J\ufffdb\tc".encode()
    assert answer.content_type == "text/plain; charset=utf-8"


def test_html_escaping_is_entities() -> None:
    responses = parse_responses(
        {"forbidden": {"body": {"content_type": "text/html", "text": "<b>{path}</b>"}}}, "responses"
    )
    answer = render(responses, Outcome.FORBIDDEN, Reason.FORBIDDEN, path="<script>\"&'</script>")
    assert answer.body == b"<b>&lt;script&gt;&quot;&amp;&#x27;&lt;/script&gt;</b>"


def test_slots_name_the_reason_the_error_and_the_description() -> None:
    responses = parse_responses(
        {
            "unauthenticated": {
                "headers": {"x-reason": "{reason}"},
                "body": {
                    "content_type": "application/json",
                    "text": '{"error": "{error}", "description": "{description}"}',
                },
            }
        },
        "responses",
    )
    answer = render(responses, reason=Reason.EXPIRED)
    assert answer.status == 401
    assert header(answer, "x-reason") == "expired"
    assert json.loads(answer.body) == {"error": "invalid_token", "description": "token expired"}
    missing = render(responses, reason=Reason.MISSING_TOKEN)
    assert json.loads(missing.body)["error"] == "unauthorized"
    assert header(missing, "www-authenticate") == 'Bearer realm="authz-service"'


def test_a_token_query_parameter_never_reaches_the_url_slot() -> None:
    responses = parse_responses(
        {"unauthenticated": {"redirect": {"url": "/login?rd={url}"}}}, "responses", token_params=("access_token",)
    )
    url = "https://app.example.com/a?x=1&access_token=SECRET&Access%5FToken=SECRET2&y=2#f"
    location = header(render(responses, url=url, accept=BROWSER), "location")
    assert location is not None
    assert "SECRET" not in unquote(location)
    assert parse_qs(urlsplit(location).query) == {"rd": ["https://app.example.com/a?x=1&y=2#f"]}


def test_a_header_too_long_to_send_is_left_out_and_a_location_too_long_falls_back() -> None:
    responses = parse_responses(
        {"unauthenticated": {"redirect": {"url": "/login?rd={url}"}, "headers": {"x-url": "{url}"}}}, "responses"
    )
    long_url = "https://h/" + "a" * MAX_HEADER_VALUE
    answer = render(responses, url=long_url, accept=BROWSER)
    assert answer.status == 401
    assert header(answer, "location") is None
    assert header(answer, "x-url") is None


# --- the redirect and Accept ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (BROWSER, True),  # Firefox's navigation
        ("text/html,application/xhtml+xml,application/xml;q=0.9,image/webp,image/apng,*/*;q=0.8", True),  # Chrome
        ("text/html", True),
        ("text/html, */*", True),  # named beats the wildcard that gives json the same q
        ("text/*", True),
        ("text/html;q=0.5, application/json;q=0.4", True),
        (None, False),  # no Accept: an API client
        ("", False),
        ("*/*", False),  # curl, fetch(): a tie through the same range
        ("application/json", False),
        ("application/json, text/plain, */*", False),  # axios
        ("text/html, application/json", False),  # named both, equal q: the API answer
        ("text/html;q=0.4, application/json;q=0.5", False),
        ("text/html;q=0", False),
        ("text/html;q=0, */*", False),
        ("text/html;level=1", False),  # a range with parameters does not match the bare type
        ("text/html;q=2", False),  # not a qvalue: the range is ignored
        ("text/html;q=0.1234", False),
        ("TEXT/HTML", True),
    ],
)
def test_accept_negotiation(accept: str | None, expected: bool) -> None:
    assert prefers("text/html", accept) is expected


def test_quality_takes_the_most_specific_range() -> None:
    assert quality("text/html", "*/*;q=0.1, text/*;q=0.5, text/html;q=0.9") == (0.9, 2)
    assert quality("text/html", "text/html;q=0.9, text/*;q=1") == (0.9, 2)
    assert quality("text/plain", "text/html;q=0.9, text/*;q=0.3") == (0.3, 1)
    assert quality("image/png", "text/html") == (0.0, -1)


def test_the_redirect_answers_browsers_and_apis_keep_their_401() -> None:
    responses = parse_responses(
        {
            "unauthenticated": {
                "redirect": {"url": "https://login.example.com/start?rd={url}", "when_accept": "text/html"},
                "headers": {"x-reason": "{reason}"},
            }
        },
        "responses",
    )
    browser = render(responses, url="https://app.example.com/a b", accept=BROWSER)
    assert browser.status == 302
    assert browser.body == b""
    assert browser.content_type == ""
    assert header(browser, "location") == "https://login.example.com/start?rd=https%3A%2F%2Fapp.example.com%2Fa%20b"
    assert header(browser, "x-reason") == "expired"
    assert header(browser, "www-authenticate") is None
    api = render(responses, accept="application/json")
    assert api.status == 401
    assert header(api, "location") is None
    assert header(api, "www-authenticate") is not None


def test_request_free_answers_are_built_once_and_request_answers_each_time() -> None:
    responses = parse_responses(
        {"forbidden": {"headers": {"x-reason": "{reason}"}}, "unauthenticated": {"headers": {"x-path": "{path}"}}},
        "responses",
    )
    first = render(responses, Outcome.FORBIDDEN, Reason.FORBIDDEN, path="/a")
    assert render(responses, Outcome.FORBIDDEN, Reason.FORBIDDEN, path="/b") is first
    assert header(render(responses, path="/a"), "x-path") == "/a"
    assert header(render(responses, path="/b"), "x-path") == "/b"


# --- files ----------------------------------------------------------------------------------------


def test_a_file_body_is_read_at_load(tmp_path: Path) -> None:
    page = tmp_path / "forbidden.html"
    page.write_text("<style>body { margin: 0 }</style><p>{description}: {path}</p>", encoding="utf-8")
    responses = parse_responses({"forbidden": {"body": {"content_type": "text/html", "file": str(page)}}}, "responses")
    page.write_text("changed", encoding="utf-8")  # read once, at load
    answer = render(responses, Outcome.FORBIDDEN, Reason.FORBIDDEN, path="/x")
    assert answer.body == b"<style>body { margin: 0 }</style><p>no access policy allows this request: /x</p>"


def test_a_missing_or_oversized_file_is_a_config_error(tmp_path: Path) -> None:
    missing = refused({"forbidden": {"body": {"content_type": "text/html", "file": str(tmp_path / "nope.html")}}})
    assert "responses: forbidden.body.file cannot be read" in missing
    big = tmp_path / "big.html"
    big.write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    assert "forbidden.body.file is over 64 KiB" in refused(
        {"forbidden": {"body": {"content_type": "text/html", "file": str(big)}}}
    )
    binary = tmp_path / "bin.html"
    binary.write_bytes(b"\xff\xfe")
    assert "forbidden.body.file is not UTF-8" in refused(
        {"forbidden": {"body": {"content_type": "text/html", "file": str(binary)}}}
    )


# --- bad configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"forbidden": {"headers": {"x-a": "{user}"}}}, "forbidden.headers.x-a uses {user}, which is not one of"),
        ({"forbidden": {"headers": {"x-a": "{reason"}}}, "forbidden.headers.x-a has a stray brace at offset 0"),
        ({"forbidden": {"headers": {"x-a": "reason}"}}}, "forbidden.headers.x-a has a stray brace at offset 6"),
        ({"forbidden": {"headers": {"x-a": "a\r\nb"}}}, "forbidden.headers.x-a must hold printable ASCII only"),
        ({"forbidden": {"headers": {"Location": "/x"}}}, "forbidden.headers.Location must not set the reserved"),
        ({"forbidden": {"headers": {"x-envoy-x": "/x"}}}, "must not set the reserved header 'x-envoy-x'"),
        ({"forbidden": {"headers": {"bad name": "/x"}}}, "forbidden.headers.bad name must be named by an HTTP"),
        ({"forbidden": {"headers": {"x-a": 3}}}, "forbidden.headers.x-a must be a string template"),
        (
            {"unauthenticated": {"redirect": {"url": "https://l/?rd={url"}}},
            "unauthenticated.redirect.url has a stray brace",
        ),
        ({"unauthenticated": {"redirect": {"url": "https://l/?rd={rd}"}}}, "unauthenticated.redirect.url uses {rd}"),
        ({"unauthenticated": {"redirect": {"url": "javascript:alert(1)"}}}, "unauthenticated.redirect.url must be an"),
        ({"unauthenticated": {"redirect": {"url": "//evil/"}}}, "unauthenticated.redirect.url must be an"),
        ({"unauthenticated": {"redirect": {"url": "/a b"}}}, "unauthenticated.redirect.url must hold visible ASCII"),
        ({"unauthenticated": {"redirect": {}}}, "unauthenticated.redirect.url is required"),
        (
            {"unauthenticated": {"redirect": {"url": "/l", "when_accept": "*/*"}}},
            "unauthenticated.redirect.when_accept must be a media type",
        ),
        (
            {"unauthenticated": {"redirect": {"url": "/l", "when_accept": "application/json"}}},
            "unauthenticated.redirect.when_accept must not be application/json",
        ),
        ({"forbidden": {"redirect": {"url": "/l"}}}, "forbidden.redirect is only for unauthenticated"),
        (
            {"forbidden": {"body": {"content_type": "application/json", "text": '{"e": {error}}'}}},
            "forbidden.body.text must be JSON, with each {slot} inside a JSON string",
        ),
        (
            {"forbidden": {"body": {"content_type": "application/json", "text": '{"e": "{eror}"}'}}},
            "forbidden.body.text uses {eror}",
        ),
        (
            {"forbidden": {"body": {"content_type": "text/html", "text": "<p>{path</p>"}}},
            "forbidden.body.text has a stray brace at offset 3",
        ),
        ({"forbidden": {"body": {"content_type": "text/html"}}}, "forbidden.body needs exactly one of text and file"),
        (
            {"forbidden": {"body": {"content_type": "text/html", "text": "a", "file": "/f"}}},
            "forbidden.body needs exactly one of text and file",
        ),
        ({"forbidden": {"body": {"content_type": "image/png", "text": "a"}}}, "forbidden.body.content_type must be"),
        ({"forbidden": {"body": {"text": "a"}}}, "forbidden.body.content_type is required"),
        ({"forbidden": {"status": 418}}, "forbidden.status is not a known field"),
        ({"forbiden": {}}, "responses: forbiden is not a known field"),
        ({"allow": {}}, "responses: allow is not a known field"),
    ],
)
def test_bad_templates_are_refused_naming_the_field(raw: dict[str, Any], expected: str) -> None:
    assert expected in refused(raw)


def test_every_problem_is_listed_at_once() -> None:
    message = refused({"forbidden": {"headers": {"x-a": "{user}"}}, "unauthenticated": {"redirect": {"url": "/l?{x}"}}})
    assert "forbidden.headers.x-a" in message
    assert "unauthenticated.redirect.url" in message


def test_the_issue_example_loads(tmp_path: Path) -> None:
    page = tmp_path / "forbidden.html"
    page.write_text("<h1>Forbidden</h1>", encoding="utf-8")
    responses = parse_responses(
        {
            "unauthenticated": {
                "redirect": {"url": "https://login.example.com/start?rd={url}", "when_accept": "text/html"},
                "headers": {"x-reason": "{reason}"},
                "body": {
                    "content_type": "application/json",
                    "text": '{"error": "{error}", "description": "{description}"}',
                },
            },
            "forbidden": {"body": {"content_type": "text/html", "file": str(page)}},
        },
        "responses",
    )
    assert render(responses, accept=BROWSER).status == 302
    assert render(responses, Outcome.FORBIDDEN, Reason.FORBIDDEN).body == b"<h1>Forbidden</h1>"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_responses_answer_to_a_refused_dpop_proof_keeps_the_dpop_challenge(protocol: str) -> None:
    # The block writes Bearer's challenge; a refused proof must still say DPoP (RFC 9449 7.1).
    responses = parse_responses({"unauthenticated": {"headers": {"x-reason": "{reason}"}}})
    decision = Decision(Outcome.UNAUTHENTICATED, Reason.DPOP_REPLAYED)
    request = HttpRequest(method="GET", path="/a", host="api.example", scheme="https")
    if protocol == "http":
        answer = HttpAnswers(ResponseConfig(), denials=responses, dpop_algs="ES256").answer(decision, request)
        headers = dict(answer.headers)
    else:
        raw = ResponseBuilder(ResponseConfig(), denials=responses, dpop_algs="ES256").encode(decision, request)
        response = external_auth_pb2.CheckResponse.FromString(raw)
        headers = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    assert 'algs="ES256"' in headers["www-authenticate"]
    assert headers["x-reason"] == Reason.DPOP_REPLAYED.label
