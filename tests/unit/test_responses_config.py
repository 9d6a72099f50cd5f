"""The `responses` block and `response.identity_token` in a whole config: validated at load with
the rest (check-config lists their problems by field, never a key's material), their header
among the identity headers every proxy strips, and the engine built from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from authz_service.denials import Responses
from authz_service.engine import build_engine
from authz_service.errors import ConfigError
from authz_service.identity_token import IdentityTokenConfig
from authz_service.registries import parse_config
from authz_service.tokens.cache import CacheFactory
from tests.unit.fakes import FakeIdpClient
from tests.unit.test_cli import assert_clean_failure, run_cli

PEM = ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
INTROSPECTOR = """\
introspectors:
  - id: local
    type: jwt
    jwt: {iss: https://idp.example, secret: 0123456789abcdef0123456789abcdef}
    from_params: [access_token]
authentication_only: true
"""
BAD = (
    INTROSPECTOR
    + """\
responses:
  unauthenticated:
    redirect: {url: "ftp://login/{url}"}
    headers: {x-who: "{user}"}
  forbidden:
    body: {content_type: text/html, file: /nonexistent/forbidden.html}
  teapot: {}
response:
  user_id_header: x-identity-token
  identity_token:
    issuer: http://authz.example.com
    audience: orders-api
    keys: [{kid: k1, alg: ES256, private_pem: "-----BEGIN PRIVATE KEY-----\\nc2VjcmV0\\n-----END PRIVATE KEY-----"}]
"""
)
BAD_PROBLEMS = [
    "responses: unauthenticated.redirect.url must be an http:// or https:// URL",
    "responses: unauthenticated.headers.x-who uses {user}, which is not one of",
    "responses: forbidden.body.file cannot be read",
    "responses: teapot is not a known field",
    "response: identity_token.issuer must be an https:// URL",
    "response: identity_token.keys[0].private_pem must be an unencrypted PEM private key",
]


def _good(header: str = "x-identity-token") -> str:
    indented = PEM.replace("\n", "\\n")
    return (
        INTROSPECTOR
        + f"""\
responses:
  unauthenticated:
    redirect: {{url: "https://login.example.com/?rd={{url}}"}}
response:
  identity_token:
    header: {header}
    issuer: https://authz.example.com
    audience: orders-api
    keys: [{{kid: k1, alg: ES256, private_pem: "{indented}"}}]
"""
    )


def test_every_problem_is_named_by_its_field() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(BAD)
    text = str(raised.value)
    for problem in BAD_PROBLEMS:
        assert problem in text, text
    assert "c2VjcmV0" not in text  # never the key's material


def test_check_config_lists_them(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    result = run_cli("check-config", str(path), cwd=tmp_path)
    assert_clean_failure(result)
    for problem in BAD_PROBLEMS:
        assert problem in result.stderr, result.stderr
    assert "c2VjcmV0" not in result.stderr


def test_the_identity_token_header_is_an_identity_header_and_may_not_clash() -> None:
    config = parse_config(_good())
    assert isinstance(config.responses, Responses)
    assert isinstance(config.response.identity_token, IdentityTokenConfig)
    assert config.response.identity_token_header == "x-identity-token"
    assert "x-identity-token" in config.response.identity_headers
    with pytest.raises(ConfigError, match="must all be different headers"):
        parse_config(_good(header="x-user-id"))


def test_an_empty_or_absent_block_keeps_the_precomputed_denials() -> None:
    assert parse_config(INTROSPECTOR).responses is None
    assert parse_config(INTROSPECTOR + "responses: {}\n").responses is None


def test_the_minter_and_its_cache_survive_a_reload_that_keeps_the_block() -> None:
    config = parse_config(_good())
    caches = CacheFactory(config.cache)
    first = build_engine(config, FakeIdpClient(), caches)
    assert first.minter is not None
    assert set(first.well_known) == {"/.well-known/jwks.json", "/.well-known/openid-configuration"}
    again = build_engine(parse_config(_good()), FakeIdpClient(), caches, previous=first)
    assert again.minter is first.minter
    other = build_engine(parse_config(INTROSPECTOR), FakeIdpClient(), caches, previous=again)
    assert other.minter is None
    assert other.well_known == {}
