"""upstream: the Content-Type rule (issue 16, item 5), against real HTTP servers on 127.0.0.1.

An introspection answer must be labelled JSON (`application/json` or `application/*+json`, any
parameters): anything else (text/plain, no Content-Type at all, application/jsonp, HTML) is an
unusable answer, 503 and never cached. JWKS and discovery documents are read whatever their label
(Kubernetes serves application/jwk-set+json; keys on static hosting arrive as octet-stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from authz_service.config.model import OpaqueIntrospectorConfig
from authz_service.errors import UpstreamUnavailable
from authz_service.registries import validate_config
from authz_service.tokens.base import Credential
from authz_service.tokens.cache import BoundedMemoryCache, CacheStats, TokenCache
from authz_service.tokens.opaque import CachedIntrospector, OpaqueIntrospector
from authz_service.upstream import UpstreamClient, is_json_media_type
from tests.unit.fakes import EPOCH, CannedIdp, FakeClock

ACTIVE = {"active": True, "sub": "user-1", "exp": EPOCH + 300}
FORM = {"token": "2YotnFZFEjr1zCsicMWpAA", "token_type_hint": "access_token"}


@pytest_asyncio.fixture
async def idp() -> AsyncIterator[CannedIdp]:
    async with CannedIdp() as server:
        yield server


class RawHttp:
    """A one-answer HTTP/1.1 server written by hand: aiohttp always adds a Content-Type, this one need not."""

    def __init__(self, head: bytes, body: bytes) -> None:
        self.response = (
            head + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(self.response)
                await writer.drain()
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def introspect_outcome(client: UpstreamClient, url: str) -> str | None:
    try:
        answer = await client.post_form("introspection", url, FORM, headers={}, timeout=2)
    except UpstreamUnavailable as err:
        return err.outcome
    assert answer == ACTIVE
    return None


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "Application/JSON",
        "application/token-introspection+json",
        "application/problem+json",  # a 200 in it still has to say "active": true
    ],
)
def test_json_media_types(content_type: str) -> None:
    assert is_json_media_type(content_type)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "text/plain; charset=utf-8",
        "text/json",
        "text/html",
        "application/jsonp",
        "application/javascript",
        "application/x-json",
        "application/octet-stream",
        "application/json-seq",
        "application/token-introspection+jwt",  # RFC 9701's signed answers: not what we ask for
        "application/+json",
        "multipart/form-data; boundary=application/json",
        "application/json\x00",
    ],
)
def test_not_json_media_types(content_type: str | None) -> None:
    assert not is_json_media_type(content_type)


@pytest.mark.parametrize("content_type", ["text/plain", "application/jsonp", "text/html", "application/octet-stream"])
async def test_an_introspection_answer_not_labelled_json_is_unusable(
    idp: CannedIdp, client: UpstreamClient, content_type: str
) -> None:
    idp.answer(ACTIVE)
    idp.content_type = content_type
    assert await introspect_outcome(client, idp.url) == "bad_content_type"
    assert client.calls[("introspection", "bad_content_type")] == 1


async def test_an_introspection_answer_without_content_type_is_unusable(client: UpstreamClient) -> None:
    async with RawHttp(b"HTTP/1.1 200 OK", json.dumps(ACTIVE).encode()) as url:
        assert await introspect_outcome(client, url) == "bad_content_type"
    async with RawHttp(b"HTTP/1.1 200 OK\r\nContent-Type: application/json", json.dumps(ACTIVE).encode()) as url:
        assert await introspect_outcome(client, url) is None  # the raw server itself is fine


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/json;charset=UTF-8", "application/token-introspection+json"],
)
async def test_an_introspection_answer_labelled_json_is_read(client: UpstreamClient, content_type: str) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type.encode()
    async with RawHttp(head, json.dumps(ACTIVE).encode()) as url:
        assert await introspect_outcome(client, url) is None


async def test_introspection_asks_for_json(idp: CannedIdp, client: UpstreamClient) -> None:
    idp.answer(ACTIVE)
    assert await introspect_outcome(client, idp.url) is None
    assert idp.seen[-1].headers["Accept"] == "application/json"


@pytest.mark.parametrize(
    "content_type", ["application/jwk-set+json", "application/octet-stream", "text/plain", "application/json"]
)
async def test_jwks_and_discovery_documents_are_read_whatever_their_label(
    idp: CannedIdp, client: UpstreamClient, content_type: str
) -> None:
    document: dict[str, Any] = {"keys": []}
    idp.answer(document)
    idp.content_type = content_type
    assert await client.get_json("jwks", idp.url + "/jwks", timeout=2) == document
    assert await client.get_json("discovery", idp.url + "/.well-known/openid-configuration", timeout=2) == document
    jwks_request, discovery_request = idp.seen
    # Servers that negotiate get offered the JWK Set type (RFC 7517 8.5) as well as plain JSON.
    assert jwks_request.headers["Accept"] == "application/jwk-set+json, application/json"
    assert discovery_request.headers["Accept"] == "application/json"


async def test_a_jwks_without_content_type_is_read(client: UpstreamClient) -> None:
    async with RawHttp(b"HTTP/1.1 200 OK", b'{"keys": []}') as url:
        assert await client.get_json("jwks", url, timeout=2) == {"keys": []}


async def test_an_unlabelled_introspection_answer_is_never_cached(idp: CannedIdp, client: UpstreamClient) -> None:
    endpoint = {"url": idp.url + "/introspect"}
    [config] = validate_config(
        {"introspectors": [{"id": "ext", "type": "opaque", "introspection_endpoint": endpoint}]}, None
    ).introspectors
    assert isinstance(config, OpaqueIntrospectorConfig)
    clock = FakeClock()
    cache = TokenCache(BoundedMemoryCache(10, clock=clock), "ext", None, CacheStats())
    introspector = CachedIntrospector(OpaqueIntrospector(config, client), cache, clock=clock)
    idp.answer(ACTIVE)
    idp.content_type = "text/plain"
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable) as caught:
            await introspector.introspect(Credential(FORM["token"]))
        assert caught.value.outcome == "bad_content_type"
    assert len(idp.seen) == 2  # asked each time: nothing was cached
    idp.content_type = "application/json"
    assert (await introspector.introspect(Credential(FORM["token"]))).user_id == "user-1"
    assert (await introspector.introspect(Credential(FORM["token"]))).user_id == "user-1"
    assert len(idp.seen) == 3


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
async def test_an_introspection_date_past_the_year_9999_is_an_answer_we_do_not_understand(
    idp: CannedIdp, client: UpstreamClient, name: str
) -> None:
    endpoint = {"url": idp.url + "/introspect"}
    [config] = validate_config(
        {"introspectors": [{"id": "ext", "type": "opaque", "introspection_endpoint": endpoint}]}, None
    ).introspectors
    assert isinstance(config, OpaqueIntrospectorConfig)
    idp.answer({**ACTIVE, name: 10**25})
    with pytest.raises(UpstreamUnavailable) as caught:
        await OpaqueIntrospector(config, client).fetch(FORM["token"])
    assert caught.value.outcome == "invalid_answer"
