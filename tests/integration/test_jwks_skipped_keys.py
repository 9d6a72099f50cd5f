"""Unusable keys in a published JWKS are skipped, and counted where an operator looks: /metrics."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from authz_service.devstack.idp import DevIdentityProvider
from tests.conftest import StartService, jwks_introspector


async def test_a_skipped_key_is_counted_by_introspector_and_reason(
    idp: DevIdentityProvider, start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = idp.jwks()
    published: dict[str, Any] = {"keys": [*good["keys"], {"kty": "RSA", "kid": "broken", "use": "sig"}]}
    monkeypatch.setattr(idp, "jwks", lambda: published)
    service = await start_service(
        {
            "server": {"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0"},
            "introspectors": [jwks_introspector(idp)],
        }
    )
    # The good keys still serve: one broken key does not take the key set down.
    assert (await service.check(token=idp.mint())).allowed
    assert service.service.admin is not None
    url = f"http://127.0.0.1:{service.service.admin.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    assert 'authz_jwks_skipped_keys_total{introspector="idp",reason="malformed"} 1.0' in text
