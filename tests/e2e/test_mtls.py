"""The shipped mutual-TLS authz cluster (envoy/authz-cluster-mtls.yaml) with a real Envoy."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
import yaml

from authz_service.devstack.echo import EchoUpstream
from authz_service.devstack.idp import DevIdentityProvider
from tests.certs import make_pki
from tests.conftest import free_port, jwks_introspector, run_service
from tests.e2e.conftest import envoy_config, launch_envoy, stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MTLS_CLUSTER = Path(__file__).resolve().parents[2] / "envoy" / "authz-cluster-mtls.yaml"


async def test_envoy_reaches_the_service_over_mutual_tls(
    idp: DevIdentityProvider, echo: EchoUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    port = free_port()
    service_config = tmp_path / "authz.yaml"
    service_config.write_text(
        yaml.safe_dump(
            {
                "server": {
                    "grpc_address": f"127.0.0.1:{port}",
                    "admin_address": None,
                    "drain_delay": 0,
                    "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca)},
                },
                "introspectors": [jwks_introspector(idp)],
                "authentication_only": True,
            }
        )
    )
    process = await run_service(service_config, tmp_path / "authz.log")
    try:
        config = envoy_config(port, echo.port, free_port(), free_port())
        cluster = yaml.safe_load(MTLS_CLUSTER.read_text())
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
            "port_value"
        ] = port
        tls = cluster["transport_socket"]["typed_config"]
        tls["sni"] = "localhost"  # the test certificate names localhost and 127.0.0.1
        tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"] = (
            "localhost"
        )
        (certificate,) = tls["common_tls_context"]["tls_certificates"]
        certificate["certificate_chain"]["filename"] = str(pki.client_cert)
        certificate["private_key"]["filename"] = str(pki.client_key)
        tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] = str(pki.ca)
        clusters = config["static_resources"]["clusters"]
        clusters[:] = [c for c in clusters if c["name"] != "authz"] + [cluster]
        # Envoy only reports the cluster healthy after gRPC health checks succeeded over mTLS.
        async with launch_envoy(config, f"127.0.0.1:{port}", session, tmp_path) as envoy:
            async with session.get(
                envoy.url + "/things", headers={"Authorization": f"Bearer {idp.mint({'sub': 'tls'})}"}
            ) as response:
                assert response.status == 200
                body = await response.json()
            assert body["headers"]["x-user-id"] == ["tls"]
            async with session.get(envoy.url + "/things") as response:
                assert response.status == 401
    finally:
        assert await stop_process(process) == 0
