"""Through a real Envoy with the shipped envoy/envoy.yaml: what a client and the upstream see.

Most tests share one service and one Envoy (started once for the module: each start costs seconds);
the two that stop the service or read its whole log start their own.
"""

from __future__ import annotations

import base64
import json
import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import pytest_asyncio

from authz_service.devstack.echo import EchoUpstream
from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import free_port, new_idp, tail
from tests.e2e.conftest import (
    ENVOY_DRAIN_DELAY,
    AuthzProcess,
    EnvoyProcess,
    envoy_config,
    launch_envoy,
    run_authz,
    wait_until,
)
from tests.hostile_idp import HostileIdentityProvider

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# The tests on the shared stack run in the module's event loop, where its servers live.
on_shared_stack = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True)
class Shared:
    """The module's IdP, echo upstream, service and Envoy, and a client session for them."""

    idp: HostileIdentityProvider
    echo: EchoUpstream
    envoy: EnvoyProcess
    session: aiohttp.ClientSession
    authz_log: Path  # the service's stderr: its decision lines


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shared]:
    """One service behind one Envoy for the module (the `envoy` fixture's stack, started once)."""
    workdir = tmp_path_factory.mktemp("envoy-shared")
    async with (
        await new_idp() as idp,
        EchoUpstream() as echo,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        run_authz(idp, workdir) as authz,
    ):
        config = envoy_config(authz.port, echo.port, free_port(), free_port())
        async with launch_envoy(config, f"127.0.0.1:{authz.port}", session, workdir) as envoy:
            yield Shared(idp, echo, envoy, session, authz.log)


@pytest.fixture
def shared(shared_stack: Shared) -> Shared:
    """The shared stack, its echo's request log emptied for this test."""
    shared_stack.echo.requests.clear()
    return shared_stack


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def decode_claims(value: str) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))))


def forge(token: str, **claims: Any) -> str:
    """The token with its payload changed and the original signature kept."""
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body.update(claims)
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


@on_shared_stack
async def test_allowed_request_reaches_upstream_with_overwritten_identity_headers(shared: Shared) -> None:
    envoy, echo, idp, session = shared.envoy, shared.echo, shared.idp, shared.session
    token = idp.mint({"sub": "alice", "email": "alice@example.com"})
    # `curl -H 'Authorization: Bearer ...' -H 'x-user-id: admin' -H 'x-auth-claims: forged' .../things?a=1`
    headers = {**bearer(token), "x-user-id": "admin", "x-auth-claims": "forged"}
    async with session.get(envoy.url + "/things?a=1", headers=headers) as response:
        assert response.status == 200, await response.text()
        echoed = await response.json()
    assert echoed["path"] == "/things?a=1"
    assert len(echo.requests) == 1
    assert echo.headers_named("x-user-id") == ["alice"]
    (claims,) = echo.headers_named("x-auth-claims")
    assert decode_claims(claims)["sub"] == "alice"
    assert decode_claims(claims)["email"] == "alice@example.com"


@on_shared_stack
async def test_underscore_header_is_rejected_by_envoy(shared: Shared) -> None:
    envoy, echo, idp, session = shared.envoy, shared.echo, shared.idp, shared.session
    headers = {**bearer(idp.mint({"sub": "alice"})), "x_user_id": "admin"}
    async with session.get(envoy.url + "/things", headers=headers) as response:
        assert response.status == 400
    assert echo.requests == []


@pytest.mark.parametrize("credentials", ["none", "forged"])
@on_shared_stack
async def test_missing_or_forged_token_is_401_with_a_challenge(credentials: str, shared: Shared) -> None:
    envoy, echo, idp, session = shared.envoy, shared.echo, shared.idp, shared.session
    headers = bearer(forge(idp.mint({"sub": "alice"}), sub="admin")) if credentials == "forged" else {}
    async with session.get(envoy.url + "/things", headers=headers) as response:
        assert response.status == 401
        assert response.headers["www-authenticate"].startswith('Bearer realm="authz-service"')
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["error"] == ("invalid_token" if credentials == "forged" else "unauthorized")
    if credentials == "forged":
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert echo.requests == []


@on_shared_stack
async def test_opaque_token_is_allowed(shared: Shared) -> None:
    envoy, echo, idp, session = shared.envoy, shared.echo, shared.idp, shared.session
    token = idp.issue_opaque({"sub": "bob"})
    before = idp.hits["introspect"]
    async with session.get(envoy.url + "/things", headers=bearer(token)) as response:
        assert response.status == 200, await response.text()
    assert echo.headers_named("x-user-id") == ["bob"]
    assert idp.hits["introspect"] == before + 1


