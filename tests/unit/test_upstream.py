"""upstream: the one hardened HTTP client, against a real HTTP server on 127.0.0.1.

Every failure (timeout, redirect, oversize body, non-200, non-JSON, refused connection) is an
UpstreamUnavailable with a short outcome label, counted per (endpoint, outcome).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from authz_service.errors import UpstreamUnavailable
from authz_service.tokens.base import CLIENT_AUTH_FAILED, INVALID_TOKEN, IdpErrorAnswer
from authz_service.upstream import MAX_INTROSPECTION_BYTES, MAX_JWKS_BYTES, UpstreamClient
from tests.unit.fakes import CannedIdp

SECRET_TOKEN = "opaque-7f3a9c2e4b1d8f6a"


@pytest_asyncio.fixture
async def idp() -> AsyncIterator[CannedIdp]:
    async with CannedIdp() as server:
        yield server


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, endpoint: str, outcome: str) -> None:
        self.calls.append((endpoint, outcome))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest_asyncio.fixture
async def client(recorder: Recorder) -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(on_call=recorder)
    yield upstream
    await upstream.close()


async def failure(client: UpstreamClient, url: str, *, timeout: float = 2.0, max_bytes: int = MAX_JWKS_BYTES) -> str:
    """The outcome label of a GET that must fail."""
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.get_json("jwks", url, timeout=timeout, max_bytes=max_bytes)
    assert caught.value.endpoint == "jwks"
    return caught.value.outcome


# --------------------------------------------------------------------------- answers


async def test_get_json_returns_the_parsed_body(idp: CannedIdp, client: UpstreamClient, recorder: Recorder) -> None:
    idp.answer({"keys": [{"kid": "k1"}]})
    assert await client.get_json("jwks", idp.url + "/jwks", timeout=2) == {"keys": [{"kid": "k1"}]}
    [seen] = idp.seen
    assert (seen.method, seen.path) == ("GET", "/jwks")
    assert seen.headers["Accept"] == "application/jwk-set+json, application/json"
    assert seen.headers["User-Agent"] == "authz-service"
    assert client.calls[("jwks", "ok")] == 1
    assert recorder.calls == [("jwks", "ok")]


async def test_post_form_sends_the_form_and_headers(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer({"active": True})
    answer = await client.post_form(
        "introspection",
        idp.url + "/introspect",
        {"token": SECRET_TOKEN, "token_type_hint": "access_token"},
        headers={"Authorization": "Basic YXV0aHo6c2VjcmV0"},
        timeout=2,
    )
    assert answer == {"active": True}
    [seen] = idp.seen
    assert seen.method == "POST"
    assert seen.form == {"token": SECRET_TOKEN, "token_type_hint": "access_token"}
    assert seen.headers["Authorization"] == "Basic YXV0aHo6c2VjcmV0"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"


async def test_a_body_exactly_at_the_cap_is_read(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.body = json.dumps({"p": "x" * 100}).encode()
    assert await client.get_json("jwks", idp.url, timeout=2, max_bytes=len(idp.body)) == {"p": "x" * 100}


def test_caps() -> None:
    assert MAX_INTROSPECTION_BYTES == 64 * 1024
    assert MAX_JWKS_BYTES == 1024 * 1024


# --------------------------------------------------------------------------- failures


async def test_timeout(idp: CannedIdp, client: UpstreamClient) -> None:
    gate = idp.hang()
    assert await failure(client, idp.url, timeout=0.05) == "timeout"
    gate.open()


async def test_redirect_is_never_followed(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.status = 302
    idp.extra_headers = {"Location": "/moved"}
    assert await failure(client, idp.url + "/jwks") == "http_302"
    assert idp.paths() == ["/jwks"]  # the target was never asked


@pytest.mark.parametrize("status", [201, 204, 401, 404, 500, 503])
async def test_any_status_but_200_is_a_failure(idp: CannedIdp, client: UpstreamClient, status: int) -> None:
    idp.answer({"keys": []}, status=status)
    assert await failure(client, idp.url) == f"http_{status}"


async def test_a_declared_length_over_the_cap(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.body = json.dumps({"p": "x" * 2000}).encode()
    assert await failure(client, idp.url, max_bytes=1000) == "too_large"


async def test_a_streamed_body_over_the_cap(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.body = json.dumps({"p": "x" * 20_000}).encode()
    idp.chunked = True  # no Content-Length: only reading stops it
    assert await failure(client, idp.url, max_bytes=10_000) == "too_large"


async def test_introspection_answers_are_capped_at_64_kib(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.body = json.dumps({"active": True, "p": "x" * MAX_INTROSPECTION_BYTES}).encode()
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.post_form("introspection", idp.url, {"token": "t"}, headers={}, timeout=2)
    assert caught.value.outcome == "too_large"


@pytest.mark.parametrize(
    "body",
    [
        b"<!doctype html><h1>Sign in</h1>",
        b'{"keys": NaN}',
        b'{"active": true, "active": false}',
        b"\xff\xfe{}",
        b"",
    ],
)
async def test_anything_but_strict_json_is_a_failure(idp: CannedIdp, client: UpstreamClient, body: bytes) -> None:
    idp.body = body
    assert await failure(client, idp.url) == "not_json"


async def test_connection_refused(idp: CannedIdp, client: UpstreamClient) -> None:
    url = idp.url
    await idp.stop()
    assert await failure(client, url) == "connect_error"


async def test_every_failure_is_counted_with_its_label(
    idp: CannedIdp, client: UpstreamClient, recorder: Recorder
) -> None:
    idp.answer({}, status=503)
    await failure(client, idp.url)
    idp.body = b"nope"
    idp.status = 200
    await failure(client, idp.url)
    assert recorder.calls == [("jwks", "http_503"), ("jwks", "not_json")]
    assert client.calls[("jwks", "http_503")] == 1
    assert client.calls[("jwks", "not_json")] == 1


async def test_failures_name_no_token_or_url(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer({}, status=500)
    url = idp.url + f"/introspect?client_secret={SECRET_TOKEN}"
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.post_form("introspection", url, {"token": SECRET_TOKEN}, headers={}, timeout=2)
    assert SECRET_TOKEN not in str(caught.value)
    assert str(caught.value) == "introspection endpoint unavailable: http_500"


# --------------------------------------------------------------------------- OAuth error answers


async def post_failure(client: UpstreamClient, url: str) -> UpstreamUnavailable:
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.post_form("introspection", url, {"token": SECRET_TOKEN}, headers={}, timeout=2)
    return caught.value


@pytest.mark.parametrize(
    ("status", "body", "outcome", "error"),
    [
        (401, {"error": "invalid_client"}, CLIENT_AUTH_FAILED, "invalid_client"),
        (401, {}, CLIENT_AUTH_FAILED, None),  # a 401 is about our credentials, whatever its body
        (400, {"error": "invalid_client"}, CLIENT_AUTH_FAILED, "invalid_client"),
        (400, {"error": "invalid_token"}, INVALID_TOKEN, "invalid_token"),
        (400, {"error": "unsupported_token_type"}, INVALID_TOKEN, "unsupported_token_type"),
        (400, {"error": "invalid_request"}, "http_400", "invalid_request"),
        (400, {"error": "<script>" + SECRET_TOKEN}, "http_400", None),  # unknown codes are never kept
        (400, {"error": ["invalid_token"]}, "http_400", None),
    ],
)
async def test_oauth_error_answers_carry_their_status_and_known_code(
    idp: CannedIdp, client: UpstreamClient, recorder: Recorder, status: int, body: Any, outcome: str, error: str | None
) -> None:
    idp.answer(body, status=status)
    caught = await post_failure(client, idp.url)
    assert isinstance(caught, IdpErrorAnswer)
    assert (caught.outcome, caught.status, caught.error) == (outcome, status, error)
    assert recorder.calls == [("introspection", outcome)]
    assert SECRET_TOKEN not in str(caught)


async def test_an_oversized_or_broken_error_body_has_no_code(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.body = json.dumps({"error": "invalid_token", "p": "x" * MAX_INTROSPECTION_BYTES}).encode()
    idp.status = 400
    caught = await post_failure(client, idp.url)
    assert isinstance(caught, IdpErrorAnswer)
    assert (caught.outcome, caught.error) == ("http_400", None)
    idp.body = b'{"error": "invalid_token", "error": "invalid_token"}'  # duplicate keys: not strict JSON
    caught = await post_failure(client, idp.url)
    assert (caught.outcome, getattr(caught, "error", "?")) == ("http_400", None)


async def test_a_get_is_never_read_as_an_oauth_error(idp: CannedIdp, client: UpstreamClient) -> None:
    # JWKS and discovery take no client credentials: their 401 is an outage like any other status.
    idp.answer({"error": "invalid_client"}, status=401)
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.get_json("jwks", idp.url, timeout=2)
    assert not isinstance(caught.value, IdpErrorAnswer)
    assert caught.value.outcome == "http_401"


# --------------------------------------------------------------------------- the session


async def test_proxies_from_the_environment_are_ignored(
    idp: CannedIdp, client: UpstreamClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # IdP traffic goes where config says, not through whatever proxy the environment names.
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    idp.answer({"ok": True})
    assert await client.get_json("jwks", idp.url, timeout=2) == {"ok": True}


async def test_a_closed_client_opens_a_new_session_when_used_again(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer({"ok": True})
    await client.get_json("jwks", idp.url, timeout=2)
    await client.close()
    assert await client.get_json("jwks", idp.url, timeout=2) == {"ok": True}
