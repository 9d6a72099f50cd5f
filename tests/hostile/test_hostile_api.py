"""Hostile requests to the resource API: huge bodies, YAML bombs and tags, duplicate keys, ids that
try to become paths, a hundred writers at once, and secrets that must never come back out."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_service.store.file import FileStore
from tests.api_harness import API_TOKEN, ApiService, config_with_api, start_api_service
from tests.unit.test_yamlload import BILLION_LAUGHS, SEED_GUIDE_KEYS_EXAMPLE

SECRETS = ("jwt-secret-0123456789abcdef0123456789", "oct-key-0123456789abcdef0123456789", "Basic c2VjcmV0OnBhc3M=")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ApiService]:
    started = await start_api_service(
        tmp_path / "config.yaml", config_with_api({"backend": "file", "path": str(tmp_path / "store")})
    )
    yield started
    await started.close()


async def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes as they are; the start of the answer (whatever the server sends before closing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.close()


# --------------------------------------------------------------------------- size


async def test_a_10_mb_body_is_413_before_it_is_read(service: ApiService) -> None:
    assert service.service.admin is not None
    port = service.service.admin.port
    assert port is not None
    head = (
        "PUT /AccessPolicy/big HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {API_TOKEN}\r\nContent-Type: text/yaml\r\n"
        f"Content-Length: {10 * 1024 * 1024}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer = await raw_request(port, head, b"engine: allow\n")  # the rest is never sent
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"at most 1048576 (api.max_body_bytes)" in answer
    assert time.monotonic() - started < 5  # answered from the header, not after waiting for 10 MB

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused as the stream passes the cap
        for _ in range(160):
            yield b"#" * 65536

    async with service.session.put(
        service.url + "/AccessPolicy/big", data=chunks(), headers={"Authorization": f"Bearer {API_TOKEN}"}
    ) as response:
        assert response.status == 413
        assert "over 1048576 bytes" in (await response.json())["issue"][0]["diagnostics"]
    assert (await service.request("GET", "/AccessPolicy/big")).status == 404
    assert (await service.request("PUT", "/AccessPolicy/small", "engine: allow\n")).status == 201


async def test_a_10_mb_body_without_the_token_is_401_unread(service: ApiService) -> None:
    assert service.service.admin is not None
    port = service.service.admin.port
    assert port is not None
    head = f"PUT /AccessPolicy/big HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * 1024 * 1024}\r\n\r\n".encode()
    assert (await raw_request(port, head)).startswith(b"HTTP/1.1 401 ")


# --------------------------------------------------------------------------- YAML


async def test_a_yaml_bomb_is_422_at_once(service: ApiService) -> None:
    started = time.monotonic()
    reply = await service.request("PUT", "/AccessPolicy/bomb", BILLION_LAUGHS)
    assert reply.status == 422
    assert "alias bomb" in reply.diagnostics[0]
    assert time.monotonic() - started < 2
    recursive = await service.request("PUT", "/AccessPolicy/loop", "engine: matcho\nmatcho: &m {a: *m}\n")
    assert (recursive.status, "alias inside" in recursive.diagnostics[0]) == (422, True)
    bulk = await service.request("PUT", "/", "- " + BILLION_LAUGHS.replace("\n", "\n  "))
    assert bulk.status == 422


async def test_yaml_tags_are_refused_and_never_run(service: ApiService, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for body in (
        f"!!python/object/apply:os.system ['touch {marker}']\n",
        f"engine: matcho\nmatcho: !!python/object/apply:os.system ['touch {marker}']\n",
        "engine: !!python/name:os.system\n",
    ):
        reply = await service.request("PUT", "/AccessPolicy/tagged", body)
        assert reply.status == 422
        assert "could not determine a constructor" in reply.diagnostics[0]
    assert not marker.exists()


async def test_the_seed_guides_duplicate_keys_are_a_422_naming_the_key(service: ApiService) -> None:
    reply = await service.request("PUT", "/TokenIntrospector/external-auth-server", SEED_GUIDE_KEYS_EXAMPLE)
    assert reply.status == 422
    assert reply.diagnostics == [
        "the body has the key 'resourceType' twice in one mapping (line 1 and line 3); keep one"
    ]
    fixed = SEED_GUIDE_KEYS_EXAMPLE.replace("resourceType: TokenIntrospector\nid: with-keys\n", "")
    assert (await service.request("PUT", "/TokenIntrospector/external-auth-server", fixed)).status == 201


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": ' * 40 + b"1" + b"}" * 40,  # deeper than strict JSON allows
        b'{"a": Infinity}',
        b'{"a": "\\ud800"}',  # a lone surrogate
        b"\xfe\xff\x00{",
    ],
)
async def test_hostile_json_is_400(service: ApiService, body: bytes) -> None:
    reply = await service.request("PUT", "/AccessPolicy/p", body, content_type="application/json")
    assert reply.status == 400


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "raw_id",
    [
        "..",
        ".",
        "%2e%2e",
        "..%2F..%2Fescaped",
        "a%2Fb",
        "a/b",
        "../../escaped",
        "a%00b",
        "x" * 65,
        "caf%C3%A9",
        "a%20b",
        "%ff",
    ],
)
async def test_ids_that_could_become_paths_are_422_and_touch_no_file(
    service: ApiService, tmp_path: Path, raw_id: str
) -> None:
    """Sent byte for byte (an HTTP client would normalize the dot segments away first)."""
    assert service.service.admin is not None
    port = service.service.admin.port
    assert port is not None
    before = await asyncio.to_thread(files_under, tmp_path)
    for method in ("PUT", "GET", "DELETE"):
        head = (
            f"{method} /AccessPolicy/{raw_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_TOKEN}\r\n"
            "Content-Length: 14\r\n\r\n"
        )
        answer = await raw_request(port, head.encode(), b"engine: allow\n")
        assert answer.startswith(b"HTTP/1.1 422 "), (method, raw_id, answer[:200])
        assert b'"diagnostics": "the id in the URL ' in answer
    assert await asyncio.to_thread(files_under, tmp_path) == before


def files_under(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.rglob("*"))


async def test_dot_segments_are_not_resolved_by_the_router(service: ApiService) -> None:
    assert service.service.admin is not None
    port = service.service.admin.port
    assert port is not None
    head = f"PUT /AccessPolicy/../User/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_TOKEN}\r\n"
    answer = await raw_request(port, (head + "Content-Length: 14\r\n\r\n").encode(), b"engine: allow\n")
    assert answer.startswith(b"HTTP/1.1 422 ")
    assert (await service.request("GET", "/User/x")).status == 404


# --------------------------------------------------------------------------- concurrency


async def test_a_hundred_concurrent_puts_to_one_id_leave_exactly_one_version(
    service: ApiService, tmp_path: Path
) -> None:
    async def put(i: int) -> int:
        body = {"engine": "matcho", "matcho": {"uri": f"#^/only-{i}$"}, "description": f"version {i}"}
        return (await service.request("PUT", "/AccessPolicy/contended", body)).status

    statuses = await asyncio.gather(*(put(i) for i in range(100)))
    assert sorted(statuses) == [200] * 99 + [201]
    served = (await service.request("GET", "/AccessPolicy/contended")).body
    winner = int(served["description"].split()[1])
    stored = (await FileStore(tmp_path / "store").load()).resources[("AccessPolicy", "contended")]
    assert stored == served
    assert yaml.safe_load((tmp_path / "store" / "AccessPolicy.contended.yaml").read_text()) == served
    (policy,) = service.service.config.policies
    assert policy.rule == {"matcho": served["matcho"]}  # the engine decides with the same version
    assert (await service.check(f"/only-{winner}", token=None)).allowed
    other = (winner + 1) % 100
    assert not (await service.check(f"/only-{other}", token=None)).allowed
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------- the token


async def test_the_token_is_compared_in_constant_time(service: ApiService, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for token in ("x", API_TOKEN[:-1], API_TOKEN, "y" * 5000):
        await service.request("GET", "/AccessPolicy", token=token)
    # Every token, right or wrong, short or long, is compared as a SHA-256 digest: same length, constant time.
    assert compared == [(32, 32)] * 4
    assert hashlib.sha256(API_TOKEN.encode()).digest_size == 32


async def test_with_many_writers_every_token_is_compared_on_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No early exit: the first writer's token, the last one's and a wrong one cost the same
    comparisons, so the time taken says nothing of which writer (if any) a token belongs to."""
    config = config_with_api({"backend": "file", "path": str(tmp_path / "store")})
    writers = [{"name": f"w{i}", "token": f"writer-{i}-0123456789abcdef"} for i in range(3)]
    config["api"]["tokens"] = writers
    started = await start_api_service(tmp_path / "config.yaml", config)
    try:
        calls: list[int] = []
        real = hmac.compare_digest

        def spy(a: Any, b: Any) -> bool:
            calls.append(len(a) + len(b))
            return real(a, b)

        monkeypatch.setattr(hmac, "compare_digest", spy)
        caplog.set_level(logging.DEBUG)
        statuses = []
        for token in (API_TOKEN, writers[0]["token"], writers[2]["token"], "wrong", writers[1]["token"] + "x"):
            calls.clear()
            statuses.append((await started.request("GET", "/AccessPolicy", token=token)).status)
            assert calls == [64] * 4  # api.token and the three writers: every time, digests only
        assert statuses == [200, 200, 200, 401, 401]
        logged = " ".join(r.getMessage() + str(r.__dict__.get("fields")) for r in caplog.records)
        assert "writer-1-0123456789abcdef" not in logged  # a near miss is never echoed
    finally:
        await started.close()


