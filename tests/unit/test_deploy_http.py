"""The shipped HTTP-mode configs agree with the service: Envoy's http_service, nginx, Traefik, Istio.

Each is also run for real where it can be (Envoy and nginx in tests/e2e/test_proxies.py); here the
files are checked against the service's own constants, and validated by the real binaries.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from authz_service.config.model import ResponseConfig
from authz_service.devstack.envoy import envoy_binary, load_config
from authz_service.devstack.nginx import nginx_binary, on_loopback
from authz_service.server.http import EXT_AUTHZ_PREFIX, FORWARD_AUTH

ROOT = Path(__file__).resolve().parents[2]
ENVOY_HTTP = ROOT / "envoy" / "envoy-http.yaml"
NGINX = ROOT / "deploy" / "nginx" / "nginx.conf"
TRAEFIK = ROOT / "deploy" / "traefik" / "dynamic.yaml"
MESH = ROOT / "deploy" / "istio" / "meshconfig.yaml"
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "configmap.yaml"
SERVICE = ROOT / "deploy" / "kubernetes" / "service.yaml"
# The identity headers of the shipped examples: the defaults plus the email claim header.
IDENTITY = {*ResponseConfig().identity_headers, "x-user-email"}
HTTP_PORT = 9003


def _ext_authz(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    names = [f["name"] for f in filters]
    return filters[names.index("envoy.filters.http.ext_authz")]["typed_config"], names


def test_envoy_http_config_validates_with_the_real_binary() -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(ENVOY_HTTP)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_http_config_speaks_the_services_http_mode() -> None:
    config = load_config(ENVOY_HTTP)
    ext_authz, names = _ext_authz(config)
    service = ext_authz["http_service"]
    assert service["path_prefix"] == EXT_AUTHZ_PREFIX
    assert ext_authz["failure_mode_allow"] is False
    response = service["authorization_response"]
    upstream = {p["exact"] for p in response["allowed_upstream_headers"]["patterns"]}
    assert upstream == IDENTITY
    client = {p["exact"] for p in response["allowed_client_headers"]["patterns"]}
    assert "www-authenticate" in client
    # The query token is removed after the check and before routing.
    assert names == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.router",
    ]
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["use_remote_address"] is True  # X-Forwarded-For's last entry is Envoy's own
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert clusters["authz_http"]["health_checks"][0]["http_health_check"]["path"] == "/readyz"
    port = clusters["authz_http"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert port["socket_address"]["port_value"] == HTTP_PORT


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    config = on_loopback(NGINX.read_text(), listener=18080, upstreams={}, workdir=tmp_path)
    path = tmp_path / "nginx.conf"
    path.write_text(config)
    result = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(path), "-g", f"pid {tmp_path}/n.pid; error_log stderr;"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_nginx_config_overwrites_every_identity_header_and_asks_forward_auth() -> None:
    text = NGINX.read_text()
    set_headers = {m.lower() for m in re.findall(r"proxy_set_header\s+([\w-]+)\s+\$authz_", text)}
    assert set_headers == IDENTITY
    assert f"proxy_pass http://authz_service{FORWARD_AUTH};" in text
    for header in ("X-Original-URI $request_uri", "X-Original-Method $request_method"):
        assert f"proxy_set_header {header};" in text
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in text
    assert re.search(rf"upstream authz_service \{{\s*server 127\.0\.0\.1:{HTTP_PORT};", text)


def test_traefik_config_uses_forward_auth_with_every_identity_header() -> None:
    config = yaml.safe_load(TRAEFIK.read_text())
    middleware = config["http"]["middlewares"]["authz-service"]["forwardAuth"]
    assert middleware["address"] == f"http://127.0.0.1:{HTTP_PORT}{FORWARD_AUTH}"
    assert middleware["trustForwardHeader"] is False
    assert {h.lower() for h in middleware["authResponseHeaders"]} == IDENTITY
    (router,) = config["http"]["routers"].values()
    assert router["middlewares"] == ["authz-service"]


def test_istio_http_provider_points_at_the_services_http_port() -> None:
    mesh = yaml.safe_load(MESH.read_text())
    providers = {p["name"]: p for p in mesh["spec"]["meshConfig"]["extensionProviders"]}
    grpc, http = providers["authz-service"]["envoyExtAuthzGrpc"], providers["authz-service-http"]["envoyExtAuthzHttp"]
    assert http["service"] == grpc["service"]
    assert http["pathPrefix"] == EXT_AUTHZ_PREFIX
    assert http["failOpen"] is False
    assert http["statusOnError"] == "503"
    assert "authorization" in http["includeRequestHeadersInCheck"]
    assert set(http["headersToUpstreamOnAllow"]) == IDENTITY
    assert "www-authenticate" in http["headersToDownstreamOnDeny"]
    ports = {p["name"]: p["port"] for p in yaml.safe_load(SERVICE.read_text())["spec"]["ports"]}
    assert http["port"] == ports["http-authz"] == HTTP_PORT
    config = yaml.safe_load(yaml.safe_load(CONFIGMAP.read_text())["data"]["config.yaml"])
    assert config["server"]["http_address"].endswith(f":{HTTP_PORT}")
