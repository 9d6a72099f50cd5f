"""The resource API on a real service started from a config file: Aidbox's workflow, answers,
validation, persistence, the config file watched, and `authz-service apply`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

import authz_service.store.redis  # noqa: F401 - imported before any loop runs: redis-py's first import takes seconds
from authz_service.devstack.idp import DevIdentityProvider
from authz_service.errors import ConfigError
from authz_service.registries import parse_config
from authz_service.store.file import FileStore
from tests.api_harness import API_TOKEN, LONG_SECRET, ApiService, config_with_api, start_api_service
from tests.conftest import Spawn, free_port, jwks_introspector, opaque_introspector
from tests.harness import Answer, AuthorizationClient, check_request

ROOT = Path(__file__).resolve().parents[2]
StartApi = Callable[..., Awaitable[ApiService]]

FILE_INTROSPECTOR = {
    "id": "from-file",
    "type": "jwt",
    "jwt": {"iss": "https://file.example.com", "secret": LONG_SECRET},
}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[StartApi]:
    """Start services from config dicts (written to a file, store in tmp_path/store); stopped after."""
    started: list[ApiService] = []

    async def start(config: Mapping[str, Any] | None = None, path: Path | None = None) -> ApiService:
        if config is None and path is None:
            config = config_with_api({"backend": "file", "path": str(tmp_path / "store")})
        service = await start_api_service(path or tmp_path / f"config-{len(started)}.yaml", config)
        started.append(service)
        return service

    yield start
    for service in started:
        await service.close()


def file_store(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    return config_with_api({"backend": "file", "path": str(tmp_path / "store")}, **sections)


def hs256(idp: DevIdentityProvider, secret: str, **claims: Any) -> str:
    """A JWT signed with an HMAC secret of any length (the tutorial's is short)."""
    return idp.mint({"aud": None, **claims}, alg="HS256", key=secret, kid=None)


async def minted(idp: DevIdentityProvider, claims: Mapping[str, Any] | None = None) -> str:
    """An RS256 token, signed off the loop (an RSA signature on a busy 2-core machine can take a while)."""
    return await asyncio.to_thread(idp.mint, claims)


def doc_requests() -> list[tuple[str, str, dict[str, str], str]]:
    """The ```http blocks of docs/resources.md: (method, path, headers, body)."""
    text = (ROOT / "docs" / "resources.md").read_text()
    requests = []
    for block in re.findall(r"```http\n(.*?)```", text, re.S):
        head, _, body = block.partition("\n\n")
        request_line, *header_lines = head.splitlines()
        method, path = request_line.split()
        headers = dict(line.split(": ", 1) for line in header_lines)
        requests.append((method, path, headers, body))
    return requests


# --------------------------------------------------------------------------- the seed guide


async def test_the_seed_guide_requests_in_the_docs_work_verbatim(
    api: StartApi, idp: DevIdentityProvider, tmp_path: Path
) -> None:
    service = await api()
    token = hs256(idp, "very-secret", iss="https://auth.example.com", sub="basic")
    assert (await service.check("/Patient", token=token)).http_status == 401  # nobody trusts that issuer yet

    requests = doc_requests()
    assert [(m, p) for m, p, _, _ in requests] == [
        ("PUT", "/TokenIntrospector/external-auth-server"),
        ("PUT", "/AccessPolicy/external-auth-server"),
        ("PUT", "/User/basic"),
    ]
    for method, path, headers, body in requests:
        reply = await service.request(method, path, body, headers=headers)
        assert reply.status == 201, (path, reply.body)
        assert reply.headers["Location"] == path
        sent = yaml.safe_load(body)
        sent.get("jwt", {}).pop("secret", None)
        assert reply.body == sent  # as stored, in JSON, without the secret

    answer = await service.check("/Patient", token=token)
    assert answer.allowed
    assert answer.headers["x-user-id"] == "basic"
    # The policy checks the issuer; the store has the files; the secret never came back.
    assert (await service.check("/Patient", token=hs256(idp, "wrong-secret", iss="https://auth.example.com"))).code
    assert sorted(p.name for p in (tmp_path / "store").glob("*.yaml")) == [
        "AccessPolicy.external-auth-server.yaml",
        "TokenIntrospector.external-auth-server.yaml",
        "User.basic.yaml",
    ]
    got = await service.request("GET", "/TokenIntrospector/external-auth-server")
    assert got.body["jwt"] == {"iss": "https://auth.example.com"}


# --------------------------------------------------------------------------- access


async def test_the_api_needs_the_token(api: StartApi) -> None:
    service = await api()
    for token in (None, "wrong", API_TOKEN + "x", API_TOKEN[:-1]):
        reply = await service.request("GET", "/AccessPolicy", token=token)
        assert reply.status == 401
        assert reply.body["issue"][0]["code"] == "login"
        expected = 'Bearer realm="authz-service"' + (', error="invalid_token"' if token else "")
        assert reply.headers["WWW-Authenticate"] == expected
    basic = await service.request("GET", "/AccessPolicy", token=None, headers={"Authorization": f"Basic {API_TOKEN}"})
    assert basic.status == 401
    put = await service.request("PUT", "/AccessPolicy/p", "engine: allow\n", token="wrong")
    assert put.status == 401
    assert (await service.request("GET", "/AccessPolicy/p")).status == 404  # nothing was written
    assert (await service.request("GET", "/healthz", token=None)).status == 200
    assert (await service.request("GET", "/AccessPolicy")).status == 200


async def test_without_a_token_the_api_is_404_and_the_store_is_read(
    api: StartApi, tmp_path: Path, idp: DevIdentityProvider
) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "AccessPolicy.only-public.yaml").write_text("engine: matcho\nmatcho: {uri: '#^/public'}\n")
    service = await api(
        config_with_api(
            {"backend": "file", "path": str(tmp_path / "store")}, token=None, introspectors=[jwks_introspector(idp)]
        )
    )
    for method in ("GET", "PUT", "DELETE"):
        assert (await service.request(method, "/AccessPolicy/only-public", "engine: allow\n")).status == 404
    assert (await service.request("PUT", "/", "[]")).status == 404
    assert (await service.check("/private", token=await minted(idp))).http_status == 403  # the store's policy applies
    assert (await service.check("/public/x", token=await minted(idp))).allowed


# --------------------------------------------------------------------------- who changed what

WRITERS = [
    {"name": "alice", "token": "alice-token-0123456789abcdef"},
    {"name": "ci", "token": "ci-token-0123456789abcdef012"},
]


