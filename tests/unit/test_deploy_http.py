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
from authz_service.devstack.nginx import nginx_binary
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
# The proxy configs generated from examples/demo.yaml also carry its identity token's header.
DEMO_IDENTITY = IDENTITY | {"x-identity-token"}
HTTP_PORT = 9003


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def assert_paths_are_normalized_and_logged_without_query(hcm: dict[str, Any]) -> None:
    """The path policies judge is the one Envoy forwards; an encoded / or \\ is refused; the access
    log never shows a query (it may carry a token)."""
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    (log,) = hcm["access_log"]
    fields = log["typed_config"]["log_format"]["json_format"]
    assert fields["path"] == "%PATH(NQ)%"
    assert not any("PATH" in value and "NQ" not in value for value in fields.values())


def _ext_authz(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    filters = _hcm(config)["http_filters"]
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
    assert upstream == DEMO_IDENTITY
    client = {p["exact"] for p in response["allowed_client_headers"]["patterns"]}
    assert "www-authenticate" in client
    # A client's identity headers are removed before the check; the query token after it, before routing.
    assert names == [
        "strip_client_identity_headers",
        "envoy.filters.http.ext_authz",
        "strip_query_tokens",
        "envoy.filters.http.router",
    ]
    filters = {f["name"]: f["typed_config"] for f in _hcm(config)["http_filters"]}
    stripped = {m["remove"] for m in filters["strip_client_identity_headers"]["mutations"]["request_mutations"]}
    assert stripped == DEMO_IDENTITY
    query = filters["strip_query_tokens"]["mutations"]["query_parameter_mutations"]
    assert {"remove": "access_token"} in query
    hcm = _hcm(config)
    assert hcm["use_remote_address"] is True  # X-Forwarded-For's last entry is Envoy's own
    assert_paths_are_normalized_and_logged_without_query(hcm)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert clusters["authz_http"]["health_checks"][0]["http_health_check"]["path"] == "/readyz"
    port = clusters["authz_http"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert port["socket_address"]["port_value"] == HTTP_PORT


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    """As shipped, with only a prefix: its pid file and temporary files go there (docs/proxies.md)."""
    result = subprocess.run(
        [nginx_binary(), "-t", "-p", f"{tmp_path}/", "-c", str(NGINX)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert {"client_body_temp", "proxy_temp"} <= {p.name for p in tmp_path.iterdir()}


def test_nginx_config_writes_only_under_its_prefix() -> None:
    text = NGINX.read_text()
    assert re.search(r"^pid nginx\.pid;$", text, re.M)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert re.search(rf"^\s+{kind}_temp_path {kind}_temp;$", text, re.M), kind
    assert re.search(r"^error_log stderr\b", text, re.M)
    assert re.findall(r"^\s*access_log (\S+)", text, re.M) == ["access.log"]


def _location(text: str, name: str) -> str:
    match = re.search(rf"\n        location {re.escape(name)} \{{\n(.*?)\n        \}}\n", text, re.S)
    assert match, f"no location {name}"
    return match.group(1)


def test_nginx_config_overwrites_every_identity_header_and_asks_forward_auth() -> None:
    text = NGINX.read_text()
    main, authz = _location(text, "/"), _location(text, "= /_authz")
    set_headers = {m.lower() for m in re.findall(r"proxy_set_header\s+([\w-]+)\s+\$authz_", main)}
    assert set_headers == DEMO_IDENTITY
    # Not even the policies see a client's copy: cleared in the check request too.
    cleared = {m.lower() for m in re.findall(r'proxy_set_header\s+([\w-]+)\s+"";', authz)} - {
        "content-length",
        "connection",
    }
    assert cleared == DEMO_IDENTITY
    assert f"proxy_pass http://authz_service{FORWARD_AUTH};" in authz
    assert re.search(rf"upstream authz_service \{{\s*server 127\.0\.0\.1:{HTTP_PORT};", text)


def test_nginx_sets_every_original_request_header_forward_auth_reads() -> None:
    """From nginx's own variables, never the client's: both URI headers carry the normalized path."""
    authz = _location(NGINX.read_text(), "= /_authz")
    set_headers = dict(re.findall(r"proxy_set_header\s+([\w-]+)\s+(\S+);", authz))
    assert set_headers["X-Forwarded-Uri"] == set_headers["X-Original-URI"] == "$authz_request_uri"
    assert set_headers["X-Forwarded-Method"] == set_headers["X-Original-Method"] == "$request_method"
    assert set_headers["X-Forwarded-Host"] == set_headers["Host"] == "$host"
    assert set_headers["X-Forwarded-Proto"] == "$scheme"
    assert set_headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert set_headers["X-Request-ID"] == "$request_id"
    main = _location(NGINX.read_text(), "/")
    # $uri (normalized), taken before $args loses its tokens; the application gets that path.
    assert 'set $authz_request_uri "$uri$is_args$args";' in main
    assert main.index("set $authz_request_uri") < main.index("set $args")
    assert "proxy_pass http://application/;" in main
    assert "proxy_set_header X-Request-ID $request_id;" in main
    assert "$request_uri" not in main + authz  # the raw request target is never judged nor sent


def test_nginx_adds_no_second_challenge_to_a_401() -> None:
    """auth_request copies WWW-Authenticate onto a 401 itself."""
    assert "add_header" not in _location(NGINX.read_text(), "@authz_unauthorized")


def test_traefik_config_uses_forward_auth_with_every_identity_header() -> None:
    config = yaml.safe_load(TRAEFIK.read_text())
    middleware = config["http"]["middlewares"]["authz-service"]["forwardAuth"]
    assert middleware["address"] == f"http://127.0.0.1:{HTTP_PORT}{FORWARD_AUTH}"
    assert middleware["trustForwardHeader"] is False
    assert {h.lower() for h in middleware["authResponseHeaders"]} == DEMO_IDENTITY
    # First a headers middleware removes (empty value) the client's identity and X-Original-* headers.
    strip = config["http"]["middlewares"]["authz-strip-client-headers"]["headers"]["customRequestHeaders"]
    assert set(strip.values()) == {""}
    assert {h.lower() for h in strip} == DEMO_IDENTITY | {"x-original-uri", "x-original-method"}
    (router,) = config["http"]["routers"].values()
    assert router["middlewares"] == ["authz-strip-client-headers", "authz-service"]


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


def test_istio_normalizes_paths_like_the_shipped_envoy_configs() -> None:
    mesh = yaml.safe_load(MESH.read_text())["spec"]["meshConfig"]
    assert mesh["pathNormalization"] == {"normalization": "MERGE_SLASHES"}
    envoy_filter = yaml.safe_load((MESH.parent / "envoyfilter-escaped-slashes.yaml").read_text())
    assert envoy_filter["kind"] == "EnvoyFilter"
    (patch,) = envoy_filter["spec"]["configPatches"]
    assert (
        patch["match"]["listener"]["filterChain"]["filter"]["name"] == "envoy.filters.network.http_connection_manager"
    )
    hcm = patch["patch"]["value"]["typed_config"]
    assert hcm["path_with_escaped_slashes_action"] == _hcm(load_config(ENVOY_HTTP))["path_with_escaped_slashes_action"]