@on_shared_stack
async def test_idp_down_with_nothing_cached_is_503(shared: Shared) -> None:
    envoy, echo, idp, session = shared.envoy, shared.echo, shared.idp, shared.session
    await idp.go_offline()
    try:
        token = idp.issue_opaque({"sub": "bob"})
        async with session.get(envoy.url + "/things", headers=bearer(token)) as response:
            assert response.status == 503
            assert (await response.json())["error"] == "temporarily_unavailable"
    finally:
        await idp.go_online()  # the other tests share this IdP
    assert echo.requests == []


@on_shared_stack
async def test_access_log_shows_the_user_id_and_policy_from_dynamic_metadata(shared: Shared) -> None:
    envoy, idp, session = shared.envoy, shared.idp, shared.session
    async with session.get(envoy.url + "/logged", headers=bearer(idp.mint({"sub": "carol"}))) as response:
        assert response.status == 200
    async with session.get(envoy.url + "/denied") as response:
        assert response.status == 401

    def entries() -> dict[str, dict[str, Any]]:
        found = {entry["path"]: entry for entry in envoy.access_log_entries()}
        return found if {"/logged", "/denied"} <= set(found) else {}

    found = await wait_until(entries, 10, "the access log lines")
    allowed, denied = found["/logged"], found["/denied"]
    assert (allowed["status"], allowed["user_id"], allowed["introspector"]) == (200, "carol", "idp")
    assert allowed["policy"] == "signed-in"  # dynamic_metadata.policy: the policy that allowed
    assert denied["policy"] is None
    assert allowed["method"] == "GET"
    assert allowed["upstream"]
    assert (denied["status"], denied["user_id"]) == (401, None)
    assert "UAEX" in denied["flags"]  # unauthorized by the external authorization service


@on_shared_stack
async def test_one_request_is_joined_from_the_access_log_to_the_decision_line_and_its_trace(shared: Shared) -> None:
    """docs/operations.md, "Following one request": Envoy's request_id finds the decision line,
    which names the trace and the caller's span of the traceparent Envoy logged."""
    envoy, idp, session = shared.envoy, shared.idp, shared.session
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{span_id}-01"
    headers = {**bearer(idp.mint({"sub": "erin"})), "traceparent": traceparent}
    async with session.get(envoy.url + "/traced", headers=headers) as response:
        assert response.status == 200

    def entry() -> dict[str, Any] | None:
        return next((e for e in envoy.access_log_entries() if e["path"] == "/traced"), None)

    logged = await wait_until(entry, 10, "the access log line")
    assert logged["traceparent"] == traceparent
    request_id = logged["request_id"]
    assert request_id  # Envoy's UUID

    def decided() -> dict[str, Any] | None:
        for line in shared.authz_log.read_text().splitlines():
            if f'"request_id": "{request_id}"' in line:
                return cast(dict[str, Any], json.loads(line))
        return None

    line = await wait_until(decided, 10, "the decision line with Envoy's request id")
    assert (line["decision"], line["user_id"], line["protocol"]) == ("allow", "erin", "grpc")
    assert (line["trace_id"], line["span_id"]) == (trace_id, span_id)


@on_shared_stack
async def test_context_extensions_route_is_checked_and_allowed(shared: Shared) -> None:
    envoy, echo, idp, session = shared.envoy, shared.echo, shared.idp, shared.session
    async with session.get(envoy.url + "/admin/users") as response:
        assert response.status == 401  # the per-route config extends the check, never disables it
    async with session.get(envoy.url + "/admin/users", headers=bearer(idp.mint({"sub": "dave"}))) as response:
        assert response.status == 200, await response.text()
    assert echo.requests[-1]["path"] == "/admin/users"
    assert echo.headers_named("x-user-id") == ["dave"]


@pytest.mark.parametrize("authz", [ENVOY_DRAIN_DELAY], ids=["drain"], indirect=True)  # the one test that drains
async def test_envoy_health_checks_see_the_service_drain_on_sigterm(
    envoy: EnvoyProcess,
    authz: AuthzProcess,
    echo: EchoUpstream,
    idp: DevIdentityProvider,
    session: aiohttp.ClientSession,
) -> None:
    assert await envoy.authz_health_flags(session) == "healthy"
    token = idp.mint({"sub": "erin"})
    async with session.get(envoy.url + "/things", headers=bearer(token)) as response:
        assert response.status == 200

    authz.process.send_signal(signal.SIGTERM)

    async def failing() -> str:
        flags = await envoy.authz_health_flags(session)
        return flags if "/failed_active_hc" in flags else ""

    flags = await wait_until(failing, 8, "envoy to mark the authz host as failing health checks")
    assert "/failed_active_hc" in flags
    # Still running (draining): Envoy saw NOT_SERVING answers, not a refused connection.
    assert authz.process.returncode is None
    _, stats = await envoy.admin(session, "/stats?filter=cluster.authz.health_check")
    counters = dict(line.split(": ", 1) for line in stats.splitlines() if ": " in line)
    # Envoy marked the host unhealthy on NOT_SERVING answers (as observed: at the first one),
    # and no check failed for want of a connection.
    assert int(counters["cluster.authz.health_check.failure"]) >= 1, stats
    assert int(counters.get("cluster.authz.health_check.network_failure", "0")) == 0, stats
    # Fail closed: no healthy authz host means 503, never a pass-through.
    async with session.get(envoy.url + "/things", headers=bearer(token)) as response:
        assert response.status == 503
    assert len(echo.requests) == 1

    await wait_until(lambda: authz.process.returncode is not None, 15, "authz-service to exit")
    assert authz.process.returncode == 0, tail(authz.log)