def get_digest(shown: Any) -> str:
    """What the audit line's digest is, computed from what GET shows: sha256 of the canonical JSON."""
    canonical = json.dumps(shown, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()[:16]


async def test_every_write_is_audited_with_its_writer_and_digests(
    api: StartApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = file_store(tmp_path, introspectors=[FILE_INTROSPECTOR])
    config["api"]["tokens"] = WRITERS
    service = await api(config)
    alice, ci = WRITERS[0]["token"], WRITERS[1]["token"]
    for token in (alice, ci, API_TOKEN):
        assert (await service.request("GET", "/AccessPolicy", token=token)).status == 200
    for token in (alice[:-1], ci + "x", "alice", "ci"):
        assert (await service.request("GET", "/AccessPolicy", token=token)).status == 401
    caplog.set_level(logging.INFO, "authz_service")

    created = await service.request("PUT", "/AccessPolicy/p", "engine: matcho\nmatcho: {uri: '#^/a'}\n", token=alice)
    updated = await service.request("PUT", "/AccessPolicy/p", "engine: matcho\nmatcho: {uri: '#^/b'}\n", token=ci)
    unchanged = await service.request("PUT", "/AccessPolicy/p", "engine: matcho\nmatcho: {uri: '#^/b'}\n", token=ci)
    deleted = await service.request("DELETE", "/AccessPolicy/p")
    bulk = await service.request(
        "PUT",
        "/",
        [{"resourceType": "User", "id": "u"}, {"resourceType": "Role", "id": "r", "name": "x", "user": {"id": "u"}}],
        token=alice,
    )
    introspector = {"type": "jwt", "jwt": {"iss": "https://api.example.com", "secret": LONG_SECRET}}
    first = await service.request("PUT", "/TokenIntrospector/api-jwt", introspector, token=ci)
    rotated = {"type": "jwt", "jwt": {"iss": "https://api.example.com", "secret": LONG_SECRET[::-1]}}
    second = await service.request("PUT", "/TokenIntrospector/api-jwt", rotated, token=ci)
    statuses = [r.status for r in (created, updated, unchanged, deleted, bulk, first, second)]
    assert statuses == [201, 200, 200, 200, 200, 201, 200]

    lines = [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "resource written"]
    assert [(f["writer"], f["request"], f["resource"], f["action"]) for f in lines] == [
        ("alice", "PUT /AccessPolicy/p", "AccessPolicy/p", "create"),
        ("ci", "PUT /AccessPolicy/p", "AccessPolicy/p", "update"),
        # the unchanged PUT changed nothing: no line
        ("api-token", "DELETE /AccessPolicy/p", "AccessPolicy/p", "delete"),
        ("alice", "PUT /", "User/u", "create"),
        ("alice", "PUT /", "Role/r", "create"),
        ("ci", "PUT /TokenIntrospector/api-jwt", "TokenIntrospector/api-jwt", "create"),
        ("ci", "PUT /TokenIntrospector/api-jwt", "TokenIntrospector/api-jwt", "update"),
    ]
    # Digests of the resource as GET shows it: before and after chain from write to write.
    assert (lines[0]["before"], lines[0]["after"]) == (None, get_digest(created.body))
    assert (lines[1]["before"], lines[1]["after"]) == (get_digest(created.body), get_digest(updated.body))
    assert (lines[2]["before"], lines[2]["after"]) == (get_digest(updated.body), None)
    assert lines[0]["after"] != lines[1]["after"]
    # A rotated secret: the digest (secrets left out) is the same, the line says the secret changed.
    assert lines[6]["before"] == lines[6]["after"] == get_digest(second.body)
    assert lines[6]["secrets_changed"] is True
    assert "secrets_changed" not in lines[5]
    for record in caplog.records:  # no secret and no body in any line, written or not
        text = record.getMessage() + json.dumps(record.__dict__.get("fields"), default=str)
        assert LONG_SECRET not in text
        assert LONG_SECRET[::-1] not in text
        assert "#^/a" not in text

    metrics = (await service.request("GET", "/metrics", token=None)).body
    expected = {
        ("alice", "AccessPolicy", "create"): 1,
        ("ci", "AccessPolicy", "update"): 1,
        ("api-token", "AccessPolicy", "delete"): 1,
        ("alice", "User", "create"): 1,
        ("alice", "Role", "create"): 1,
        ("ci", "TokenIntrospector", "create"): 1,
        ("ci", "TokenIntrospector", "update"): 1,
    }
    for (writer, kind, action), count in expected.items():
        line = f'authz_api_writes_total{{action="{action}",type="{kind}",writer="{writer}"}} {count:.1f}'
        assert line in metrics, line


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("engine: allow\n", "engine: allow"),
        ("engine: matcho\nmatcho: {}\n", "matcho: {}"),
        ("engine: json-schema\nschema: true\n", "schema: true"),
        ("engine: json-schema\nschema: {}\n", "schema: {}"),
        (
            "engine: complex\nor: [{engine: matcho, matcho: {uri: '#^/a'}}, {engine: json-schema, schema: {}}]\n",
            "complex or: an item matches everything (schema: {})",
        ),
    ],
)
async def test_a_policy_that_allows_everything_is_accepted_with_a_warning(
    api: StartApi, tmp_path: Path, caplog: pytest.LogCaptureFixture, body: str, why: str
) -> None:
    service = await api(file_store(tmp_path, introspectors=[FILE_INTROSPECTOR]))
    caplog.set_level(logging.WARNING, "authz_service")
    reply = await service.request("PUT", "/AccessPolicy/wide", body)
    assert reply.status == 201
    assert reply.body == {"resourceType": "AccessPolicy", "id": "wide", **yaml.safe_load(body)}  # still the resource
    diagnostics = f"AccessPolicy/wide: its rule ({why}) allows every request, even one without a token"
    assert reply.headers["Warning"] == f'299 - "{diagnostics}"'
    logged = [r for r in caplog.records if r.getMessage() == "a policy written through the API allows every request"]
    assert [r.__dict__["fields"]["resource"] for r in logged] == ["AccessPolicy/wide"]
    # FHIR's Prefer: return=OperationOutcome answers the outcome, warning included.
    again = await service.request("PUT", "/AccessPolicy/wide", body, headers={"Prefer": "return=OperationOutcome"})
    assert again.status == 200
    assert again.body == {
        "resourceType": "OperationOutcome",
        "issue": [
            # the same body again: unchanged, as PUT / says it
            {"severity": "information", "code": "informational", "diagnostics": "AccessPolicy/wide: unchanged"},
            {"severity": "warning", "code": "security", "diagnostics": diagnostics},
        ],
    }
    metrics = (await service.request("GET", "/metrics", token=None)).body
    # Logged and counted once: the second PUT changed nothing (it is still answered with the warning).
    assert 'authz_api_allow_everything_writes_total{writer="api-token"} 1.0' in metrics
    assert sum(r.getMessage() == "a policy written through the API allows every request" for r in caplog.records) == 1


async def test_scoped_and_narrow_policies_warn_as_they_should(api: StartApi, tmp_path: Path) -> None:
    service = await api(file_store(tmp_path, introspectors=[FILE_INTROSPECTOR]))
    narrow = await service.request("PUT", "/AccessPolicy/narrow", "engine: matcho\nmatcho: {uri: '#^/a'}\n")
    assert (narrow.status, "Warning" in narrow.headers) == (201, False)
    both = "engine: complex\nand: [{engine: matcho, matcho: {}}, {engine: matcho, matcho: {uri: '#^/a'}}]\n"
    assert "Warning" not in (await service.request("PUT", "/AccessPolicy/and", both)).headers
    scoped = await service.request("PUT", "/AccessPolicy/admins", "engine: allow\nroleName: admin\n")
    assert scoped.headers["Warning"] == (
        "299 - \"AccessPolicy/admins: its rule (engine: allow) allows every request it applies to (roleName 'admin')\""
    )
    bulk = await service.request("PUT", "/", [{"resourceType": "AccessPolicy", "id": "all", "engine": "allow"}])
    assert bulk.body["issue"] == [
        {"severity": "information", "code": "informational", "diagnostics": "AccessPolicy/all: created"},
        {
            "severity": "warning",
            "code": "security",
            "diagnostics": "AccessPolicy/all: its rule (engine: allow) allows every request, even one without a token",
        },
    ]


# --------------------------------------------------------------------------- CRUD


async def test_put_get_list_delete(api: StartApi, tmp_path: Path) -> None:
    service = await api(file_store(tmp_path, introspectors=[FILE_INTROSPECTOR]))
    policy = {"resourceType": "AccessPolicy", "id": "p1", "engine": "matcho", "matcho": {"uri": "#^/a"}}
    created = await service.request("PUT", "/AccessPolicy/p1", policy)
    assert (created.status, created.body, created.headers["Location"]) == (201, policy, "/AccessPolicy/p1")
    replaced = await service.request("PUT", "/AccessPolicy/p1", "engine: matcho\nmatcho: {uri: '#^/b'}\n")
    assert replaced.status == 200
    assert "Location" not in replaced.headers
    assert replaced.body == {"resourceType": "AccessPolicy", "id": "p1", "engine": "matcho", "matcho": {"uri": "#^/b"}}
    assert (await service.request("GET", "/AccessPolicy/p1")).body == replaced.body

    await service.request(
        "PUT",
        "/TokenIntrospector/api-one",
        {"type": "jwt", "jwt": {"iss": "https://api.example.com", "secret": LONG_SECRET}},
    )
    listed = await service.request("GET", "/TokenIntrospector")
    assert listed.status == 200
    assert listed.body == {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 2,
        "entry": [
            {
                "resource": {
                    "resourceType": "TokenIntrospector",
                    "id": "from-file",
                    "type": "jwt",
                    "jwt": {"iss": "https://file.example.com"},
                }
            },
            {
                "resource": {
                    "resourceType": "TokenIntrospector",
                    "id": "api-one",
                    "type": "jwt",
                    "jwt": {"iss": "https://api.example.com"},
                }
            },
        ],
    }
    assert (await service.request("GET", "/TokenIntrospector/from-file")).body["jwt"] == {
        "iss": "https://file.example.com"
    }

    deleted = await service.request("DELETE", "/AccessPolicy/p1")
    assert (deleted.status, deleted.body) == (200, replaced.body)
    assert (await service.request("GET", "/AccessPolicy/p1")).status == 404
    again = await service.request("DELETE", "/AccessPolicy/p1")
    assert (again.status, again.diagnostics) == (404, ["AccessPolicy/p1 does not exist"])
    assert (await service.request("GET", "/AccessPolicy")).body["total"] == 0


async def test_roles_are_resources_too(api: StartApi) -> None:
    service = await api()
    assert (await service.request("PUT", "/User/u1", "name: Ann\n")).status == 201
    role = await service.request("PUT", "/Role/r1", "name: admin\nuser: {reference: User/u1}\n")
    assert role.status == 201
    assert role.body == {"resourceType": "Role", "id": "r1", "name": "admin", "user": {"reference": "User/u1"}}
    assert (await service.request("GET", "/Role")).body["total"] == 1
    invalid = await service.request("PUT", "/Role/r2", "user: {id: u1}\n")
    assert (invalid.status, invalid.diagnostics) == (422, ["role 'r2': name is required"])
    assert (await service.request("DELETE", "/Role/r1")).status == 200
    assert (await service.request("GET", "/Role/r1")).status == 404


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("POST", "/AccessPolicy/p", 405, "GET, PUT, DELETE"),
        ("PATCH", "/AccessPolicy/p", 405, "GET, PUT, DELETE"),
        ("DELETE", "/AccessPolicy", 405, "GET, POST"),
        ("PUT", "/AccessPolicy", 405, "GET, POST"),
        ("GET", "/", 405, "PUT, POST"),
        ("DELETE", "/", 405, "PUT, POST"),
        ("GET", "/Patient/p", 404, None),
        ("GET", "/Patient", 404, None),
        ("GET", "/accesspolicy/p", 404, None),
    ],
)
async def test_methods_and_types_the_api_does_not_serve(
    api: StartApi, method: str, path: str, status: int, allow: str | None
) -> None:
    service = await api()
    reply = await service.request(method, path, "engine: allow\n")
    assert reply.status == status
    assert reply.body["resourceType"] == "OperationOutcome"
    assert reply.headers.get("Allow") == allow


