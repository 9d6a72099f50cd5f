"""Introspection client authentication (RFC 7662 2.1, RFC 6749 2.3.1) against the real dev IdP.

The IdP checks the credentials the way a conforming server does: `client_secret_basic` is
base64 of the form-urlencoded id and secret joined by ':', `client_secret_post` puts them in the
form body, one method per request. Credentials with ':' '+' ' ' '%' in them prove the encoding.
The IdP refusing our credentials is a 503 of its own (`introspection_client_auth`), logged naming
the introspector and never the secret, never cached, never counted as an outage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import StartService
from tests.harness import Harness

CLIENT_ID = "authz:svc+1 %41"
CLIENT_SECRET = "s3cr:et+with spaces%2F/and-ü"
WRONG_SECRET = "not-the:secret+%"


@pytest.fixture
async def strict_idp() -> AsyncIterator[DevIdentityProvider]:
    """A real IdP whose client credentials need every bit of RFC 6749 2.3.1's encoding."""
    provider = await asyncio.to_thread(DevIdentityProvider, None, "127.0.0.1", 0, CLIENT_ID, CLIENT_SECRET)
    async with provider:
        yield provider


def introspector(idp: DevIdentityProvider, method: str | None, secret: str = CLIENT_SECRET) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"url": idp.introspection_url, "client_id": CLIENT_ID, "client_secret": secret}
    if method is not None:
        endpoint["auth_method"] = method
    return {"id": "corp-idp", "type": "opaque", "introspection_endpoint": endpoint}


async def service_for(start_service: StartService, resource: dict[str, Any]) -> Harness:
    return await start_service({"introspectors": [resource]})


@pytest.mark.parametrize(
    ("method", "sent"),
    [
        (None, "client_secret_basic"),
        ("client_secret_basic", "client_secret_basic"),
        ("client_secret_post", "client_secret_post"),
    ],
)
async def test_each_method_authenticates_with_awkward_credentials(
    strict_idp: DevIdentityProvider, start_service: StartService, method: str | None, sent: str
) -> None:
    strict_idp.client_auth_methods = frozenset({sent})  # the IdP takes this method only
    service = await service_for(start_service, introspector(strict_idp, method))
    answer = await service.check(token=strict_idp.issue_opaque({"sub": "alice"}))
    assert answer.allowed, answer.response.status.message
    assert answer.headers["x-user-id"] == "alice"
    assert strict_idp.last_client_auth == sent
    assert strict_idp.hits["introspect_client_refused"] == 0


async def test_the_idp_refuses_a_method_it_does_not_take(
    strict_idp: DevIdentityProvider, start_service: StartService
) -> None:
    strict_idp.client_auth_methods = frozenset({"client_secret_post"})
    service = await service_for(start_service, introspector(strict_idp, "client_secret_basic"))
    assert (await service.check(token=strict_idp.issue_opaque())).http_status == 503
    assert strict_idp.hits["introspect_client_refused"] == 1


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_refused_credentials_are_a_503_logged_without_the_secret_and_not_an_outage(
    strict_idp: DevIdentityProvider, start_service: StartService, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    caplog.set_level(logging.INFO, logger="authz_service")
    service = await service_for(start_service, introspector(strict_idp, method, secret=WRONG_SECRET))
    token = strict_idp.issue_opaque()
    for expected in (1, 2):
        answer = await service.check(token=token)
        assert (answer.code, answer.http_status) == (14, 503)
        assert answer.body["error"] == "temporarily_unavailable"
        assert strict_idp.hits["introspect_client_refused"] == expected  # never cached
    calls = service.service.client.calls
    assert calls[("introspection", "client_auth_failed")] == 2
    assert not [outcome for (endpoint, outcome) in calls if outcome.startswith("http_")]
    lines = [r for r in caplog.records if r.getMessage() == "introspection client authentication failed"]
    assert len(lines) == 1  # once a minute, not once a request
    assert lines[0].levelno == logging.ERROR
    assert lines[0].fields["introspector"] == "corp-idp"  # type: ignore[attr-defined]
    everything = caplog.text + json.dumps([getattr(r, "fields", None) for r in caplog.records], default=str)
    for secret in (WRONG_SECRET, CLIENT_SECRET, token):
        assert secret not in everything
    # Fixing the credentials (a reload with the right secret) recovers at once.
    fixed = await service_for(start_service, introspector(strict_idp, method))
    assert (await fixed.check(token=token)).allowed


async def test_refused_credentials_are_decided_as_introspection_client_auth(
    strict_idp: DevIdentityProvider, start_service: StartService
) -> None:
    # Needs decide.py to answer UpstreamUnavailable with the error's own reason (see the lead's note).
    service = await service_for(start_service, introspector(strict_idp, None, secret=WRONG_SECRET))
    answer = await service.check(token=strict_idp.issue_opaque())
    assert answer.http_status == 503
    assert answer.response.status.message == "introspection_client_auth"
    assert answer.body["error_description"] == "identity provider unavailable"


async def test_a_hand_written_authorization_header_still_works(
    strict_idp: DevIdentityProvider, start_service: StartService
) -> None:
    resource = {
        "id": "legacy",
        "type": "opaque",
        "introspection_endpoint": {
            "url": strict_idp.introspection_url,
            "authorization": strict_idp.introspection_authorization,
        },
    }
    service = await service_for(start_service, resource)
    assert (await service.check(token=strict_idp.issue_opaque())).allowed
    assert strict_idp.last_client_auth == "client_secret_basic"


# --------------------------------------------------------------------------- the doc's snippets

DOC = Path(__file__).resolve().parents[2] / "docs" / "identity-providers.md"


def doc_snippets() -> dict[str, str]:
    """docs/identity-providers.md's YAML blocks marked `# introspection: NAME`."""
    found = {}
    for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S):
        match = re.match(r"# introspection: (\w+)\n", block)
        if match:
            found[match.group(1)] = block
    return found


def test_the_doc_has_its_introspection_snippets() -> None:
    assert sorted(doc_snippets()) == ["accepts_jwt", "client_secret_basic"]


@pytest.mark.parametrize("name", ["accepts_jwt", "client_secret_basic"])
async def test_each_doc_snippet_works_against_the_real_idp(
    strict_idp: DevIdentityProvider, start_service: StartService, name: str
) -> None:
    text = re.sub(r"https://[a-z0-9.-]+/oauth2(/v1)?/introspect", strict_idp.introspection_url, doc_snippets()[name])
    text = re.sub(r"\$\{\w+_CLIENT_ID\}", lambda _: json.dumps(CLIENT_ID), text)
    text = re.sub(r"\$\{\w+_CLIENT_SECRET\}", lambda _: json.dumps(CLIENT_SECRET), text)
    [resource] = yaml.safe_load(text)
    service = await service_for(start_service, resource)
    if name == "accepts_jwt":
        token = strict_idp.issue_opaque({"sub": "org-user"}, token=strict_idp.mint())
    else:
        token = strict_idp.issue_opaque({"sub": "org-user", "aud": "fhir-api"})
    answer = await service.check(token=token)
    assert answer.allowed, answer.response.status.message
    assert answer.headers["x-user-id"] == "org-user"
    assert strict_idp.last_client_auth == "client_secret_basic"