async def test_a_full_run_never_logs_a_token_or_secret(
    envoy: EnvoyProcess, authz: AuthzProcess, idp: DevIdentityProvider, session: aiohttp.ClientSession
) -> None:
    """Every kind of request, then grep everything the service logged for every credential used."""
    jwt_token = idp.mint({"sub": "alice", "email": "alice@example.com", "secret_claim": "s3cr3t-claim-value"})
    opaque = idp.issue_opaque({"sub": "carol"})
    revoked = idp.issue_opaque()
    idp.revoke(revoked)
    forged = forge(jwt_token, sub="admin")
    expired = idp.mint({"exp": 1000})
    hmac_token = idp.mint(alg="HS256")  # an issuer key the service does not trust for HS256
    used = [jwt_token, opaque, revoked, forged, expired, hmac_token]
    requests = [
        ("/things", bearer(jwt_token)),
        ("/things?access_token=" + jwt_token, bearer(jwt_token)),
        ("/things", {**bearer(opaque), "x-request-id": opaque}),
        ("/things", bearer(revoked)),
        ("/things", bearer(forged)),
        ("/things", bearer(expired)),
        ("/things", bearer(hmac_token)),
        ("/things", {"Authorization": f"Bearer {jwt_token}, Bearer {opaque}"}),
        ("/things", {"Cookie": f"session={opaque}"}),
        ("/things", {}),
    ]
    for path, headers in requests:
        async with session.get(envoy.url + path, headers=headers) as response:
            await response.read()
    await idp.go_offline()
    async with session.get(envoy.url + "/things", headers=bearer(idp.issue_opaque())) as response:
        assert response.status == 503
    secrets = [
        idp.client_secret,
        idp.introspection_authorization,
        idp.introspection_authorization.split()[1],
        idp.hmac_secret,
        "s3cr3t-claim-value",
        "alice@example.com",
    ]

    def decisions() -> list[dict[str, Any]]:
        complete = authz.log.read_text().split("\n")[:-1]  # not a line still being written
        return [json.loads(line) for line in complete if '"decision"' in line and line.startswith("{")]

    # The log is not empty: one line per decision (written by the service's log thread, so waited for).
    await wait_until(lambda: len(decisions()) >= len(requests), 10, "one decision line per request")
    log = authz.log.read_text()
    for token in used:
        for part in (token, *token.split(".")[1:]):  # neither the token nor its payload or signature
            assert part not in log, f"a token part leaked into the log:\n{tail(authz.log)}"
    for secret in secrets:
        assert secret not in log, "a secret leaked into the log"


def test_shipped_envoy_configs_validate_with_the_real_binary() -> None:
    import subprocess
    from pathlib import Path

    from authz_service.devstack.envoy import envoy_binary

    shipped = Path(__file__).resolve().parents[2] / "envoy" / "envoy.yaml"
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(shipped)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration" in result.stdout
    assert "OK" in result.stdout


@on_shared_stack
async def test_a_query_token_is_removed_before_the_upstream(shared: Shared) -> None:
    envoy, idp, session = shared.envoy, shared.idp, shared.session
    token = idp.mint({"sub": "link-user"})
    async with session.get(envoy.url + f"/files/a.pdf?inline=1&access_token={token}") as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["headers"]["x-user-id"] == ["link-user"]
    assert token not in json.dumps(seen)
    assert seen["path"] == "/files/a.pdf?inline=1"
    # With a Bearer header too, the header's token decides and the parameter is still removed.
    other = idp.mint({"sub": "from-query"})
    headers = {"Authorization": f"Bearer {idp.mint({'sub': 'from-header'})}"}
    async with session.get(envoy.url + f"/files/b?access_token={other}", headers=headers) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["headers"]["x-user-id"] == ["from-header"]
    assert other not in json.dumps(seen)