async def test_a_body_that_contradicts_the_url_is_422_and_meta_is_ignored(api: StartApi) -> None:
    service = await api()
    wrong_id = await service.request("PUT", "/AccessPolicy/p", "id: q\nengine: allow\n")
    assert (wrong_id.status, wrong_id.diagnostics) == (422, ["the body: id 'q' contradicts 'p' in the URL"])
    wrong_type = await service.request("PUT", "/AccessPolicy/p", "resourceType: User\nengine: allow\n")
    assert wrong_type.status == 422
    assert wrong_type.diagnostics == ["the body: resourceType 'User' contradicts AccessPolicy in the URL"]
    not_a_mapping = await service.request("PUT", "/AccessPolicy/p", "- engine: allow\n")
    assert (not_a_mapping.status, not_a_mapping.diagnostics) == (
        422,
        ["the body: must be a AccessPolicy resource (a mapping)"],
    )
    with_meta = await service.request("PUT", "/AccessPolicy/p", {"engine": "allow", "meta": {"versionId": "3"}})
    assert with_meta.status == 201
    assert with_meta.body == {"resourceType": "AccessPolicy", "id": "p", "engine": "allow"}


# --------------------------------------------------------------------------- validation


def bad_regex_problem(ident: str) -> str:
    """What check-config says about a policy whose regex `(` does not compile."""
    return check_config_problems({"policies": [{"id": ident, "engine": "matcho", "matcho": {"uri": "#("}}]})[0]


def check_config_problems(config: Mapping[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(dict(config)), {})
    return [str(p) for p in caught.value.problems]


async def test_invalid_resources_are_422_with_the_check_config_texts_and_change_nothing(
    api: StartApi, tmp_path: Path
) -> None:
    service = await api(file_store(tmp_path, introspectors=[FILE_INTROSPECTOR]))
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("AccessPolicy", "bad-regex", {"engine": "matcho", "matcho": {"uri": "#("}}),
        ("AccessPolicy", "unknown-engine", {"engine": "rego", "rule": "x"}),
        ("AccessPolicy", "scoped", {"engine": "allow", "introspectors": ["nope"]}),
        (
            "TokenIntrospector",
            "two-sources",
            {"type": "jwt", "jwt": {"iss": "https://x", "secret": "s" * 40}, "jwks_uri": "https://x/jwks"},
        ),
        (
            "TokenIntrospector",
            "ttl",
            {"type": "opaque", "cache_ttl": 0, "introspection_endpoint": {"url": "http://x/i"}},
        ),
        (
            "TokenIntrospector",
            "same-iss",
            {"type": "jwt", "jwt": {"iss": "https://file.example.com", "secret": "s" * 40}},
        ),
    ]
    for kind, ident, body in cases:
        reply = await service.request("PUT", f"/{kind}/{ident}", body)
        section = {"AccessPolicy": "policies", "TokenIntrospector": "introspectors"}[kind]
        resource = {"id": ident, "resourceType": kind, **body}
        expected = check_config_problems(
            {
                "introspectors": [FILE_INTROSPECTOR],
                section: [*([FILE_INTROSPECTOR] if section == "introspectors" else []), resource],
            }
        )
        assert reply.status == 422, (ident, reply.body)
        assert reply.diagnostics == expected
        assert all(issue["code"] == "invalid" and issue["severity"] == "error" for issue in reply.body["issue"])
    assert (await service.request("GET", "/AccessPolicy")).body["total"] == 0
    assert not list((tmp_path / "store").glob("*.yaml"))


async def test_a_delete_that_breaks_another_resource_is_422(api: StartApi) -> None:
    service = await api()
    intro = {"type": "jwt", "jwt": {"iss": "https://i.example.com", "secret": LONG_SECRET}}
    assert (await service.request("PUT", "/TokenIntrospector/i", intro)).status == 201
    assert (await service.request("PUT", "/AccessPolicy/p", {"engine": "allow", "introspectors": ["i"]})).status == 201
    reply = await service.request("DELETE", "/TokenIntrospector/i")
    assert reply.status == 422
    assert reply.diagnostics == ["policy 'p': introspectors must list configured introspector ids, unknown: ['i']"]
    assert (await service.request("GET", "/TokenIntrospector/i")).status == 200


async def test_malformed_bodies_are_400(api: StartApi) -> None:
    service = await api()
    yaml_reply = await service.request("PUT", "/AccessPolicy/p", "engine: [allow\n")
    assert yaml_reply.status == 400
    assert yaml_reply.body["issue"][0]["code"] == "structure"
    assert yaml_reply.diagnostics[0].startswith("the body is not valid YAML at line 2")
    for text in ('{"engine": "allow"', '{"a": NaN}', "\xff"):
        reply = await service.request("PUT", "/AccessPolicy/p", text.encode("latin-1"), content_type="application/json")
        assert reply.status == 400, text
        assert reply.diagnostics[0].startswith("the body is not valid JSON")
    not_utf8 = await service.request("PUT", "/AccessPolicy/p", b"engine: \xff\n")
    assert (not_utf8.status, not_utf8.diagnostics) == (400, ["the body is not UTF-8 text"])
    duplicate = await service.request(
        "PUT", "/AccessPolicy/p", '{"engine": "allow", "engine": "matcho"}', content_type="application/json"
    )
    assert (duplicate.status, duplicate.diagnostics) == (
        422,
        ["the body has the key 'engine' twice in one object; keep one"],
    )
    dated = await service.request("PUT", "/User/u", "born: 2001-02-03\n")
    assert (dated.status, dated.diagnostics) == (
        422,
        ["the body: born is a YAML date, not JSON data (quote it to make it a string)"],
    )
    assert (await service.request("PUT", "/AccessPolicy/p", "x", content_type="multipart/form-data")).status == 415
    assert (await service.request("GET", "/AccessPolicy")).body["total"] == 0


async def test_resources_from_the_config_file_are_read_only(api: StartApi, tmp_path: Path) -> None:
    file_policy = {"id": "file-policy", "engine": "allow"}
    service = await api(file_store(tmp_path, introspectors=[FILE_INTROSPECTOR], policies=[file_policy]))
    path = service.path
    for method, url in (
        ("PUT", "/TokenIntrospector/from-file"),
        ("DELETE", "/TokenIntrospector/from-file"),
        ("PUT", "/AccessPolicy/file-policy"),
    ):
        reply = await service.request(method, url, "engine: allow\n")
        assert reply.status == 409
        assert reply.body["issue"][0]["code"] == "conflict"
        assert reply.diagnostics == [f"{url[1:]} is defined in the config file {path}: change it there"]
    bulk = await service.request(
        "PUT",
        "/",
        [{"resourceType": "User", "id": "u"}, {"resourceType": "AccessPolicy", "id": "file-policy", "engine": "allow"}],
    )
    assert bulk.status == 409
    assert (await service.request("GET", "/User/u")).status == 404  # all or nothing
    assert (await service.request("GET", "/AccessPolicy/file-policy")).body == {
        "resourceType": "AccessPolicy",
        **file_policy,
    }


# --------------------------------------------------------------------------- bulk


async def test_bulk_put_applies_all_or_none(api: StartApi, idp: DevIdentityProvider, tmp_path: Path) -> None:
    service = await api(file_store(tmp_path, introspectors=[jwks_introspector(idp)]))
    resources: list[dict[str, Any]] = [
        {"resourceType": "User", "id": "alice", "name": "Alice"},
        {"resourceType": "AccessPolicy", "id": "public", "engine": "matcho", "matcho": {"uri": "#^/public"}},
        {"resourceType": "AccessPolicy", "id": "broken", "engine": "matcho", "matcho": {"uri": "#("}},
    ]
    rejected = await service.request("PUT", "/", resources)
    assert rejected.status == 422
    assert rejected.diagnostics == [bad_regex_problem("broken")]
    assert (await service.request("GET", "/User/alice")).status == 404
    still = await service.check("/private", token=await minted(idp))
    assert (still.http_status, still.response.status.message) == (403, "no_policies")  # still no policies

    applied = await service.request("PUT", "/", "\n".join(["- " + json.dumps(r) for r in resources[:2]]))
    assert applied.status == 200
    assert applied.body["issue"] == [
        {"severity": "information", "code": "informational", "diagnostics": "User/alice: created"},
        {"severity": "information", "code": "informational", "diagnostics": "AccessPolicy/public: created"},
    ]
    assert (await service.check("/private", token=await minted(idp))).http_status == 403
    assert (await service.check("/public/x", token=await minted(idp))).allowed

    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": {**resources[0], "name": "Al"}}, {"resource": resources[1]}],
    }
    again = await service.request("PUT", "/", bundle)
    assert again.diagnostics == ["User/alice: updated", "AccessPolicy/public: unchanged"]