# --------------------------------------------------------------------------- secrets


async def test_secrets_never_come_back_out(service: ApiService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    jwt_secret, oct_key, authorization = SECRETS
    intros = [
        {"id": "hs", "type": "jwt", "jwt": {"iss": "https://hs.example.com", "secret": jwt_secret}},
        {
            "id": "keys",
            "type": "jwt",
            "jwt": {"iss": "https://k.example.com", "keys": [{"kty": "OCT", "alg": "HS256", "k": oct_key}]},
        },
        {
            "id": "opaque",
            "type": "opaque",
            "introspection_endpoint": {"url": "http://127.0.0.1:1/introspect", "authorization": authorization},
        },
    ]
    answers = []
    for resource in intros:
        answers.append(await service.request("PUT", f"/TokenIntrospector/{resource['id']}", resource))
        answers.append(await service.request("PUT", f"/TokenIntrospector/{resource['id']}", resource))
        answers.append(await service.request("GET", f"/TokenIntrospector/{resource['id']}"))
    answers.append(
        await service.request("PUT", "/User/u", {"password": jwt_secret, "twoFactor": {"secretKey": oct_key}})
    )
    answers.append(await service.request("GET", "/User"))
    answers.append(await service.request("GET", "/TokenIntrospector"))
    answers.append(await service.request("PUT", "/", [{"resourceType": "TokenIntrospector", **intros[0]}]))
    # An invalid resource with a secret in it: the diagnostics name fields, never values.
    bad = {"type": "opaque", "introspection_endpoint": {"url": "nope", "authorization": authorization + "\n"}}
    answers.append(await service.request("PUT", "/TokenIntrospector/bad", bad))
    bad_jwt = {"type": "jwt", "jwt": {"iss": 3, "secret": {"nested": jwt_secret}}}
    answers.append(await service.request("PUT", "/TokenIntrospector/bad", bad_jwt))
    answers.append(await service.request("DELETE", "/TokenIntrospector/hs"))
    answers.append(await service.request("DELETE", "/User/u"))
    assert [a.status for a in answers] == [201, 200, 200] * 3 + [201, 200, 200, 200, 422, 422, 200, 200]
    shown = repr([a.body for a in answers]) + repr([a.headers for a in answers])
    logged = "\n".join(f"{r.getMessage()} {r.__dict__.get('fields', '')}" for r in caplog.records)
    for secret in (*SECRETS, "c2VjcmV0OnBhc3M"):
        assert secret not in shown
        assert secret not in logged
    assert answers[2].body == {
        "resourceType": "TokenIntrospector",
        "id": "hs",
        "type": "jwt",
        "jwt": {"iss": "https://hs.example.com"},
    }
    assert answers[5].body["jwt"]["keys"] == [{"kty": "OCT", "alg": "HS256"}]
    assert answers[8].body["introspection_endpoint"] == {"url": "http://127.0.0.1:1/introspect"}


# --------------------------------------------------------------------------- Bundles and dry runs


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


@pytest.mark.parametrize(
    "url",
    [
        "/AccessPolicy/../User/x",
        "/AccessPolicy/..",
        "/AccessPolicy/a/b",
        "/AccessPolicy/a%2Fb",
        "/AccessPolicy/%2e%2e",
        "//AccessPolicy/x",
        "../AccessPolicy/x",
        "http://elsewhere.example.com/AccessPolicy/x",
        "/AccessPolicy/x\x00",
        "/AccessPolicy/" + "x" * 65,
        "",
        "/",
    ],
)
async def test_bundle_urls_that_could_become_paths_are_422_and_touch_no_file(
    service: ApiService, tmp_path: Path, url: str
) -> None:
    before = await asyncio.to_thread(files_under, tmp_path)
    for method in ("PUT", "DELETE"):
        item = {"request": {"method": method, "url": url}, "resource": {"engine": "allow"}}
        transaction = await service.request("POST", "/", bundle("transaction", item))
        assert transaction.status == 422, (method, url, transaction.body)
        assert transaction.diagnostics[0].startswith("entry 0: ")
        batch = await service.request("POST", "/", bundle("batch", item))
        assert batch.status == 200
        assert batch.body["entry"][0]["response"]["status"] == "422 Unprocessable Entity"
    assert await asyncio.to_thread(files_under, tmp_path) == before
    assert (await service.request("GET", "/User/x")).status == 404


async def test_bundles_posts_and_dry_runs_never_show_a_secret(
    service: ApiService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    jwt_secret, _, authorization = SECRETS
    hs = {
        "resourceType": "TokenIntrospector",
        "type": "jwt",
        "jwt": {"iss": "https://hs.example.com", "secret": jwt_secret},
    }
    opaque = {
        "type": "opaque",
        "introspection_endpoint": {"url": "http://127.0.0.1:1/introspect", "authorization": authorization},
    }
    put_hs = {"request": {"method": "PUT", "url": "/TokenIntrospector/hs"}, "resource": hs}
    post_opaque = {"request": {"method": "POST", "url": "/TokenIntrospector"}, "resource": opaque}
    bad = {
        "request": {"method": "PUT", "url": "/TokenIntrospector/bad"},
        "resource": {**hs, "jwt": {"secret": jwt_secret}},
    }
    answers = [
        await service.request("POST", "/TokenIntrospector?_dry_run=true", opaque),
        await service.request("POST", "/TokenIntrospector", opaque),
        await service.request("POST", "/?_dry_run=true", bundle("transaction", put_hs, post_opaque)),
        await service.request("POST", "/", bundle("transaction", put_hs, post_opaque)),
        await service.request("POST", "/", bundle("transaction", put_hs, bad)),
        await service.request("POST", "/", bundle("batch", put_hs, bad, post_opaque)),
        await service.request("PUT", "/?_dry_run=true", bundle("batch", put_hs)),
        await service.request("DELETE", "/TokenIntrospector/hs?_dry_run=true"),
    ]
    assert [a.status for a in answers] == [201, 201, 200, 200, 422, 200, 200, 200]
    shown = repr([a.body for a in answers]) + repr([a.headers for a in answers])
    logged = "\n".join(f"{r.getMessage()} {r.__dict__.get('fields', '')}" for r in caplog.records)
    for secret in (jwt_secret, authorization, "c2VjcmV0OnBhc3M"):
        assert secret not in shown
        assert secret not in logged
    assert answers[3].body["entry"][0]["resource"]["jwt"] == {"iss": "https://hs.example.com"}


async def test_a_large_batch_is_validated_together_not_once_per_entry(
    service: ApiService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A validation costs as much as the whole config (milliseconds per policy): one per entry of a
    1,000-entry batch would hold the store's lock for minutes."""
    sync = service.service.sync
    assert sync is not None
    validations = 0
    compose = sync.compose

    def counting(resources: Any) -> Any:
        nonlocal validations
        validations += 1
        return compose(resources)

    monkeypatch.setattr(sync, "compose", counting)
    entries = [
        {
            "request": {"method": "PUT", "url": f"/AccessPolicy/p{i}"},
            "resource": {"engine": "matcho", "matcho": {"uri": "#(" if i in (10, 700) else f"#^/p{i}/"}},
        }
        for i in range(1000)
    ]
    reply = await service.request("POST", "/", bundle("batch", *entries))
    assert reply.status == 200
    statuses = [e["response"]["status"] for e in reply.body["entry"]]
    assert statuses.count("201 Created") == 998
    assert statuses[10] == statuses[700] == "422 Unprocessable Entity"
    # Everything; then without the two entries the first validation named. The write's own check is
    # the second one's, remembered; applying the store once written is the process's own (one more).
    assert validations <= 4, validations
    assert (await service.request("GET", "/AccessPolicy")).body["total"] == 998
