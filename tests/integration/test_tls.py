"""TLS and mutual TLS on the gRPC listener, with a real gRPC client and certificates made here."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from authz_service.devstack.idp import DevIdentityProvider
from authz_service.errors import ConfigError
from authz_service.registries import parse_config
from tests.certs import Pki, make_pki
from tests.conftest import StartService, jwks_introspector
from tests.harness import Answer, AuthorizationClient, check_request


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def _credentials(pki: Pki, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


async def _check(port: int, credentials: grpc.ChannelCredentials | None, token: str) -> Answer:
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
    async with channel:
        return Answer.of(await AuthorizationClient(channel).Check(check_request(token=token), timeout=5))


async def test_tls_listener(idp: DevIdentityProvider, start_service: StartService, pki: Pki) -> None:
    service = await start_service(
        {
            "server": {
                "grpc_address": "127.0.0.1:0",
                "admin_address": None,
                "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
            },
            "introspectors": [jwks_introspector(idp)],
        }
    )
    port = service.service.port
    assert port is not None
    assert (await _check(port, _credentials(pki), idp.mint())).allowed
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _check(port, None, idp.mint())  # plaintext against a TLS port
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    idp: DevIdentityProvider, start_service: StartService, pki: Pki
) -> None:
    service = await start_service(
        {
            "server": {
                "grpc_address": "127.0.0.1:0",
                "admin_address": None,
                "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca)},
            },
            "introspectors": [jwks_introspector(idp)],
        }
    )
    port = service.service.port
    assert port is not None
    assert (await _check(port, _credentials(pki, pki.client_cert, pki.client_key), idp.mint())).allowed
    for credentials in (_credentials(pki), _credentials(pki, pki.rogue_cert, pki.rogue_key)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(port, credentials, idp.mint())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_config_problems_are_named(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    text = (
        f"server:\n  tls:\n    cert: {garbage}\n    key: {pki.server_cert}\n    client_ca: {tmp_path / 'missing.pem'}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, {})
    problems = [str(p) for p in err.value.problems]
    assert "server: tls.cert is not a PEM certificate" in problems
    assert "server: tls.key is not an unencrypted PEM private key" in problems
    assert any(p.startswith("server: tls.client_ca cannot be read") for p in problems)
    config = parse_config(f"server:\n  tls: {{cert: {pki.server_cert}, key: {pki.server_key}}}\n", {})
    assert config.server.tls is not None
    assert "PRIVATE" not in repr(config.server.tls)