@pytest.mark.parametrize(
    ("body", "diagnostics"),
    [
        (
            {"resourceType": "User", "id": "u"},
            [
                "PUT / takes a list of resources (or a Bundle of them); POST / takes a transaction or batch "
                "Bundle; PUT /<Type>/<id> writes one resource"
            ],
        ),
        (["x"], ["entry 0: must be a resource (a mapping)"]),
        ([{"id": "u"}], ["entry 0: resourceType must be one of TokenIntrospector, AccessPolicy, User, Role, got None"]),
        ([{"resourceType": "User", "id": "a/b"}], ["entry 0: id may only contain letters, digits, '-' and '.'"]),
        ([{"resourceType": "User"}], ["entry 0: id must be a non-empty string"]),
        (
            [{"resourceType": "User", "id": "u"}, {"resourceType": "User", "id": "u"}],
            ["entry 1: User/u is in the list twice"],
        ),
    ],
)
async def test_bulk_lists_are_checked_entry_by_entry(api: StartApi, body: Any, diagnostics: list[str]) -> None:
    service = await api()
    reply = await service.request("PUT", "/", body)
    assert (reply.status, reply.diagnostics) == (422, diagnostics)


# --------------------------------------------------------------------------- applying


async def test_a_put_decides_at_once_and_unchanged_introspectors_keep_their_keys(
    api: StartApi, idp: DevIdentityProvider, tmp_path: Path
) -> None:
    service = await api(file_store(tmp_path, introspectors=[jwks_introspector(idp)]))
    token = await minted(idp, {"sub": "bob"})
    assert (await service.check("/home", token=token)).http_status == 403  # no policies: nothing allowed
    assert idp.hits["jwks"] == 1
    reply = await service.request(
        "PUT", "/AccessPolicy/no-admin", "engine: matcho\nmatcho: {uri: {$not: '#^/admin'}}\n"
    )
    assert reply.status == 201
    assert (await service.check("/home", token=token)).allowed  # no wait: decided with before the 201
    assert (await service.check("/admin", token=token)).http_status == 403
    assert idp.hits["jwks"] == 1  # the introspector was carried over with its keys
    await service.request("DELETE", "/AccessPolicy/no-admin")
    assert (await service.check("/home", token=token)).http_status == 403


async def test_checks_in_flight_finish_on_the_engine_they_started_with(
    api: StartApi, idp: DevIdentityProvider, tmp_path: Path
) -> None:
    service = await api(file_store(tmp_path, introspectors=[opaque_introspector(idp)]))
    token = idp.issue_opaque({"sub": "carol"})
    idp.delay = 1.0
    in_flight = asyncio.ensure_future(service.check("/x", token=token))
    # In flight once the IdP holds its introspection call (answered after idp.delay).
    await eventually(lambda: asyncio.sleep(0), lambda _: idp.hits["introspect"] == 1, 3.0, every=0.01)
    assert (await service.request("PUT", "/AccessPolicy/only-x", "engine: matcho\nmatcho: {uri: /x}\n")).status == 201
    started_before = await in_flight
    # Started with no policies (nothing allowed), it finishes so even though the new policy allows /x.
    assert (started_before.http_status, started_before.response.status.message) == (403, "no_policies")
    idp.delay = 0.0
    assert (await service.check("/x", token=token)).allowed


async def test_a_restart_loads_the_store(api: StartApi, idp: DevIdentityProvider, tmp_path: Path) -> None:
    config = file_store(tmp_path, introspectors=[jwks_introspector(idp)])
    first = await api(config)
    await first.request("PUT", "/AccessPolicy/public", "engine: matcho\nmatcho: {uri: '#^/public'}\n")
    await first.close()
    second = await api(path=first.path)
    assert (await second.request("GET", "/AccessPolicy/public")).status == 200
    assert (await second.check("/private", token=await minted(idp))).http_status == 403


async def test_sighup_keeps_the_store_resources(api: StartApi, idp: DevIdentityProvider, tmp_path: Path) -> None:
    service = await api(file_store(tmp_path, introspectors=[jwks_introspector(idp)]))
    await service.request("PUT", "/AccessPolicy/public", "engine: matcho\nmatcho: {uri: '#^/public'}\n")
    sync = service.service.sync
    assert sync is not None
    assert await sync.reload_file("sighup")
    assert [p.id for p in service.service.config.policies] == ["public"]


async def test_a_store_file_edited_on_disk_is_applied_and_a_broken_one_is_refused(
    api: StartApi, idp: DevIdentityProvider, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = await api(file_store(tmp_path, introspectors=[jwks_introspector(idp)]))
    token = await minted(idp)
    # As a `git pull` or a ConfigMap update would: written next to the service, not through it.
    (tmp_path / "store" / "AccessPolicy.public.yaml").write_text("engine: matcho\nmatcho: {uri: '#^/public'}\n")
    await eventually(lambda: service.check("/public/a", token=token), lambda a: a.allowed, 2.0)
    caplog.set_level(logging.ERROR, "authz_service")
    (tmp_path / "store" / "AccessPolicy.broken.yaml").write_text("engine: matcho\nmatcho: {uri: '#('}\n")
    await eventually(lambda: asyncio.sleep(0), lambda _: any("rejected" in r.getMessage() for r in caplog.records), 3.0)
    await asyncio.sleep(1.2)  # more polls: the same rejection is not logged again
    rejections = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejections) == 1
    assert rejections[0].__dict__["fields"]["problems"] == [bad_regex_problem("broken")]
    assert (await service.check("/private", token=token)).http_status == 403
    assert (await service.check("/public/a", token=token)).allowed
    # While the store holds a file that cannot be read, nothing is written (and the answer names it).
    (tmp_path / "store" / "User.broken.yaml").write_text("name: a\nname: b\n")
    blocked = await service.request("PUT", "/User/u", "name: U\n")
    assert blocked.status == 503
    assert blocked.diagnostics == [
        "the store's content cannot be read, so nothing is written: store file User.broken.yaml: "
        "has the key 'name' twice in one mapping (line 1 and line 2); keep one"
    ]
    assert (await service.request("GET", "/User")).status == 503


async def eventually(
    probe: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], within: float, every: float = 0.05
) -> float:
    """Seconds until probe() satisfies ok(), failing after `within` seconds."""
    started = time.monotonic()
    while True:
        value = await probe()
        if ok(value):
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"not within {within} s: {value!r}"
        await asyncio.sleep(every)


# --------------------------------------------------------------------------- the config file, watched


async def test_a_rewritten_config_file_is_applied_and_a_bad_one_refused(
    api: StartApi, idp: DevIdentityProvider, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    everything = [{"id": "everything", "engine": "matcho", "matcho": {"uri": "#^/"}}]
    config = file_store(tmp_path, introspectors=[jwks_introspector(idp)])
    service = await api({**config, "policies": everything})
    await service.request("PUT", "/User/u", "name: U\n")
    token = await minted(idp)
    assert (await service.check("/private", token=token)).allowed
    service.path.write_text(
        yaml.safe_dump({**config, "policies": [{"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public"}}]})
    )
    took = await eventually(lambda: service.check("/private", token=token), lambda a: a.http_status == 403, 5.0)
    assert took < 5.0
    assert "u" in service.service.config.users  # the store's resources stay

    caplog.set_level(logging.ERROR, "authz_service")
    service.path.write_text(service.path.read_text() + "policies: []\n")  # a duplicate key
    await eventually(
        lambda: asyncio.sleep(0), lambda _: any("config reload rejected" in r.getMessage() for r in caplog.records), 5.0
    )
    record = next(r for r in caplog.records if "config reload rejected" in r.getMessage())
    assert record.__dict__["fields"]["problems"][0].startswith("config: has the key 'policies' twice")
    assert (await service.check("/private", token=token)).http_status == 403  # the running config stays
    # The file now defines what the API may not write.
    assert (await service.request("PUT", "/AccessPolicy/public", "engine: allow\n")).status == 409


async def test_a_configmap_update_of_the_config_file_is_applied(
    api: StartApi, idp: DevIdentityProvider, tmp_path: Path
) -> None:
    """The kubelet's layout: config.yaml -> ..data/config.yaml, ..data -> a timestamped directory,
    and an update swaps ..data (a rename of a symlink) to a new directory."""
    mount = tmp_path / "configmap"
    mount.mkdir()
    config = file_store(tmp_path, introspectors=[jwks_introspector(idp)])

    def publish(content: dict[str, Any], generation: int) -> None:
        data = mount / f"..2026_11_29_00_00_0{generation}.0000"
        data.mkdir()
        (data / "config.yaml").write_text(yaml.safe_dump(content))
        (mount / "..data_tmp").symlink_to(data.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        if not (mount / "config.yaml").is_symlink():
            (mount / "config.yaml").symlink_to("..data/config.yaml")

    publish({**config, "policies": [{"id": "everything", "engine": "matcho", "matcho": {"uri": "#^/"}}]}, 1)
    service = await api(path=mount / "config.yaml")
    token = await minted(idp)
    assert (await service.check("/private", token=token)).allowed
    publish({**config, "policies": [{"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public"}}]}, 2)
    await eventually(lambda: service.check("/private", token=token), lambda a: a.http_status == 403, 5.0)


