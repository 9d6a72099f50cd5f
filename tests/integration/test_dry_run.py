"""Dry-run AccessPolicies on a real service: through gRPC Check and HTTP mode the answer is the one
the service gives without them, the decision line says what they would have done, and
authz_policy_dry_run_total counts it; then the rollout itself: PUT as dry-run, watch, PUT as enforce."""

from __future__ import annotations

import json
import logging
import signal
from typing import Any

import aiohttp
import pytest

from authz_service.devstack.idp import DevIdentityProvider
from authz_service.logs import JsonFormatter
from tests.api_harness import ApiService
from tests.conftest import Spawn, StartApi, StartService, exit_code, free_port, jwks_introspector
from tests.harness import Harness
from tests.integration.test_workers import _check, _ready, _samples

PUBLIC = {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public/", "request-method": "get"}}
# The policy being rolled out: signed-in users may read reports.
REPORTS = {"id": "reports", "engine": "matcho", "matcho": {"uri": "#^/reports/", "jwt": {"sub": "present?"}}}
WATCHED = {**REPORTS, "mode": "dry-run"}


def decision_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The decision lines as the service writes them (JsonFormatter), parsed."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == "authz_service.decision"]


def dry_run_count(harness: Harness | ApiService, policy: str, would: str) -> float | None:
    registry = harness.service.metrics.registry
    return registry.get_sample_value("authz_policy_dry_run_total", {"policy": policy, "would": would})


async def answers(harness: Harness, token: str) -> list[tuple[int, dict[str, str]]]:
    """What a client gets for the same requests: status and identity headers."""
    got = []
    for path, sent in (("/reports/1", token), ("/public/x", None), ("/public/x", token), ("/reports/1", None)):
        answer = await harness.check(path, token=sent)
        got.append((answer.http_status, answer.headers))
    return got


async def test_grpc_the_answer_is_unchanged_and_the_line_and_metric_say_what_it_would_do(
    idp: DevIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authz_service.decision")
    token = idp.mint({"sub": "alice"})
    before = await start_service({"introspectors": [jwks_introspector(idp)], "policies": [PUBLIC]})
    watching = await start_service({"introspectors": [jwks_introspector(idp)], "policies": [PUBLIC, WATCHED]})
    expected = await answers(before, token)
    assert [status for status, _ in expected] == [403, 200, 200, 401]
    assert [line.get("dry_run") for line in decision_lines(caplog)] == [None] * 4  # no field without them
    caplog.clear()

    assert await answers(watching, token) == expected
    lines = decision_lines(caplog)
    assert [(line["decision"], line["policy"], line["dry_run"]) for line in lines] == [
        ("forbidden", None, [{"policy": "reports", "would": "allow"}]),
        ("allow", "public", [{"policy": "reports", "would": "deny"}]),
        ("allow", "public", [{"policy": "reports", "would": "deny"}]),
        ("unauthenticated", None, [{"policy": "reports", "would": "deny"}]),
    ]
    assert list(lines[0])[-1] == "dry_run"
    assert (dry_run_count(watching, "reports", "allow"), dry_run_count(watching, "reports", "deny")) == (1, 3)
    assert dry_run_count(watching, "public", "allow") is None  # an enforcing policy has no dry-run series
    # An invalid token never reaches the policies: nothing to count, no field.
    caplog.clear()
    assert (await watching.check("/reports/1", token=idp.mint({"exp": 1}))).http_status == 401
    [line] = decision_lines(caplog)
    assert "dry_run" not in line
    assert dry_run_count(watching, "reports", "deny") == 3


async def test_http_mode_the_answer_is_unchanged_and_the_line_and_metric_say_what_it_would_do(
    idp: DevIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authz_service.decision")
    token = idp.mint({"sub": "alice"})
    server = {"grpc_address": "127.0.0.1:0", "admin_address": None, "http_address": "127.0.0.1:0"}
    results = []
    for policies in ([PUBLIC], [PUBLIC, WATCHED]):
        config = {"server": server, "introspectors": [jwks_introspector(idp)], "policies": policies}
        harness = await start_service(config)
        assert harness.service.http is not None
        url = f"http://127.0.0.1:{harness.service.http.port}"
        got = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
            for path, auth in (("/ext_authz/reports/1", True), ("/ext_authz/public/x", False)):
                headers = {"Authorization": f"Bearer {token}"} if auth else {}
                async with client.get(url + path, headers=headers) as response:
                    got.append((response.status, response.headers.get("x-user-id")))
            forward = {"X-Forwarded-Uri": "/reports/2", "X-Forwarded-Method": "GET", "Authorization": f"Bearer {token}"}
            async with client.get(url + "/forward_auth", headers=forward) as response:
                got.append((response.status, response.headers.get("x-user-id")))
        results.append((got, harness))
    (plain, _), (watched, harness) = results
    assert plain == watched == [(403, None), (200, None), (403, None)]
    lines = [line for line in decision_lines(caplog) if "dry_run" in line]
    assert [(line["protocol"], line["decision"], line["dry_run"]) for line in lines] == [
        ("http", "forbidden", [{"policy": "reports", "would": "allow"}]),
        ("http", "allow", [{"policy": "reports", "would": "deny"}]),
        ("http", "forbidden", [{"policy": "reports", "would": "allow"}]),
    ]
    assert (dry_run_count(harness, "reports", "allow"), dry_run_count(harness, "reports", "deny")) == (2, 1)


async def test_authentication_only_with_a_dry_run_policy_allows_every_valid_token(
    idp: DevIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authz_service.decision")
    rule = {"jwt": {"roles": {"$contains": "admin"}}}
    admins = {"id": "admins", "mode": "dry-run", "engine": "matcho", "matcho": rule}
    harness = await start_service(
        {"authentication_only": True, "introspectors": [jwks_introspector(idp)], "policies": [admins]}
    )
    answer = await harness.check("/anything", token=idp.mint({"sub": "alice", "roles": ["reader"]}))
    assert (answer.allowed, answer.headers["x-user-id"], answer.metadata.get("policy")) == (True, "alice", None)
    assert (await harness.check("/anything")).http_status == 401
    assert [line["dry_run"] for line in decision_lines(caplog)] == [
        [{"policy": "admins", "would": "deny"}],
        [{"policy": "admins", "would": "deny"}],
    ]
    assert dry_run_count(harness, "admins", "deny") == 2


# --------------------------------------------------------------------------- the rollout, through the resource API


async def test_put_as_dry_run_watch_then_put_as_enforce(idp: DevIdentityProvider, start_api: StartApi) -> None:
    service = await start_api(introspectors=[jwks_introspector(idp)], policies=[PUBLIC])
    token = idp.mint({"sub": "alice"})
    registry = service.service.metrics.registry

    def allows(policy: str) -> float | None:
        return registry.get_sample_value("authz_policy_allows_total", {"policy": policy})

    # 1. PUT it as dry-run: stored with its mode, the answer unchanged.
    body = {"resourceType": "AccessPolicy", "engine": "matcho", "matcho": REPORTS["matcho"], "mode": "dry-run"}
    created = await service.request("PUT", "/AccessPolicy/reports", body)
    assert created.status == 201, created.body
    assert (await service.request("GET", "/AccessPolicy/reports")).body["mode"] == "dry-run"
    assert (await service.check("/reports/1", token=token)).http_status == 403
    assert (await service.check("/public/x", token=token)).allowed
    # 2. Watch the counts (what test-policy says about one request, too).
    assert (dry_run_count(service, "reports", "allow"), dry_run_count(service, "reports", "deny")) == (1, 1)
    identity = {"introspector": "idp", "claims": {"sub": "a"}}
    tested = await service.request(
        "POST", "/auth/test-policy", {"request": {"method": "GET", "path": "/reports/9"}, "identity": identity}
    )
    assert tested.status == 200, tested.body
    assert (tested.body["decision"], tested.body["dry_run"]) == ("forbidden", [{"policy": "reports", "would": "allow"}])
    shown = {p["id"]: p for p in tested.body["policies"]}
    assert shown["reports"] == {"id": "reports", "matched": True, "why": [], "mode": "dry-run"}
    assert "mode" not in shown["public"]
    # 3. PUT it as enforce: it decides now; its dry-run series are gone, its allows count.
    replaced = await service.request("PUT", "/AccessPolicy/reports", {**body, "mode": "enforce"})
    assert replaced.status == 200, replaced.body
    answer = await service.check("/reports/1", token=token)
    assert (answer.allowed, answer.headers["x-user-id"]) == (True, "alice")
    assert dry_run_count(service, "reports", "allow") is None
    assert allows("reports") == 1


async def test_a_bad_mode_through_the_api_names_the_resource_and_field(
    idp: DevIdentityProvider, start_api: StartApi
) -> None:
    service = await start_api(introspectors=[jwks_introspector(idp)], policies=[PUBLIC])
    refused = await service.request("PUT", "/AccessPolicy/reports", {"engine": "matcho", "matcho": {}, "mode": "watch"})
    assert refused.status == 422
    assert any("'reports'" in d and "mode" in d and "dry-run" in d for d in refused.diagnostics), refused.diagnostics


# --------------------------------------------------------------------------- a real process with workers


@pytest.mark.slow  # a supervisor and two worker processes
async def test_workers_count_dry_run_answers_in_their_files_and_write_them_in_their_lines(
    idp: DevIdentityProvider, spawn: Spawn
) -> None:
    # The service as deployed: decision lines through each worker's writer thread (the hand-built
    # line), counts through prometheus-client's multiprocess files, added up by the supervisor.
    admin = free_port()
    spawned = await spawn(
        {"introspectors": [jwks_introspector(idp)], "policies": [PUBLIC, WATCHED]},
        server={"workers": 2, "admin_address": f"127.0.0.1:{admin}"},
    )
    await _ready(admin)
    token = idp.mint({"sub": "alice"})
    for _ in range(3):
        assert (await _check(spawned.port, token, "/reports/1")).http_status == 403  # as without it
    assert (await _check(spawned.port, token, "/public/x")).allowed
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{admin}/metrics") as response:
        text = await response.text()
    assert _samples(text, "authz_policy_dry_run_total") == [
        ('{policy="reports",would="allow"}', 3.0),
        ('{policy="reports",would="deny"}', 1.0),
    ]
    spawned.process.send_signal(signal.SIGTERM)  # the writers flush before their processes exit
    assert await exit_code(spawned.process, 15) == 0
    lines = [json.loads(line) for line in spawned.log.read_text().splitlines() if '"msg": "decision"' in line]
    assert sorted((line["path"], line["decision"], json.dumps(line["dry_run"])) for line in lines) == [
        ("/public/x", "allow", '[{"policy": "reports", "would": "deny"}]'),
        *[("/reports/1", "forbidden", '[{"policy": "reports", "would": "allow"}]')] * 3,
    ]


async def test_a_dry_run_policy_that_would_allow_everything_is_not_warned_until_it_enforces(
    idp: DevIdentityProvider, start_api: StartApi
) -> None:
    service = await start_api(introspectors=[jwks_introspector(idp)], policies=[PUBLIC])
    watched = await service.request("PUT", "/AccessPolicy/wide", "engine: allow\nmode: dry-run\n")
    assert watched.status == 201, watched.body
    assert "Warning" not in watched.headers  # it lets nothing through
    assert (await service.check("/private")).http_status == 401
    enforced = await service.request("PUT", "/AccessPolicy/wide", "engine: allow\nmode: enforce\n")
    assert enforced.status == 200, enforced.body
    assert "allows every request, even one without a token" in enforced.headers["Warning"]
    assert (await service.check("/private")).allowed
    metrics = (await service.request("GET", "/metrics", token=None)).body
    assert 'authz_api_allow_everything_writes_total{writer="api-token"} 1.0' in metrics
