"""`authz-service proxy-config`: the shipped proxy configs are its output for examples/demo.yaml
(a golden test: edit the template in authz_service/proxyconfig.py, then regenerate), and another
config's identity headers and token parameters end up in every proxy's config."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from authz_service import proxyconfig
from authz_service.devstack.envoy import envoy_binary
from authz_service.devstack.nginx import nginx_binary
from authz_service.registries import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.yaml"
SHIPPED = {
    "nginx": ROOT / "deploy" / "nginx" / "nginx.conf",
    "envoy-http": ROOT / "envoy" / "envoy-http.yaml",
    "envoy-grpc": ROOT / "envoy" / "envoy.yaml",
    "traefik": ROOT / "deploy" / "traefik" / "dynamic.yaml",
}
REGENERATE = "authz-service proxy-config {kind} -c examples/demo.yaml > {path}"

OTHER = """\
server: {grpc_address: 127.0.0.1:9001}
authentication_only: true
response:
  user_id_header: x-subject
  claims_header: x-claims
  claim_headers: {role: x-user-role, tenant: x-tenant}
introspectors:
  - id: local
    type: jwt
    jwt: {iss: https://idp.example, secret: 0123456789abcdef0123456789abcdef}
    from_params: [ws_token, access_token]
"""


def test_every_proxy_has_a_shipped_file() -> None:
    assert set(SHIPPED) == set(proxyconfig.KINDS)


@pytest.mark.parametrize("kind", sorted(SHIPPED))
def test_the_shipped_file_is_the_generators_output_for_the_demo_config(kind: str) -> None:
    path = SHIPPED[kind]
    expected = proxyconfig.render(kind, load_config(DEMO))
    assert path.read_text() == expected, "regenerate: " + REGENERATE.format(kind=kind, path=path.relative_to(ROOT))


def test_the_command_prints_the_same(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "authz_service", "proxy-config", "nginx", "-c", str(DEMO)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == SHIPPED["nginx"].read_text()


def test_the_command_refuses_a_bad_config_and_an_unknown_proxy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("response: {user_id_header: authorization}\n")
    result = subprocess.run(
        [sys.executable, "-m", "authz_service", "proxy-config", "envoy-http", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "user_id_header" in result.stderr
    assert result.stdout == ""
    result = subprocess.run(
        [sys.executable, "-m", "authz_service", "proxy-config", "haproxy", "-c", str(DEMO)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def _other() -> proxyconfig.ProxyNeeds:
    return proxyconfig.ProxyNeeds.of(parse_config(OTHER))


def test_needs_come_from_the_validated_config() -> None:
    needs = _other()
    assert needs.identity_headers == ("x-subject", "x-claims", "x-user-role", "x-tenant")
    assert needs.user_id_header == "x-subject"
    # access_token always (RFC 6750's name), then every from_params once.
    assert needs.token_params == ("access_token", "ws_token")


def _http_filters(config: dict[str, object]) -> list[dict[str, object]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[index]
    filters: list[dict[str, object]] = hcm["http_filters"]
    return filters


@pytest.mark.parametrize("kind", ["envoy-http", "envoy-grpc"])
def test_envoy_strips_every_identity_header_before_the_check(kind: str, tmp_path: Path) -> None:
    text = proxyconfig.render(kind, parse_config(OTHER))
    config = yaml.safe_load(text)
    first = _http_filters(config)[0]
    removed = [m["remove"] for m in first["typed_config"]["mutations"]["request_mutations"]]  # type: ignore[index]
    assert removed == list(_other().identity_headers)
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_http_copies_the_identity_headers_and_removes_the_token_params() -> None:
    config = yaml.safe_load(proxyconfig.render("envoy-http", parse_config(OTHER)))
    filters = {f["name"]: f["typed_config"] for f in _http_filters(config)}
    response = filters["envoy.filters.http.ext_authz"]["http_service"]["authorization_response"]  # type: ignore[index]
    assert [p["exact"] for p in response["allowed_upstream_headers"]["patterns"]] == list(_other().identity_headers)
    assert response["dynamic_metadata_from_headers"]["patterns"] == [{"exact": "x-subject"}]
    query = filters["strip_query_tokens"]["mutations"]["query_parameter_mutations"]  # type: ignore[index]
    assert query == [{"remove": "access_token"}, {"remove": "ws_token"}]


def test_nginx_sets_clears_and_strips_for_the_config(tmp_path: Path) -> None:
    text = proxyconfig.render("nginx", parse_config(OTHER))
    for header, var in (("X-Subject", "x_subject"), ("X-User-Role", "x_user_role"), ("X-Tenant", "x_tenant")):
        assert f"auth_request_set $authz_{var} $upstream_http_{var};" in text
        assert f"proxy_set_header {header} $authz_{var};" in text  # to the application
        assert f'proxy_set_header {header} "";' in text  # to authz-service
    assert '"user_id": "$authz_x_subject"' in text
    # One map per token parameter, chained, the last feeding $args.
    assert re.findall(r"map (\$\S+) (\$\S+) \{", text) == [
        ("$args", "$authz_args_1"),
        ("$authz_args_1", "$authz_upstream_args"),
    ]
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    result = subprocess.run(
        [nginx_binary(), "-t", "-p", f"{tmp_path}/", "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_traefik_strips_then_copies_the_identity_headers() -> None:
    config = yaml.safe_load(proxyconfig.render("traefik", parse_config(OTHER)))
    middlewares = config["http"]["middlewares"]
    stripped = middlewares["authz-strip-client-headers"]["headers"]["customRequestHeaders"]
    assert stripped == {
        "X-Original-Uri": "",
        "X-Original-Method": "",
        "X-Subject": "",
        "X-Claims": "",
        "X-User-Role": "",
        "X-Tenant": "",
    }
    assert middlewares["authz-service"]["forwardAuth"]["authResponseHeaders"] == [
        "X-Subject",
        "X-Claims",
        "X-User-Role",
        "X-Tenant",
    ]
    assert config["http"]["routers"]["application"]["middlewares"] == ["authz-strip-client-headers", "authz-service"]


def test_an_unknown_proxy_and_a_template_mistake_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown proxy 'haproxy'"):
        proxyconfig.render("haproxy", parse_config(OTHER))
    with pytest.raises(ValueError, match="no marker"):
        proxyconfig._fill("a\n", {"X": ["b"]})
    with pytest.raises(ValueError, match="own line"):
        proxyconfig._fill("a @X@ c\n", {"X": ["b"]})
    assert proxyconfig._fill("  @X@\nv=@Y@\n", {"X": ["a", "", "b"], "Y": "1"}) == "  a\n\n  b\nv=1\n"


WITH_CERTIFICATE_HEADER = OTHER + "sender_constraints: {client_certificate_header: X-Client-Cert}\n"


def test_a_client_certificate_header_is_only_ever_the_proxys(tmp_path: Path) -> None:
    """Certificate-bound tokens (RFC 8705) are checked against the header the operator names: every
    shipped proxy strips a client's copy of it (nginx sets its own from the TLS connection)."""
    config = parse_config(WITH_CERTIFICATE_HEADER)
    for kind in ("envoy-http", "envoy-grpc"):
        text = proxyconfig.render(kind, config)
        first = _http_filters(yaml.safe_load(text))[0]
        removed = [m["remove"] for m in first["typed_config"]["mutations"]["request_mutations"]]  # type: ignore[index]
        assert removed == [*_other().identity_headers, "x-client-cert"], kind
        path = tmp_path / f"{kind}.yaml"
        path.write_text(text)
        result = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
    grpc_filters = {
        f["name"]: f["typed_config"] for f in _http_filters(yaml.safe_load(proxyconfig.render("envoy-grpc", config)))
    }
    assert grpc_filters["envoy.filters.http.ext_authz"]["include_peer_certificate"] is True  # type: ignore[index]
    # HTTP-mode Envoy passes every request header to the check: the `dpop` proof header included.
    http_filters = _http_filters(yaml.safe_load(proxyconfig.render("envoy-http", config)))
    ext_authz = {f["name"]: f["typed_config"] for f in http_filters}["envoy.filters.http.ext_authz"]
    patterns = ext_authz["allowed_headers"]["patterns"]  # type: ignore[index]
    assert any(re.fullmatch(p["safe_regex"]["regex"], "dpop") for p in patterns if "safe_regex" in p)
    nginx = proxyconfig.render("nginx", config)
    assert "proxy_set_header X-Client-Cert $ssl_client_escaped_cert;" in nginx
    path = tmp_path / "nginx.conf"
    path.write_text(nginx)
    result = subprocess.run(
        [nginx_binary(), "-t", "-p", f"{tmp_path}/", "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    traefik = yaml.safe_load(proxyconfig.render("traefik", config))
    assert (
        traefik["http"]["middlewares"]["authz-strip-client-headers"]["headers"]["customRequestHeaders"]["X-Client-Cert"]
        == ""
    )
    # Envoy's connection manager sanitizes x-forwarded-client-cert itself: not removed by a filter.
    xfcc = parse_config(OTHER + "sender_constraints: {client_certificate_header: x-forwarded-client-cert}\n")
    assert "remove: x-forwarded-client-cert" not in proxyconfig.render("envoy-grpc", xfcc)