# --------------------------------------------------------------------------- readiness, metrics


async def test_readyz_and_metrics_describe_the_store(api: StartApi) -> None:
    service = await api()
    await service.request("PUT", "/User/u", "name: U\n")
    ready = await service.request("GET", "/readyz", token=None)
    assert ready.status == 200
    assert ready.body["status"] == "ready"
    store = ready.body["store"]
    assert (store["backend"], store["reachable"], store["resources"]) == ("file", True, 1)
    metrics = (await service.request("GET", "/metrics", token=None)).body
    assert "authz_resource_store_up 1.0" in metrics
    assert "authz_resource_store_resources 1.0" in metrics
    assert 'authz_config_reloads_total{result="ok",source="api"} 1.0' in metrics


# --------------------------------------------------------------------------- the command line


async def run_cli(*args: str, env: Mapping[str, str] | None = None, stdin: bytes | None = None) -> tuple[int, str, str]:
    """`python -m authz_service ARGS` without blocking the loop (the service under test runs on it)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "authz_service",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


APPLY_LIST = """\
- resourceType: TokenIntrospector
  id: external-auth-server
  type: jwt
  jwt: {iss: https://auth.example.com, secret: very-secret}
- resourceType: User
  id: basic
"""
APPLY_STREAM = """\
resourceType: AccessPolicy
id: external-auth-server
engine: json-schema
schema: {required: [jwt]}
---
- {resourceType: User, id: basic}
- {resourceType: Role, id: basic-reader, name: reader, user: {id: basic}}
"""
APPLY_CONFIG_STYLE = """\
server: {grpc_address: 127.0.0.1:9001}
policies:
  - id: external-auth-server
    engine: json-schema
    schema: {required: [jwt]}
users:
  - id: basic
"""


@pytest.mark.slow  # a Python subprocess per command
async def test_apply_sends_a_file_as_one_bulk_put(api: StartApi, tmp_path: Path) -> None:
    service = await api()
    listed = tmp_path / "list.yaml"
    listed.write_text(APPLY_LIST)
    code, out, err = await run_cli("apply", "-f", str(listed), "--url", service.url, "--token", API_TOKEN)
    assert (code, err) == (0, "")
    assert out == (
        f"applied: {service.url} answered HTTP 200\n"
        "  TokenIntrospector/external-auth-server: created\n"
        "  User/basic: created\n"
        # check-config's warning about what was written comes back as a warning issue
        "  warning: introspector 'external-auth-server': jwt.secret is shorter than 32 bytes; "
        "use a longer random secret in production\n"
    )
    stream = tmp_path / "stream.yaml"
    stream.write_text(APPLY_STREAM)
    code, out, _ = await run_cli("apply", "-f", str(stream), "--url", service.url, env={"AUTHZ_API_TOKEN": API_TOKEN})
    assert code == 0
    assert out.splitlines()[1:] == [
        "  AccessPolicy/external-auth-server: created",
        "  User/basic: unchanged",
        "  Role/basic-reader: created",
    ]
    config_style = tmp_path / "config.yaml"
    config_style.write_text(APPLY_CONFIG_STYLE)
    code, out, err = await run_cli("apply", "-f", str(config_style), "--url", service.url, "--token", API_TOKEN)
    assert code == 0
    assert "note: ignoring server in document 1: only resources are applied" in err
    assert out.splitlines()[1:] == ["  AccessPolicy/external-auth-server: unchanged", "  User/basic: unchanged"]
    code, out, _ = await run_cli("apply", "-f", "-", "--url", service.url, "--token", API_TOKEN, stdin=b"[]\n")
    assert (code, out.splitlines()[1:]) == (0, ["  nothing to apply"])


@pytest.mark.slow  # a Python subprocess per command
async def test_apply_prints_rejections_and_usage_errors(api: StartApi, tmp_path: Path) -> None:
    service = await api(file_store(tmp_path, introspectors=[FILE_INTROSPECTOR]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "- {resourceType: AccessPolicy, id: p, engine: matcho, matcho: {uri: '#('}}\n- {resourceType: User, id: u}\n"
    )
    code, out, err = await run_cli("apply", "-f", str(bad), "--url", service.url, "--token", API_TOKEN)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"rejected: {service.url} answered HTTP 422",
        "  error: " + bad_regex_problem("p"),
    ]
    conflict = tmp_path / "conflict.yaml"
    conflict.write_text("- {resourceType: TokenIntrospector, id: from-file, type: jwt}\n")
    code, _, err = await run_cli("apply", "-f", str(conflict), "--url", service.url, "--token", API_TOKEN)
    assert code == 1
    assert "HTTP 409" in err
    code, _, err = await run_cli("apply", "-f", str(bad), "--url", service.url, "--token", "wrong")
    assert code == 1
    assert "HTTP 401" in err

    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("- resourceType: User\n  id: a\n  id: b\n")
    env_ref = tmp_path / "env.yaml"
    env_ref.write_text("- {resourceType: User, id: u, email: '${EMAIL}'}\n")
    usage: list[tuple[list[str], dict[str, str], str]] = [
        (["apply", "-f", str(bad), "--url", service.url], {}, "no --token and no $AUTHZ_API_TOKEN"),
        (["apply", "-f", str(bad), "--token", "t"], {}, "no --url"),
        (["apply", "-f", str(bad), "--url", "ftp://x", "--token", "t"], {}, "--url must be"),
        (["apply", "-f", str(tmp_path / "missing.yaml"), "--url", service.url, "--token", "t"], {}, "cannot read"),
        (["apply", "-f", str(duplicate), "--url", service.url, "--token", "t"], {}, "has the key 'id' twice"),
        (["apply", "--url", service.url, "--token", "t"], {}, "the following arguments are required: -f/--file"),
    ]
    for args, env, message in usage:
        code, _, err = await run_cli(*args, env=env)
        assert code == 2, args
        assert message in err, err
        assert "Traceback" not in err
    code, _, err = await run_cli("apply", "-f", str(env_ref), "--url", service.url, "--token", API_TOKEN)
    assert code == 0
    assert "the service does not expand ${VAR}" in err
    assert (await service.request("GET", "/User/u")).body["email"] == "${EMAIL}"
    code, _, err = await run_cli("apply", "-f", str(bad), "--url", "http://127.0.0.1:1", "--token", "t")
    assert code == 1
    assert "cannot reach http://127.0.0.1:1" in err


@pytest.mark.slow  # Python subprocesses
async def test_check_config_and_start_up_load_a_file_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "AccessPolicy.public.yaml").write_text("engine: matcho\nmatcho: {uri: '#^/public'}\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**file_store(tmp_path), "introspectors": [FILE_INTROSPECTOR]}))
    code, out, _ = await run_cli("check-config", str(config))
    assert code == 0
    assert out.splitlines() == [
        "config OK: 1 introspector(s) [from-file (jwt)], 1 policy(ies), 0 user(s), 0 role(s), "
        "cache memory, grpc 127.0.0.1:0",
        f"with 1 resource(s) from the file store {store}",
    ]
    (store / "AccessPolicy.broken.yaml").write_text("engine: matcho\nengine: matcho\n")
    for args in (["check-config", str(config)], ["--config", str(config)]):
        code, _, err = await run_cli(*args)
        assert code == 2, args
        assert "store file AccessPolicy.broken.yaml: has the key 'engine' twice" in err
        assert "Traceback" not in err


@pytest.mark.slow  # waits out the start-up grace for an unreachable store
async def test_a_store_that_cannot_be_reached_stops_the_start(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_with_api({"backend": "redis", "url": "redis://127.0.0.1:1/0"})))
    started = time.monotonic()
    code, _, err = await run_cli("--config", str(config))
    assert code == 1
    assert "cannot start: the redis store redis://127.0.0.1:1/0 is unreachable" in err
    assert time.monotonic() - started < 30
    assert "Traceback" not in err


def test_api_config_is_checked() -> None:
    problems = check_config_problems(
        {"server": {"admin_address": None}, "api": {"token": "has space", "store": {"backend": "s3"}}}
    )
    assert problems == [
        "api: token must be 1 to 1024 visible ASCII characters (it is sent as a Bearer token)",
        "api: token needs server.admin_address: the resource API is served on the admin listener",
        "api: store.backend must be file or redis, got 's3'",
    ]
    assert check_config_problems({"api": {"token": API_TOKEN}}) == [
        "api: store is required when token is set (where resources written through the API persist)"
    ]
    assert check_config_problems({"api": {"store": {"backend": "redis", "url": "http://x"}, "max_body_bytes": 1}}) == [
        "api: store.url must be a redis:// or rediss:// URL",
        "api: max_body_bytes must be between 1024 and 67108864, got 1",
    ]
    warned = parse_config(
        yaml.safe_dump(
            {"server": {"admin_address": "127.0.0.1:9002"}, "api": {"token": "short", "store": {"path": "/x"}}}
        ),
        {},
    )
    assert warned.warnings == ("api: token is shorter than 16 characters; use a long random token",)


def _free_pair() -> int:
    """A port P with P and P+1 free (worker_base_port for two workers)."""
    import socket

    for _ in range(50):
        base = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    pytest.fail("no two consecutive free ports")


@pytest.mark.slow  # a supervisor and two worker processes
async def test_with_workers_a_2xx_means_every_worker_decides_with_it(
    spawn: Spawn, idp: DevIdentityProvider, tmp_path: Path
) -> None:
    base, admin = _free_pair(), free_port()
    config = {"introspectors": [jwks_introspector(idp)], **file_store(tmp_path), "authentication_only": False}
    config.pop("server")
    await spawn(config, server={"workers": 2, "worker_base_port": base, "admin_address": f"127.0.0.1:{admin}"})
    url = f"http://127.0.0.1:{admin}"
    token = await minted(idp)
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "text/yaml"}
    async with aiohttp.ClientSession() as session:

        async def ready() -> Any:
            try:
                async with session.get(url + "/readyz") as response:
                    return response.status, await response.json()
            except aiohttp.ClientError:
                return None, None

        await eventually(ready, lambda r: r[0] == 200 and len(r[1]["store"]["workers"]) == 2, 30.0)

        async def workers_answer(path: str) -> list[int]:
            return [(await check_port(port, path, token)).http_status for port in (base, base + 1)]

        async def supervisor_decides(path: str) -> tuple[str, str | None]:
            body = {"request": {"path": path, "headers": {"authorization": f"Bearer {token}"}}}
            test_headers = {"Authorization": f"Bearer {API_TOKEN}"}
            async with session.post(url + "/auth/test-policy", json=body, headers=test_headers) as response:
                assert response.status == 200, await response.text()
                answer = await response.json()
            return answer["decision"], answer["policy"]

        assert await workers_answer("/private") == [403, 403]  # no policies: nothing allowed
        for round_ in range(3):
            body = f"engine: matcho\nmatcho: {{uri: '#^/public-{round_}'}}\n"
            async with session.put(url + "/AccessPolicy/public", data=body, headers=headers) as response:
                assert response.status == (201 if round_ == 0 else 200), await response.text()
            # No waiting: the supervisor answered once both workers reported the new content.
            assert await workers_answer(f"/public-{round_}/x") == [200, 200]
            assert await workers_answer(f"/public-{round_ - 1}/x") == [403, 403]
            # test-policy on the supervisor (its own engine, rebuilt when the store changes) decides
            # what the workers decide, token verified against the same IdP.
            assert await supervisor_decides(f"/public-{round_}/x") == ("allow", "public")
            assert await supervisor_decides(f"/public-{round_ - 1}/x") == ("forbidden", None)
        _, body = await ready()
        assert body["store"]["reachable"] is True
        assert {w["version"] for w in body["store"]["workers"]} == {
            (await FileStore(tmp_path / "store").load()).version
        }
        async with session.put(url + "/AccessPolicy/bad", data="engine: nope\n", headers=headers) as invalid:
            assert invalid.status == 422


async def check_port(port: int, path: str, token: str) -> Answer:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return Answer.of(await AuthorizationClient(channel).Check(check_request(path, token=token), timeout=10))


# --------------------------------------------------------------------------- Aidbox's REST habits (issue 22)


@pytest.fixture(params=["file", "redis"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """`api.store` for each backend: a directory, or a fresh prefix of the session's Redis."""
    if request.param == "file":
        return {"backend": "file", "path": str(tmp_path / "store")}
    redis_url = request.getfixturevalue("redis_url")
    return {"backend": "redis", "url": redis_url, "prefix": f"test:{os.urandom(6).hex()}"}


PUBLIC = {"engine": "matcho", "matcho": {"uri": "#^/public"}}
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def writes_total(metrics: str) -> float:
    """Every `authz_api_writes_total` sample added up."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("authz_api_writes_total{")
    )


async def test_post_creates_at_a_server_id_and_the_policy_decides(
    api: StartApi, idp: DevIdentityProvider, store_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    service = await api(config_with_api(store_config, introspectors=[jwks_introspector(idp)]))
    token = await minted(idp)
    assert (await service.check("/public/x", token=token)).http_status == 403  # no policies yet
    caplog.set_level(logging.INFO, "authz_service")

    created = await service.request("POST", "/AccessPolicy", "engine: matcho\nmatcho: {uri: '#^/public'}\n")
    assert created.status == 201, created.body
    ident = created.body["id"]
    assert UUID4.fullmatch(ident), ident
    assert created.headers["Location"] == f"/AccessPolicy/{ident}"
    assert created.body == {"resourceType": "AccessPolicy", "id": ident, **PUBLIC}
    assert "Warning" not in created.headers
    assert (await service.request("GET", created.headers["Location"])).body == created.body
    assert (await service.check("/public/x", token=token)).allowed
    assert (await service.check("/private", token=token)).http_status == 403

    # A second POST of the same body is a second resource (a new id), as in Aidbox.
    again = await service.request("POST", "/AccessPolicy", PUBLIC)
    assert again.status == 201
    assert again.body["id"] not in (ident, None)
    # An id in the body is kept (Aidbox's habit); it must be new: replacing is PUT's.
    named = await service.request("POST", "/User", {"id": "ann", "name": "Ann"})
    assert (named.status, named.headers["Location"], named.body["id"]) == (201, "/User/ann", "ann")
    taken = await service.request("POST", "/User", {"id": "ann", "name": "Other"})
    assert (taken.status, taken.diagnostics) == (
        409,
        ["User/ann already exists: PUT /User/ann replaces it; POST without an id creates a new one"],
    )
    assert (await service.request("GET", "/User/ann")).body["name"] == "Ann"
    # Validated as a PUT is: an invalid policy is 422 and nothing is written.
    invalid = await service.request("POST", "/AccessPolicy", {"engine": "matcho", "matcho": {"uri": "#("}})
    assert invalid.status == 422
    assert invalid.diagnostics[0].startswith("policy '")
    assert (await service.request("GET", "/AccessPolicy")).body["total"] == 2
    # Allow-everything: accepted with the same Warning header as a PUT.
    wide = await service.request("POST", "/AccessPolicy", "engine: allow\n")
    assert wide.status == 201
    wide_id = wide.body["id"]
    assert wide.headers["Warning"] == (
        f'299 - "AccessPolicy/{wide_id}: its rule (engine: allow) allows every request, even one without a token"'
    )

    lines = [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "resource written"]
    assert [(f["writer"], f["request"], f["resource"], f["action"]) for f in lines] == [
        ("api-token", "POST /AccessPolicy", f"AccessPolicy/{ident}", "create"),
        ("api-token", "POST /AccessPolicy", f"AccessPolicy/{again.body['id']}", "create"),
        ("api-token", "POST /User", "User/ann", "create"),
        ("api-token", "POST /AccessPolicy", f"AccessPolicy/{wide_id}", "create"),
    ]
    metrics = (await service.request("GET", "/metrics", token=None)).body
    assert 'authz_api_writes_total{action="create",type="AccessPolicy",writer="api-token"} 3.0' in metrics
    assert 'authz_api_allow_everything_writes_total{writer="api-token"} 1.0' in metrics


def transaction(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def entry(method: str, url: str, resource: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Bundle entry as Aidbox takes it."""
    item: dict[str, Any] = {"request": {"method": method, "url": url}}
    if resource is not None:
        item["resource"] = dict(resource)
    return item


async def test_a_transaction_applies_every_entry_or_none(
    api: StartApi, idp: DevIdentityProvider, store_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    service = await api(config_with_api(store_config, introspectors=[jwks_introspector(idp)]))
    token = await minted(idp)
    assert (
        await service.request("PUT", "/AccessPolicy/p2", {"engine": "matcho", "matcho": {"uri": "#^/old"}})
    ).status == 201
    assert (await service.check("/old/x", token=token)).allowed
    caplog.set_level(logging.INFO, "authz_service")

    # One bad entry (a regex that does not compile): nothing changes, and the entry is named.
    bad = transaction(
        entry("PUT", "/AccessPolicy/p1", PUBLIC),
        entry("DELETE", "/AccessPolicy/p2"),
        entry("POST", "/AccessPolicy", {"id": "broken", "engine": "matcho", "matcho": {"uri": "#("}}),
    )
    rejected = await service.request("POST", "/", bad)
    assert rejected.status == 422
    assert rejected.diagnostics == [f"entry 2: {bad_regex_problem('broken')}"]
    assert (await service.request("GET", "/AccessPolicy/p1")).status == 404
    assert (await service.request("GET", "/AccessPolicy/p2")).status == 200
    assert (await service.check("/old/x", token=token)).allowed
    assert (await service.check("/public/x", token=token)).http_status == 403
    # Every entry that cannot apply is named, with its own status (the first decides the answer's).
    missing = transaction(
        entry("DELETE", "/AccessPolicy/nope"),
        entry("POST", "/User", {"id": "dup"}),
        entry("PUT", "/User/dup", {"name": "x"}),
    )
    refused = await service.request("POST", "/", missing)
    assert (refused.status, refused.diagnostics) == (
        422,
        ["entry 2: User/dup is also in entry 1: a transaction changes each resource once"],
    )
    gone = await service.request("POST", "/", transaction(entry("DELETE", "/AccessPolicy/nope")))
    assert (gone.status, gone.diagnostics) == (404, ["entry 0: AccessPolicy/nope does not exist"])
    assert not [r for r in caplog.records if r.getMessage() == "resource written"]

    good = transaction(
        entry("PUT", "/AccessPolicy/p1", PUBLIC),
        entry("DELETE", "/AccessPolicy/p2"),
        entry("POST", "/User", {"name": "Bob"}),
        {"request": {"method": "PUT", "url": "Role/r1"}, "resource": {"name": "reader", "user": {"id": "ann"}}},
    )
    applied = await service.request("POST", "/", good)
    assert applied.status == 200, applied.body
    assert applied.body["resourceType"] == "Bundle"
    assert applied.body["type"] == "transaction-response"
    responses = [e["response"] for e in applied.body["entry"]]
    user_id = applied.body["entry"][2]["resource"]["id"]
    assert UUID4.fullmatch(user_id)
    assert responses == [
        {"status": "201 Created", "location": "/AccessPolicy/p1"},
        {"status": "204 No Content"},
        {"status": "201 Created", "location": f"/User/{user_id}"},
        {"status": "201 Created", "location": "/Role/r1"},
    ]
    assert applied.body["entry"][0]["resource"] == {"resourceType": "AccessPolicy", "id": "p1", **PUBLIC}
    assert "resource" not in applied.body["entry"][1]
    assert (await service.check("/public/x", token=token)).allowed
    assert (await service.check("/old/x", token=token)).http_status == 403
    assert (await service.request("GET", f"/User/{user_id}")).body["name"] == "Bob"
    lines = [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "resource written"]
    assert [(f["request"], f["resource"], f["action"]) for f in lines] == [
        ("POST / (transaction)", "AccessPolicy/p1", "create"),
        ("POST / (transaction)", "AccessPolicy/p2", "delete"),
        ("POST / (transaction)", f"User/{user_id}", "create"),
        ("POST / (transaction)", "Role/r1", "create"),
    ]
    # One store write: every line carries the same version.
    assert len({f["version"] for f in lines}) == 1

    # The same Bundle sent to PUT / (the bulk endpoint) is read as Aidbox's too.
    again = await service.request("PUT", "/", transaction(entry("PUT", "/AccessPolicy/p1", PUBLIC)))
    assert again.body["entry"][0]["response"] == {"status": "200 OK"}
    # An allow-everything entry: accepted, warned in the header and in the entry's outcome.
    wide = await service.request("POST", "/", transaction(entry("PUT", "/AccessPolicy/wide", {"engine": "allow"})))
    warning = "AccessPolicy/wide: its rule (engine: allow) allows every request, even one without a token"
    assert wide.headers["Warning"] == f'299 - "{warning}"'
    assert wide.body["entry"][0]["response"]["outcome"] == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "warning", "code": "security", "diagnostics": warning}],
    }


async def test_a_batch_applies_each_entry_on_its_own(
    api: StartApi, idp: DevIdentityProvider, store_config: dict[str, Any]
) -> None:
    service = await api(config_with_api(store_config, introspectors=[jwks_introspector(idp)]))
    token = await minted(idp)
    batch = transaction(
        entry("PUT", "/AccessPolicy/public", PUBLIC),
        entry("PUT", "/AccessPolicy/broken", {"engine": "matcho", "matcho": {"uri": "#("}}),
        entry("DELETE", "/AccessPolicy/nope"),
        {"resource": {"resourceType": "User", "id": "u"}},
        entry("PUT", "/User/u", {"name": "U"}),
        entry("PUT", "/Role/r", {"name": "reader", "user": {"id": "nobody-yet"}}),
        kind="batch",
    )
    reply = await service.request("POST", "/", batch)
    assert reply.status == 200, reply.body
    assert reply.body["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in reply.body["entry"]]
    assert statuses == [
        "201 Created",
        "422 Unprocessable Entity",
        "404 Not Found",
        "422 Unprocessable Entity",
        "201 Created",
        "201 Created",
    ]
    outcomes = [e["response"].get("outcome") for e in reply.body["entry"]]
    assert outcomes[1]["issue"][0]["diagnostics"] == bad_regex_problem("broken")
    assert outcomes[2]["issue"][0]["diagnostics"] == "AccessPolicy/nope does not exist"
    assert outcomes[3]["issue"][0]["diagnostics"].startswith(
        "entry 3: request is missing (what to do with the entry): "
    )
    assert '"method": "PUT"' in outcomes[3]["issue"][0]["diagnostics"]  # the shape that works
    assert (await service.check("/public/x", token=token)).allowed
    assert (await service.request("GET", "/AccessPolicy/broken")).status == 404
    assert (await service.request("GET", "/User/u")).body["name"] == "U"
    # The entries are validated together (one validation): one may name what a later one creates.
    introspector = {"type": "jwt", "jwt": {"iss": "https://x", "secret": LONG_SECRET}}
    together = transaction(
        entry("PUT", "/AccessPolicy/scoped", {**PUBLIC, "introspectors": ["later"]}),
        entry("PUT", "/TokenIntrospector/later", introspector),
        entry("PUT", "/AccessPolicy/scoped", {**PUBLIC, "introspectors": ["later"]}),
        kind="batch",
    )
    statuses = [e["response"]["status"] for e in (await service.request("POST", "/", together)).body["entry"]]
    assert statuses == ["201 Created", "201 Created", "200 OK"]
    # A problem in no entry's resource (a delete leaves a stored policy naming what it deleted):
    # the entries are then validated one at a time, and only the delete is refused.
    breaking = transaction(entry("DELETE", "/TokenIntrospector/later"), entry("PUT", "/User/v", {}), kind="batch")
    answered = (await service.request("POST", "/", breaking)).body["entry"]
    assert [e["response"]["status"] for e in answered] == ["422 Unprocessable Entity", "201 Created"]
    assert answered[0]["response"]["outcome"]["issue"][0]["diagnostics"].startswith("policy 'scoped': ")
    assert (await service.request("GET", "/TokenIntrospector/later")).status == 200


async def test_a_dry_run_validates_everything_and_writes_nothing(
    api: StartApi, idp: DevIdentityProvider, store_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    service = await api(config_with_api(store_config, introspectors=[jwks_introspector(idp)]))
    token = await minted(idp)
    assert (
        await service.request("PUT", "/AccessPolicy/old", {"engine": "matcho", "matcho": {"uri": "#^/old"}})
    ).status == 201
    sync = service.service.sync
    assert sync is not None
    assert sync.store is not None
    store_before = (await sync.store.load()).resources
    caplog.set_level(logging.INFO, "authz_service")
    writes_before = writes_total((await service.request("GET", "/metrics", token=None)).body)
    tag = {"system": "urn:authz-service", "code": "dry-run", "display": "dry run: nothing was written"}

    put = await service.request("PUT", "/AccessPolicy/public?_dry_run=true", PUBLIC)
    assert (put.status, put.headers["Location"]) == (201, "/AccessPolicy/public")
    assert put.body == {"resourceType": "AccessPolicy", "id": "public", **PUBLIC, "meta": {"tag": [tag]}}
    post = await service.request("POST", "/User?_dry_run=true", {"name": "X"})
    assert post.status == 201
    deleted = await service.request("DELETE", "/AccessPolicy/old?_dry_run=true")
    assert deleted.status == 200
    bulk = await service.request("PUT", "/?_dry_run=true", [{"resourceType": "AccessPolicy", "id": "public", **PUBLIC}])
    assert bulk.diagnostics == ["dry run: nothing was written", "AccessPolicy/public: created"]
    bundle = await service.request(
        "POST",
        "/?_dry_run=true",
        transaction(entry("PUT", "/AccessPolicy/public", PUBLIC), entry("DELETE", "/AccessPolicy/old")),
    )
    assert bundle.body["meta"] == {"tag": [tag]}
    assert [e["response"]["status"] for e in bundle.body["entry"]] == ["201 Created", "204 No Content"]
    wide = await service.request("PUT", "/AccessPolicy/wide?_dry_run=true", "engine: allow\n")
    assert "allows every request" in wide.headers["Warning"]  # what the write would be warned about

    # Validated as the write would be: the effective config, the store's own rules, the file's ids.
    invalid = await service.request(
        "PUT", "/AccessPolicy/bad?_dry_run=true", {"engine": "matcho", "matcho": {"uri": "#("}}
    )
    assert (invalid.status, invalid.diagnostics) == (422, [bad_regex_problem("bad")])
    breaking = await service.request("DELETE", "/TokenIntrospector/nope?_dry_run=true")
    assert breaking.status == 404
    taken = await service.request("POST", "/AccessPolicy?_dry_run=true", {"id": "old", **PUBLIC})
    assert taken.status == 409
    bad_value = await service.request("PUT", "/AccessPolicy/x?_dry_run=yes", PUBLIC)
    assert (bad_value.status, bad_value.diagnostics) == (400, ["_dry_run must be given once, as true or false"])

    # Nothing changed: the store, the decisions, the audit, the counts.
    assert (await sync.store.load()).resources == store_before
    assert (await service.request("GET", "/AccessPolicy/public")).status == 404
    assert (await service.request("GET", "/AccessPolicy/old")).status == 200
    assert (await service.check("/public/x", token=token)).http_status == 403
    assert (await service.check("/old/x", token=token)).allowed
    assert not [r for r in caplog.records if r.getMessage() == "resource written"]
    assert not [r for r in caplog.records if "allows every request" in r.getMessage()]
    dry = [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "resource write dry run"]
    assert dry[0] == {
        "writer": "api-token",
        "request": "PUT /AccessPolicy/public",
        "dry_run": True,
        "would": ["AccessPolicy/public: create"],
    }
    assert writes_total((await service.request("GET", "/metrics", token=None)).body) == writes_before


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "diagnostics"),
    [
        ("PATCH", "/AccessPolicy/x", {}, 405, "PATCH is not supported: PUT the whole resource to /AccessPolicy/x"),
        (
            "POST",
            "/AccessPolicy/x",
            {},
            405,
            "POST /AccessPolicy/x is not supported: PUT /AccessPolicy/x creates or replaces it; "
            "POST /AccessPolicy creates one with a new id",
        ),
        (
            "DELETE",
            "/AccessPolicy",
            None,
            405,
            "DELETE /AccessPolicy is not supported: GET /AccessPolicy lists, POST /AccessPolicy creates; "
            "DELETE /AccessPolicy/<id> deletes one",
        ),
        (
            "GET",
            "/",
            None,
            405,
            "GET / is not supported: POST / takes a transaction or batch Bundle, PUT / a list of resources; "
            "GET /<Type> lists the resources of a type",
        ),
        (
            "GET",
            "/Patient",
            None,
            404,
            "there is no resource type 'Patient' here: TokenIntrospector, AccessPolicy, User, Role",
        ),
        (
            "POST",
            "/",
            {"resourceType": "Bundle", "type": "collection", "entry": []},
            422,
            "a Bundle of type 'collection' cannot be applied: use type transaction or batch",
        ),
        ("POST", "/", [{"resourceType": "User", "id": "u"}], 422, "POST / takes a Bundle: {"),
        (
            "POST",
            "/",
            transaction({"resource": {"resourceType": "User", "id": "u"}}),
            422,
            'entry 0: request is missing (what to do with the entry): {"request": {"method": "PUT", '
            '"url": "/<Type>/<id>"}',
        ),
        (
            "POST",
            "/",
            transaction(entry("PATCH", "/User/u", {})),
            422,
            "entry 0: PATCH is not supported: PUT the whole resource",
        ),
        (
            "POST",
            "/",
            transaction(entry("PUT", "/User", {})),
            422,
            "entry 0: PUT needs request.url /User/<id>; POST to /User creates one with a new id",
        ),
        (
            "POST",
            "/",
            transaction(entry("POST", "/User/u", {})),
            422,
            "entry 0: POST goes to /User (the id is the resource's own, or a new one); PUT /User/u writes at that id",
        ),
        (
            "POST",
            "/",
            transaction(entry("PUT", "/Patient/p", {})),
            422,
            "entry 0: request.url: there is no resource type 'Patient' here: "
            "TokenIntrospector, AccessPolicy, User, Role",
        ),
        (
            "POST",
            "/",
            transaction(entry("PUT", "/User?name=x", {})),
            422,
            "entry 0: request.url '/User?name=x' has a query: conditional writes are not supported; "
            "name the resource, /<Type>/<id>",
        ),
        (
            "POST",
            "/",
            transaction(entry("PUT", "/User/u")),
            422,
            "entry 0: resource is missing: PUT carries the resource",
        ),
    ],
)
async def test_every_refusal_names_what_works_instead(
    api: StartApi, method: str, path: str, body: Any, status: int, diagnostics: str
) -> None:
    service = await api()
    reply = await service.request(method, path, body)
    assert reply.status == status, reply.body
    assert reply.diagnostics[0].startswith(diagnostics), reply.diagnostics
    assert (await service.request("GET", "/User")).body["total"] == 0


async def test_a_conditional_create_is_refused_not_ignored(api: StartApi) -> None:
    service = await api()
    reply = await service.request("POST", "/User", {"name": "x"}, headers={"If-None-Exist": "name=x"})
    assert (reply.status, reply.diagnostics) == (
        400,
        [
            "If-None-Exist (a conditional create) is not supported: give the resource an id and POST it "
            "(409 when it exists), or PUT /User/<id>"
        ],
    )
    assert (await service.request("GET", "/User")).body["total"] == 0


async def test_bundles_cannot_write_the_config_files_resources(api: StartApi, tmp_path: Path) -> None:
    service = await api(file_store(tmp_path, introspectors=[FILE_INTROSPECTOR]))
    body = {"type": "jwt", "jwt": {"iss": "https://x", "secret": LONG_SECRET}}
    reply = await service.request("POST", "/", transaction(entry("PUT", "/TokenIntrospector/from-file", body)))
    assert reply.status == 409
    assert reply.diagnostics[0].startswith("entry 0: TokenIntrospector/from-file is defined in the config file ")
    batch = await service.request(
        "POST", "/", transaction(entry("PUT", "/TokenIntrospector/from-file", body), kind="batch")
    )
    assert batch.body["entry"][0]["response"]["status"] == "409 Conflict"


@pytest.mark.slow  # a Python subprocess per command
async def test_apply_dry_run_validates_against_the_running_service_and_writes_nothing(
    api: StartApi, idp: DevIdentityProvider, tmp_path: Path
) -> None:
    service = await api(file_store(tmp_path, introspectors=[jwks_introspector(idp)]))
    token = await minted(idp)
    good = tmp_path / "good.yaml"
    good.write_text("policies:\n  - {id: public, engine: matcho, matcho: {uri: '#^/public'}}\nusers:\n  - id: basic\n")
    code, out, err = await run_cli("apply", "--dry-run", "-f", str(good), "--url", service.url, "--token", API_TOKEN)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"dry run: {service.url} answered HTTP 200, nothing was written",
        "  AccessPolicy/public: created",
        "  User/basic: created",
    ]
    assert (await service.request("GET", "/AccessPolicy/public")).status == 404
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").glob("*.yaml"))
    assert (await service.check("/public/x", token=token)).http_status == 403
    # What the service would refuse, it refuses in a dry run too: with the config file's introspector.
    scoped = tmp_path / "scoped.yaml"
    scoped.write_text("- {resourceType: AccessPolicy, id: p, engine: allow, introspectors: [nope]}\n")
    code, out, err = await run_cli("apply", "--dry-run", "-f", str(scoped), "--url", service.url, "--token", API_TOKEN)
    assert (code, out) == (1, "")
    assert err.splitlines()[0] == f"rejected: {service.url} answered HTTP 422"
    assert "nope" in err
    # The same file, applied for real, then decides.
    code, out, _ = await run_cli("apply", "-f", str(good), "--url", service.url, "--token", API_TOKEN)
    assert code == 0
    assert out.splitlines()[0] == f"applied: {service.url} answered HTTP 200"
    assert (await service.check("/public/x", token=token)).allowed


APPLY_TRANSACTION = """\
resourceType: Bundle
type: transaction
entry:
  - request: {method: PUT, url: /AccessPolicy/public}
    resource: {engine: matcho, matcho: {uri: '#^/public'}}
  - request: {method: DELETE, url: /AccessPolicy/old}
"""


@pytest.mark.slow  # a Python subprocess per command
async def test_apply_sends_aidbox_bundles_as_they_are_to_post(
    api: StartApi, idp: DevIdentityProvider, tmp_path: Path
) -> None:
    service = await api(file_store(tmp_path, introspectors=[jwks_introspector(idp)]))
    token = await minted(idp)
    assert (
        await service.request("PUT", "/AccessPolicy/old", {"engine": "matcho", "matcho": {"uri": "#^/old"}})
    ).status == 201
    bundle = tmp_path / "transaction.yaml"
    bundle.write_text(APPLY_TRANSACTION)
    code, out, err = await run_cli("apply", "--dry-run", "-f", str(bundle), "--url", service.url, "--token", API_TOKEN)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"dry run: {service.url} answered HTTP 200, nothing was written",
        "  entry 0 AccessPolicy/public: 201 Created",
        "  entry 1: 204 No Content",
    ]
    assert (await service.check("/old/x", token=token)).allowed
    code, out, _ = await run_cli("apply", "-f", str(bundle), "--url", service.url, "--token", API_TOKEN)
    assert (code, out.splitlines()[0]) == (0, f"applied: {service.url} answered HTTP 200")
    assert (await service.check("/public/x", token=token)).allowed
    assert (await service.check("/old/x", token=token)).http_status == 403
    # A batch with an entry that cannot apply: the rest is applied, the command says so and exits 1.
    batch = tmp_path / "batch.yaml"
    batch.write_text(APPLY_TRANSACTION.replace("type: transaction", "type: batch"))
    code, out, err = await run_cli("apply", "-f", str(batch), "--url", service.url, "--token", API_TOKEN)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"applied: {service.url} answered HTTP 200; 1 of 2 entries not applied",
        "  entry 0 AccessPolicy/public: 200 OK",
        "  entry 1: 404 Not Found",
        "    error: AccessPolicy/old does not exist",
    ]
