"""Tests for the config loader: YAML in, frozen objects out, or every problem listed at once."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authz_service.config.model import CacheConfig, Config, JwtIntrospectorConfig, Listen, ResponseConfig, ServerConfig
from authz_service.errors import ConfigError, Problem
from authz_service.policy.evaluate import allows
from authz_service.registries import load_config, parse_config

LONG_SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"  # 64 bytes
OCT_KEY = {"kty": "OCT", "alg": "HS256", "k": LONG_SECRET}

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def p384_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def public_pem(private_key: PrivateKey) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(private_key: PrivateKey) -> str:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def dump(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False)


def jwt_introspector(ident: str = "a", iss: str = "https://idp.example.com", **extra: Any) -> dict[str, Any]:
    """A valid `type: jwt` introspector; `jwt` in extra replaces the whole jwt block."""
    raw: dict[str, Any] = {"id": ident, "type": "jwt", "jwt": {"iss": iss, "secret": LONG_SECRET}}
    raw.update(extra)
    return raw


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    """The problems a config text produces, as printed; fails the test if it is accepted."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env or {})
    problems = caught.value.problems
    assert problems, "a ConfigError must list at least one problem"
    assert all(isinstance(p, Problem) for p in problems)
    return [str(p) for p in problems]


def single_problem(text: str, env: dict[str, str] | None = None) -> str:
    problems = problems_of(text, env)
    assert len(problems) == 1, problems
    return problems[0]


def with_keys(*keys: object) -> str:
    """A config whose one jwt introspector, `k`, lists these static keys (anything, for the bad ones)."""
    return dump({"introspectors": [jwt_introspector("k", jwt={"iss": "https://k", "keys": list(keys)})]})


def jwt_introspectors(config: Config) -> list[JwtIntrospectorConfig]:
    """The config's introspectors, each of them asserted to be a jwt one."""
    found = [i for i in config.introspectors if isinstance(i, JwtIntrospectorConfig)]
    assert len(found) == len(config.introspectors), config.introspectors
    return found


# --------------------------------------------------------------------------- a full valid config


@pytest.fixture(scope="module")
def full_config_text(rsa_key: Any, p256_key: Any, p384_key: Any, ed_key: Any) -> str:
    def block(pem: str) -> str:
        return textwrap.indent(pem, " " * 14)

    return f"""\
server:
  grpc_address: 127.0.0.1:9100
  admin_address: null
  workers: 2
cache:
  backend: redis
  url: redis://127.0.0.1:6379/3
  max_entries: 500
response:
  user_id_header: X-Subject
  claims_header: x-claims
  claim_headers:
    email: X-User-Email
    role: x-user-role
introspectors:
  - id: hs
    resourceType: TokenIntrospector
    type: jwt
    cache_ttl: 60
    max_stale: 120
    timeout: 1.5
    cookie: ASPXAUTH
    jwt:
      iss: https://hs.example.com
      secret: {LONG_SECRET}
      aud: [api, web]
      leeway: 10
  - id: top-jwks
    type: jwt
    jwks_uri: https://idp.example.com/.well-known/jwks.json
    jwt:
      iss: https://idp.example.com
      aud: api
  - id: nested-jwks
    type: jwt
    jwt:
      iss: https://other.example.com
      jwks_uri: http://other.example.com/jwks
  - id: static
    type: jwt
    jwt:
      iss: https://static.example.com
      keys:
        - kty: RSA
          alg: RS256
          kid: r1
          format: PEM
          pub: |
{block(public_pem(rsa_key))}
        - kty: EC
          alg: ES256
          pub: |
{block(public_pem(p256_key))}
        - kty: EC
          alg: ES384
          kid: e384
          pub: |
{block(public_pem(p384_key))}
        - kty: OKP
          alg: EdDSA
          pub: |
{block(public_pem(ed_key))}
        - kty: OCT
          alg: HS512
          format: plain
          k: {LONG_SECRET}
users:
  - id: alice
    resourceType: User
    email: alice@example.com
    roles: [admin]
  - id: bob
"""


def test_full_config_parses_into_expected_objects(full_config_text: str) -> None:
    config = parse_config(full_config_text, {})

    assert config.server == ServerConfig(grpc_address="127.0.0.1:9100", admin_address=None, workers=2)
    assert config.cache == CacheConfig(backend="redis", url="redis://127.0.0.1:6379/3", max_entries=500)
    assert config.response == ResponseConfig(
        user_id_header="x-subject",
        claims_header="x-claims",
        claim_headers=(("email", "x-user-email"), ("role", "x-user-role")),
    )
    assert config.response.identity_headers == ("x-subject", "x-claims", "x-user-email", "x-user-role")
    assert [i.id for i in config.introspectors] == ["hs", "top-jwks", "nested-jwks", "static"]
    assert all(isinstance(i, JwtIntrospectorConfig) for i in config.introspectors)
    hs, top, nested, static = jwt_introspectors(config)

    assert hs == JwtIntrospectorConfig(
        id="hs",
        iss="https://hs.example.com",
        audiences=frozenset({"api", "web"}),
        leeway=10,
        cache_ttl=60,
        max_stale=120,
        timeout=1.5,
        cookie="ASPXAUTH",
        secret=LONG_SECRET.encode(),
        jwks_uri=None,
        keys=(),
    )
    assert top.jwks_uri == "https://idp.example.com/.well-known/jwks.json"
    assert top.audiences == frozenset({"api"})
    assert (top.secret, top.keys) == (None, ())
    assert nested.jwks_uri == "http://other.example.com/jwks"
    assert nested.audiences is None
    assert (nested.secret, nested.keys) == (None, ())

    assert static.secret is None
    assert static.jwks_uri is None
    assert [(k.kid, k.alg) for k in static.keys] == [
        ("r1", "RS256"),
        (None, "ES256"),
        ("e384", "ES384"),
        (None, "EdDSA"),
        (None, "HS512"),
    ]

    assert set(config.users) == {"alice", "bob"}
    assert config.users["alice"]["email"] == "alice@example.com"
    assert config.users["alice"]["roles"] == ["admin"]
    assert config.warnings == ()


def test_defaults_apply_where_fields_are_omitted(full_config_text: str) -> None:
    config = parse_config(full_config_text, {})
    for intro in config.introspectors[1:]:
        assert isinstance(intro, JwtIntrospectorConfig)
        assert intro.cache_ttl == 300
        assert intro.leeway == 30
        assert intro.timeout == 2.0
        assert intro.max_stale == 0
        assert intro.cookie is None


def test_an_empty_file_is_refused() -> None:
    for text in ("", "\n", "# only a comment\n"):
        with pytest.raises(ConfigError) as caught:
            parse_config(text, {})
        assert [str(p) for p in caught.value.problems] == ["config: is empty (no settings, no introspectors)"]


def test_empty_mapping_is_all_defaults() -> None:
    config = parse_config("{}", {})
    assert config == Config()
    assert config.server == ServerConfig("0.0.0.0:9001", "0.0.0.0:9002", 1)
    assert config.cache == CacheConfig("memory", None, 100_000)
    assert config.response == ResponseConfig("x-user-id", "x-auth-claims", ())
    assert config.introspectors == ()
    assert dict(config.users) == {}
    assert config.warnings == ()


def test_admin_address_defaults_on_and_null_turns_it_off() -> None:
    assert parse_config("server: {workers: 1}\n", {}).server.admin_address == "0.0.0.0:9002"
    assert parse_config("server: {admin_address: null}\n", {}).server.admin_address is None


def test_http_engine_defaults_to_granian_and_names_a_bad_one() -> None:
    assert ServerConfig().http_engine == "granian"  # installed with the service
    for engine in ("granian", "aiohttp"):
        assert parse_config(dump({"server": {"http_engine": engine}}), {}).server.http_engine == engine
    problem = single_problem(dump({"server": {"http_engine": "uvicorn"}}))
    assert problem == "server: http_engine must be one of granian, aiohttp, got 'uvicorn'"


def test_config_objects_are_frozen(full_config_text: str) -> None:
    config = parse_config(full_config_text, {})
    intro, _, _, static = jwt_introspectors(config)
    assignments = [
        (config, "server", ServerConfig()),
        (config, "introspectors", ()),
        (config.server, "grpc_address", "0.0.0.0:1"),
        (config.cache, "backend", "memory"),
        (config.response, "user_id_header", "x-evil"),
        (intro, "cache_ttl", 1),
        (intro, "iss", "https://evil"),
        (intro, "secret", b"x"),
        (static.keys[0], "kid", "other"),
    ]
    for obj, name, value in assignments:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)
    # Collections inside are immutable types too.
    assert isinstance(config.introspectors, tuple)
    assert isinstance(config.response.claim_headers, tuple)
    assert isinstance(intro.audiences, frozenset)
    assert isinstance(static.keys, tuple)
    assert isinstance(config.warnings, tuple)


def test_summary_is_one_line_with_counts(full_config_text: str) -> None:
    summary = parse_config(full_config_text, {}).summary()
    assert "\n" not in summary
    assert "4 introspector(s)" in summary
    assert "2 user(s)" in summary
    assert "hs (jwt)" in summary
    assert "static (jwt)" in summary
    assert "redis" in summary
    assert "127.0.0.1:9100" in summary


def test_load_config_reads_a_file(tmp_path: Path, full_config_text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(full_config_text, encoding="utf-8")
    assert load_config(path, {}) == parse_config(full_config_text, {})
    assert load_config(str(path), {}).server.grpc_address == "127.0.0.1:9100"


def test_load_config_missing_file_is_a_problem_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing, {})
    assert len(caught.value.problems) == 1
    assert str(missing) in str(caught.value.problems[0])
    assert "cannot read" in str(caught.value.problems[0])


def test_load_config_directory_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, {})
    assert str(tmp_path) in str(caught.value)


def test_load_config_non_utf8_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("server:\n  grpc_address: caf\u00e9:9001\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert str(path) in str(caught.value)


# --------------------------------------------------------------------------- ${VAR} expansion


def test_env_expansion_in_nested_strings() -> None:
    text = dump(
        {
            "server": {"grpc_address": "${HOST}:${PORT}"},
            "response": {"claim_headers": {"email": "${HDR}"}},
            "introspectors": [
                jwt_introspector(
                    "a",
                    jwks_uri="https://${IDP}/jwks",
                    jwt={"iss": "https://${IDP}/realms/${REALM}", "aud": ["${AUD}"]},
                )
            ],
            "users": [{"id": "${USER}", "meta": {"tags": ["x", "tag-${TAG}"]}}],
        }
    )
    env = {
        "HOST": "127.0.0.1",
        "PORT": "9555",
        "HDR": "x-mail",
        "IDP": "idp.test",
        "REALM": "main",
        "AUD": "api",
        "USER": "carol",
        "TAG": "blue",
    }
    config = parse_config(text, env)
    assert config.server.grpc_address == "127.0.0.1:9555"
    assert config.response.claim_headers == (("email", "x-mail"),)
    intro = config.introspectors[0]
    assert isinstance(intro, JwtIntrospectorConfig)
    assert intro.iss == "https://idp.test/realms/main"
    assert intro.jwks_uri == "https://idp.test/jwks"
    assert intro.audiences == frozenset({"api"})
    assert list(config.users) == ["carol"]
    assert config.users["carol"]["meta"]["tags"] == ["x", "tag-blue"]


def test_env_default_used_when_unset_and_env_wins_when_set() -> None:
    text = "server:\n  grpc_address: ${HOST:-127.0.0.1}:${PORT:-9001}\n"
    assert parse_config(text, {}).server.grpc_address == "127.0.0.1:9001"
    assert parse_config(text, {"PORT": "7000"}).server.grpc_address == "127.0.0.1:7000"
    assert parse_config(text, {"HOST": "::1", "PORT": "7001"}).server.grpc_address == "::1:7001"


def test_env_default_may_be_empty_or_contain_punctuation() -> None:
    secret = "${S:-a:b/c=d" + "x" * 40 + "}"
    text = dump({"introspectors": [jwt_introspector(jwt={"iss": "https://x${SUFFIX:-}", "secret": secret})]})
    intro = parse_config(text, {}).introspectors[0]
    assert isinstance(intro, JwtIntrospectorConfig)
    assert intro.iss == "https://x"
    assert intro.secret == ("a:b/c=d" + "x" * 40).encode()


def test_env_default_applies_when_variable_is_set_but_empty() -> None:
    # ${VAR:-default} is the shell's "unset or empty" form (POSIX, docker compose).
    text = "server:\n  grpc_address: 127.0.0.1:${PORT:-9001}\n"
    assert parse_config(text, {"PORT": ""}).server.grpc_address == "127.0.0.1:9001"


def test_env_values_are_not_expanded_again() -> None:
    secret = "${NOT_A_REF}" + "s" * 40
    text = dump({"introspectors": [jwt_introspector(jwt={"iss": "https://x", "secret": "${SECRET}"})]})
    intro = parse_config(text, {"SECRET": secret}).introspectors[0]
    assert isinstance(intro, JwtIntrospectorConfig)
    assert intro.secret == secret.encode()


def test_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHZ_TEST_GRPC_PORT", "9444")
    assert parse_config("server: {grpc_address: '127.0.0.1:${AUTHZ_TEST_GRPC_PORT}'}\n").server.grpc_address == (
        "127.0.0.1:9444"
    )


def test_load_config_expands_from_given_env(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  grpc_address: 127.0.0.1:${P}\n", encoding="utf-8")
    assert load_config(path, {"P": "9333"}).server.grpc_address == "127.0.0.1:9333"


def test_unset_variable_is_a_problem_naming_its_path() -> None:
    text = dump(
        {
            "server": {"grpc_address": "${HOST}:9001"},
            "introspectors": [jwt_introspector(jwt={"iss": "https://x", "secret": "${JWT_SECRET}"})],
            "users": [{"id": "u", "tags": ["${TAG}"]}],
        }
    )
    problems = problems_of(text, {})
    unset = [p for p in problems if "is not set" in p]
    assert len(unset) == 3, problems
    assert any("server.grpc_address" in p and "${HOST}" in p for p in unset)
    assert any("introspectors[0].jwt.secret" in p and "${JWT_SECRET}" in p for p in unset)
    assert any("users[0].tags[0]" in p and "${TAG}" in p for p in unset)


def test_non_string_values_are_untouched_by_expansion() -> None:
    config = parse_config("server: {workers: 3}\ncache: {max_entries: 42}\n", {"workers": "9"})
    assert config.server.workers == 3
    assert config.cache.max_entries == 42


# --------------------------------------------------------------------------- problems


def test_spec_example_cache_ttl_zero_exact_text() -> None:
    text = dump({"introspectors": [jwt_introspector("ext", cache_ttl=0)]})
    assert single_problem(text) == "introspector 'ext': cache_ttl must be between 1 and 86400, got 0"


def test_problem_carries_resource_and_field() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(dump({"introspectors": [jwt_introspector("ext", cache_ttl=0)]}), {})
    (problem,) = caught.value.problems
    assert problem.where == "introspector 'ext'"
    assert problem.field == "cache_ttl"
    assert "introspector 'ext': cache_ttl must be between 1 and 86400, got 0" in str(caught.value)


@pytest.mark.parametrize("ttl", [1, 300, 86400])
def test_cache_ttl_bounds_accepted(ttl: int) -> None:
    config = parse_config(dump({"introspectors": [jwt_introspector(cache_ttl=ttl)]}), {})
    assert config.introspectors[0].cache_ttl == ttl


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (86401, "cache_ttl must be between 1 and 86400, got 86401"),
        (-5, "cache_ttl must be between 1 and 86400, got -5"),
        (True, "cache_ttl must be an integer, got a boolean"),
        ("five minutes", "cache_ttl must be an integer, got a string"),
        (1.5, "cache_ttl must be an integer, got a number"),
    ],
)
def test_cache_ttl_rejected(value: Any, expected: str) -> None:
    text = dump({"introspectors": [jwt_introspector("ext", cache_ttl=value)]})
    assert single_problem(text) == f"introspector 'ext': {expected}"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("timeout", 0, "timeout must be more than 0 and at most 30, got 0"),
        ("timeout", 31, "timeout must be more than 0 and at most 30"),
        ("max_stale", -1, "max_stale must be between 0 and 86400, got -1"),
        ("cookie", "bad cookie;", "cookie must be a cookie name"),
        ("jwks_uri", "ftp://idp/jwks", "jwks_uri must be an http:// or https:// URL"),
    ],
)
def test_introspector_field_rejected(field: str, value: Any, fragment: str) -> None:
    raw = jwt_introspector("ext")
    if field == "jwks_uri":
        del raw["jwt"]["secret"]
    raw[field] = value
    problem = single_problem(dump({"introspectors": [raw]}))
    assert problem.startswith("introspector 'ext': ")
    assert fragment in problem


def test_leeway_out_of_range() -> None:
    raw = jwt_introspector("ext")
    raw["jwt"]["leeway"] = -1
    assert single_problem(dump({"introspectors": [raw]})) == (
        "introspector 'ext': jwt.leeway must be between 0 and 3600, got -1"
    )


def test_every_problem_is_listed_at_once() -> None:
    bad = jwt_introspector("ext", cache_ttl=0, timeout=-1, colour="red")
    bad["jwt"] = {"aud": []}  # no iss, no key source, empty aud
    text = dump(
        {
            "server": {"grpc_address": "nowhere", "workers": 0},
            "cache": {"backend": "redis"},
            "response": {"user_id_header": "authorization"},
            "introspectors": [
                bad,
                jwt_introspector("dup", iss="https://same"),
                jwt_introspector("dup", iss="https://same"),
            ],
            "users": [{"id": "u", "resourceType": "Patient"}],
            "extra": 1,
        }
    )
    problems = problems_of(text)
    expected = [
        "server: grpc_address must be HOST:PORT, got 'nowhere'",
        "server: workers must be between 1 and 64, got 0",
        "cache: url is required when backend is redis",
        "response: user_id_header must not be the reserved header 'authorization'",
        "introspector 'ext': cache_ttl must be between 1 and 86400, got 0",
        "introspector 'ext': timeout must be more than 0 and at most 30, got -1",
        "introspector 'ext': colour is not a known field",
        "introspector 'ext': jwt.iss is required",
        "introspector 'ext': jwt.aud must be a string or a non-empty list of strings",
        "introspector 'ext': jwt needs exactly one key source: "
        "jwt.secret, jwks_uri, jwt.keys or discovery: true (found none)",
        "introspector 'dup': id is used by more than one introspector",
        "introspector 'dup': jwt.iss is already claimed by introspector 'dup'",
        "user 'u': resourceType must be User, got 'Patient'",
        "config: extra is not a known field",
    ]
    for line in expected:
        assert line in problems, (line, problems)
    assert len(problems) == len(expected), problems
    assert len(set(problems)) == len(problems)


def test_no_key_source_is_a_problem() -> None:
    raw = jwt_introspector("ext", jwt={"iss": "https://x"})
    assert single_problem(dump({"introspectors": [raw]})) == (
        "introspector 'ext': jwt needs exactly one key source: "
        "jwt.secret, jwks_uri, jwt.keys or discovery: true (found none)"
    )


def test_empty_secret_and_empty_keys_do_not_count_as_key_sources() -> None:
    raw = jwt_introspector("ext", jwt={"iss": "https://x", "secret": "", "keys": []})
    problem = single_problem(dump({"introspectors": [raw]}))
    assert "exactly one key source" in problem
    assert "(found none)" in problem


@pytest.mark.parametrize(
    ("extra", "jwt_extra", "found"),
    [
        ({"jwks_uri": "https://idp/jwks"}, {"secret": LONG_SECRET}, "jwt.secret, jwks_uri"),
        ({}, {"secret": LONG_SECRET, "jwks_uri": "https://idp/jwks"}, "jwt.secret, jwks_uri"),
        ({}, {"secret": LONG_SECRET, "keys": [OCT_KEY]}, "jwt.secret, jwt.keys"),
        ({"jwks_uri": "https://idp/jwks"}, {"keys": [OCT_KEY]}, "jwks_uri, jwt.keys"),
    ],
)
def test_two_key_sources_are_a_problem(extra: dict[str, Any], jwt_extra: dict[str, Any], found: str) -> None:
    raw = jwt_introspector("ext", jwt={"iss": "https://x", **jwt_extra}, **extra)
    problem = single_problem(dump({"introspectors": [raw]}))
    assert problem.startswith("introspector 'ext': jwt needs exactly one key source")
    assert f"(found {found})" in problem


def test_jwks_uri_both_top_level_and_nested_is_a_problem() -> None:
    raw = jwt_introspector("ext", jwks_uri="https://a/jwks", jwt={"iss": "https://x", "jwks_uri": "https://b/jwks"})
    problem = single_problem(dump({"introspectors": [raw]}))
    assert problem.startswith("introspector 'ext': jwt.jwks_uri ")
    assert "both" in problem


def test_missing_iss_is_a_problem() -> None:
    raw = jwt_introspector("ext", jwt={"secret": LONG_SECRET})
    assert single_problem(dump({"introspectors": [raw]})) == "introspector 'ext': jwt.iss is required"


def test_iss_must_be_a_string() -> None:
    raw = jwt_introspector("ext", jwt={"iss": 42, "secret": LONG_SECRET})
    assert single_problem(dump({"introspectors": [raw]})) == (
        "introspector 'ext': jwt.iss must be a string, got an integer"
    )


def test_missing_jwt_block_is_a_problem() -> None:
    raw = {"id": "ext", "type": "jwt", "jwks_uri": "https://idp/jwks"}
    problem = single_problem(dump({"introspectors": [raw]}))
    assert problem.startswith("introspector 'ext': jwt is required")


def test_duplicate_introspector_ids() -> None:
    text = dump({"introspectors": [jwt_introspector("a", iss="https://1"), jwt_introspector("a", iss="https://2")]})
    assert single_problem(text) == "introspector 'a': id is used by more than one introspector"


def test_duplicate_iss_across_introspectors() -> None:
    text = dump(
        {
            "introspectors": [
                jwt_introspector("first", iss="https://same"),
                jwt_introspector("second", iss="https://same"),
                jwt_introspector("third", iss="https://different"),
            ]
        }
    )
    assert single_problem(text) == "introspector 'second': jwt.iss is already claimed by introspector 'first'"


def test_introspector_without_id() -> None:
    raw = jwt_introspector()
    del raw["id"]
    assert single_problem(dump({"introspectors": [raw]})) == (
        "introspectors[0]: id is required and must be a non-empty string"
    )


def test_introspector_that_is_not_a_mapping() -> None:
    assert single_problem("introspectors: [just-a-string]\n") == "introspectors[0]: must be a mapping"


def test_introspectors_must_be_a_list() -> None:
    problem = single_problem("introspectors: {id: a}\n")
    assert problem == "config: introspectors must be a list, got a mapping"


def test_unknown_introspector_type() -> None:
    raw = {"id": "ext", "type": "saml"}
    assert single_problem(dump({"introspectors": [raw]})) == (
        "introspector 'ext': type must be jwt, opaque or aspxauth, got 'saml'"
    )


def test_missing_introspector_type() -> None:
    raw = jwt_introspector("ext")
    del raw["type"]
    problems = problems_of(dump({"introspectors": [raw]}))
    assert "introspector 'ext': type is required" in problems


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("introspectors", "introspector 'a': resourceType must be TokenIntrospector, got 'AccessPolicy'"),
        ("users", "user 'a': resourceType must be User, got 'AccessPolicy'"),
    ],
)
def test_wrong_resource_type(section: str, expected: str) -> None:
    resource = jwt_introspector("a") if section == "introspectors" else {"id": "a"}
    resource["resourceType"] = "AccessPolicy"
    assert single_problem(dump({section: [resource]})) == expected


def test_right_resource_types_are_accepted() -> None:
    config = parse_config(
        dump(
            {
                "introspectors": [{**jwt_introspector("a"), "resourceType": "TokenIntrospector"}],
                "users": [{"id": "u", "resourceType": "User"}],
            }
        ),
        {},
    )
    assert config.introspectors[0].id == "a"
    assert "u" in config.users


def test_duplicate_user_ids_and_user_without_id() -> None:
    problems = problems_of(dump({"users": [{"id": "u"}, {"id": "u"}, {"name": "anonymous"}, "text"]}))
    assert problems == [
        "user 'u': id is used by more than one user",
        "users[2]: id is required and must be a non-empty string",
        "users[3]: id is required and must be a non-empty string",
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"colour": 1}, "config: colour is not a known field"),
        ({"server": {"port": 1}}, "server: port is not a known field"),
        ({"cache": {"ttl": 1}}, "cache: ttl is not a known field"),
        ({"response": {"user_header": "x-u"}}, "response: user_header is not a known field"),
        ({"introspectors": [jwt_introspector("a", colour=1)]}, "introspector 'a': colour is not a known field"),
        (
            {"introspectors": [jwt_introspector("a", jwt={"iss": "https://x", "secret": LONG_SECRET, "issuer": "y"})]},
            "introspector 'a': jwt.issuer is not a known field",
        ),
        (
            {
                "introspectors": [
                    jwt_introspector(
                        "a",
                        jwt={
                            "iss": "https://x",
                            "keys": [{"kty": "OCT", "alg": "HS256", "k": LONG_SECRET, "colour": "red"}],
                        },
                    )
                ]
            },
            "introspector 'a': jwt.keys[0].colour is not a known key field",
        ),
    ],
)
def test_unknown_fields(raw: dict[str, Any], expected: str) -> None:
    assert single_problem(dump(raw)) == expected


@pytest.mark.parametrize("name", ["x user", "x_user", ":authority", "x-user:", "-x", "x\u00e9", "x" * 129, ""])
def test_bad_header_names(name: str) -> None:
    problems = problems_of(dump({"response": {"user_id_header": name}}))
    assert problems == [f"response: user_id_header must be an HTTP header name (letters, digits, '-'), got {name!r}"]


def test_bad_claim_header_name() -> None:
    problem = single_problem(dump({"response": {"claim_headers": {"email": "x email"}}}))
    assert problem == "response: claim_headers.email must be an HTTP header name (letters, digits, '-'), got 'x email'"


def test_claim_headers_must_map_names_to_names() -> None:
    problem = single_problem("response:\n  claim_headers: {email: [x-a, x-b]}\n")
    assert problem.startswith("response: claim_headers.email ")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user_id_header", "authorization"),
        ("user_id_header", "Authorization"),
        ("claims_header", "host"),
        ("claims_header", "Cookie"),
        ("claim_headers", {"email": "HOST"}),
        ("claim_headers", {"email": "content-length"}),
    ],
)
def test_reserved_header_names(field: str, value: Any) -> None:
    problem = single_problem(dump({"response": {field: value}}))
    name = value if isinstance(value, str) else value["email"]
    field_name = field if isinstance(value, str) else "claim_headers.email"
    assert problem == f"response: {field_name} must not be the reserved header {name.lower()!r}"


@pytest.mark.parametrize(
    "response",
    [
        {"claims_header": "x-user-id"},
        {"user_id_header": "X-Auth-Claims"},
        {"claim_headers": {"email": "x-user-id"}},
        {"claim_headers": {"email": "x-mail", "mail": "X-Mail"}},
    ],
)
def test_duplicate_identity_header_names(response: dict[str, Any]) -> None:
    problem = single_problem(dump({"response": response}))
    assert problem.startswith("response: ")
    assert "must all be different" in problem


@pytest.mark.parametrize("address", ["localhost", ":9001", "host:99999", "host:port", "host:", "", "host:-1"])
def test_bad_grpc_address(address: str) -> None:
    assert single_problem(dump({"server": {"grpc_address": address}})) == (
        f"server: grpc_address must be HOST:PORT, got {address!r}"
    )


def test_bad_admin_address_and_non_string_address() -> None:
    problems = problems_of(dump({"server": {"admin_address": "admin", "grpc_address": 9001}}))
    assert "server: admin_address must be HOST:PORT, got 'admin'" in problems
    assert "server: grpc_address must be a string, got an integer" in problems
    assert len(problems) == 2


@pytest.mark.parametrize("address", ["0.0.0.0:9001", "127.0.0.1:0", "[::]:9001", "[::1]:65535", "localhost:80"])
def test_good_addresses(address: str) -> None:
    config = parse_config(dump({"server": {"grpc_address": address, "admin_address": address}}), {})
    assert config.server.grpc_address == address
    assert config.server.admin_address == address
    host, _, port = address.rpartition(":")
    assert config.server.grpc_listen == config.server.admin_listen == Listen(host.strip("[]"), int(port))


def test_addresses_are_parsed_once_into_host_and_port() -> None:
    text = dump({"server": {"grpc_address": "[::1]:9100", "admin_address": None, "http_address": "127.0.0.1:0"}})
    server = parse_config(text, {}).server
    assert (server.grpc_listen, server.admin_listen, server.http_listen) == (
        Listen("::1", 9100),
        None,
        Listen("127.0.0.1", 0),
    )
    assert (ServerConfig().grpc_listen, ServerConfig().admin_listen) == (
        Listen("0.0.0.0", 9001),
        Listen("0.0.0.0", 9002),
    )
    with pytest.raises(ValueError, match="HOST:PORT"):
        ServerConfig(grpc_address="nowhere")  # a model built in code is held to the same rule


@pytest.mark.parametrize("kind", ["jwt", "opaque", "aspxauth"])
def test_every_introspector_kind_can_be_optional(kind: str) -> None:
    opaque = {"id": "a", "type": kind, "introspection_endpoint": {"url": "https://idp.example.com/introspect"}}
    raw = jwt_introspector() if kind == "jwt" else opaque
    [default] = parse_config(dump({"introspectors": [raw]}), {}).introspectors
    [optional] = parse_config(dump({"introspectors": [{**raw, "optional": True}]}), {}).introspectors
    assert (default.optional, optional.optional) == (False, True)
    assert single_problem(dump({"introspectors": [{**raw, "optional": "yes"}]})) == (
        "introspector 'a': optional must be true or false, got a string"
    )


def test_redis_backend_without_url() -> None:
    assert single_problem(dump({"cache": {"backend": "redis"}})) == "cache: url is required when backend is redis"


@pytest.mark.parametrize(
    ("cache", "expected"),
    [
        ({"backend": "redis", "url": "http://127.0.0.1:6379"}, "cache: url must be a redis:// or rediss:// URL"),
        ({"backend": "memcached"}, "cache: backend must be memory or redis, got 'memcached'"),
        ({"max_entries": 0}, "cache: max_entries must be between 1 and 10000000, got 0"),
    ],
)
def test_bad_cache_section(cache: dict[str, Any], expected: str) -> None:
    assert single_problem(dump({"cache": cache})) == expected


def test_rediss_url_accepted() -> None:
    config = parse_config(dump({"cache": {"backend": "redis", "url": "rediss://cache:6380/0"}}), {})
    assert config.cache == CacheConfig("redis", "rediss://cache:6380/0", 100_000)


@pytest.mark.parametrize("aud", [[], [""], ["api", 3]])
def test_bad_aud(aud: list[Any]) -> None:
    raw = jwt_introspector("ext", jwt={"iss": "https://x", "secret": LONG_SECRET, "aud": aud})
    assert single_problem(dump({"introspectors": [raw]})) == (
        "introspector 'ext': jwt.aud must be a string or a non-empty list of strings"
    )


def test_aud_of_wrong_type() -> None:
    raw = jwt_introspector("ext", jwt={"iss": "https://x", "secret": LONG_SECRET, "aud": {"a": 1}})
    assert single_problem(dump({"introspectors": [raw]})) == (
        "introspector 'ext': jwt.aud must be a string or a list, got a mapping"
    )


# --------------------------------------------------------------------------- static keys in config


def test_bad_static_keys_each_reported_with_field(rsa_key: Any, p256_key: Any, p384_key: Any, ed_key: Any) -> None:
    text = with_keys(
        {"kty": "RSA", "alg": "ES256", "pub": public_pem(rsa_key)},  # alg not matching kty
        {"kty": "RSA", "alg": "RS256", "pub": private_pem(rsa_key)},  # private key in pub
        {"kty": "RSA", "alg": "RS256", "pub": "-----BEGIN PUBLIC KEY-----\nZ2FyYmFnZQ==\n-----END PUBLIC KEY-----\n"},
        {"kty": "EC", "alg": "ES384", "pub": public_pem(p256_key)},  # P-256 key, ES384
        {"kty": "OCT", "alg": "HS256", "k": public_pem(rsa_key)},  # PEM as HMAC secret
        {"kty": "EC", "alg": "ES256", "pub": public_pem(rsa_key)},  # RSA key as EC
        {"kty": "OKP", "alg": "EdDSA", "pub": public_pem(p384_key)},  # EC key as OKP
        {"kty": "OCT", "alg": "RS256", "k": LONG_SECRET},  # alg not matching kty
        {"kty": "DSA", "alg": "RS256", "pub": public_pem(rsa_key)},  # unknown kty
        {"kty": "RSA", "alg": "RS256"},  # no pub
        {"kty": "RSA", "alg": "RS256", "pub": public_pem(rsa_key), "format": "plain"},  # wrong format
        {"kty": "OCT", "alg": "HS256"},  # no k
        {"kty": "OKP", "alg": "EdDSA", "pub": private_pem(ed_key)},  # private key in pub
        "not-a-mapping",
    )
    problems = problems_of(text)
    prefix = "introspector 'k': jwt.keys"
    fields = [p.split(" ", 3)[2] for p in problems]
    assert fields == [
        "jwt.keys[0].alg",
        "jwt.keys[1].pub",
        "jwt.keys[2].pub",
        "jwt.keys[3].pub",
        "jwt.keys[4].k",
        "jwt.keys[5].pub",
        "jwt.keys[6].pub",
        "jwt.keys[7].alg",
        "jwt.keys[8].kty",
        "jwt.keys[9].pub",
        "jwt.keys[10].format",
        "jwt.keys[11].k",
        "jwt.keys[12].pub",
        "jwt.keys[13]",
    ], problems
    assert all(p.startswith(prefix) for p in problems)
    assert "private key" in problems[1]
    assert "private key" in problems[12]
    assert "ES384" in problems[3]
    assert "asymmetric" in problems[4]


def test_static_key_with_non_string_extra_fields_is_a_problem_not_a_crash() -> None:
    # YAML allows non-string keys; two unknown fields of mixed types must still be a ConfigError.
    text = textwrap.dedent(f"""\
        introspectors:
          - id: k
            type: jwt
            jwt:
              iss: https://k
              keys:
                - {{kty: OCT, alg: HS256, k: {LONG_SECRET}, 1: one, colour: red}}
        """)
    problems = problems_of(text)
    assert problems
    assert all(p.startswith("introspector 'k': jwt.keys[0].") for p in problems)


def test_valid_static_keys_are_accepted_in_any_case_of_kty(rsa_key: Any) -> None:
    config = parse_config(
        with_keys(
            {"kty": "rsa", "alg": "PS256", "pub": public_pem(rsa_key), "kid": "x"},
            {"kty": "oct", "alg": "HS384", "k": LONG_SECRET},
        ),
        {},
    )
    keys = jwt_introspectors(config)[0].keys
    assert [(k.kty, k.alg) for k in keys] == [("RSA", "PS256"), ("OCT", "HS384")]


# --------------------------------------------------------------------------- top level, YAML, policies


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level(text: str) -> None:
    assert single_problem(text) == "config: must be a mapping at the top level"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("server:\n  grpc_address: 127.0.0.1:9001\n  workers: [1\ncache: {}\n", 4),
        ("server:\n\tworkers: 1\n", 2),
        ("a: 1\nb: 2\nc: 3\nd: 'unterminated\n", 5),
    ],
)
def test_invalid_yaml_reports_a_line_number(text: str, line: int) -> None:
    problem = single_problem(text)
    assert problem.startswith("config: is not valid YAML")
    assert f"line {line}" in problem


def test_recursive_yaml_alias_is_a_problem_not_a_crash() -> None:
    problems = problems_of("users: &loop [*loop]\n")
    assert problems


def test_sections_of_the_wrong_type() -> None:
    problems = problems_of("server: [1]\ncache: memory\nresponse: 3\nusers: {}\n")
    assert problems == [
        "config: server must be a mapping, got a list",
        "config: cache must be a mapping, got a string",
        "config: response must be a mapping, got an integer",
        "config: users must be a list, got a mapping",
    ]


def test_policies_are_compiled_into_the_config() -> None:
    text = dump(
        {
            "introspectors": [jwt_introspector()],
            "policies": [{"id": "p", "engine": "matcho", "matcho": {"uri": "/public"}, "introspectors": ["a"]}],
        }
    )
    (policy,) = parse_config(text, {}).policies
    assert (policy.id, policy.engine, policy.introspectors) == ("p", "matcho", frozenset({"a"}))
    assert allows(policy, {"uri": "/public"}, "a")
    assert not allows(policy, {"uri": "/other"}, "a")
    assert not allows(policy, {"uri": "/public"}, None)


def test_policies_of_the_wrong_type_are_named() -> None:
    assert "policies" in single_problem("policies: {id: p}\n")


# --------------------------------------------------------------------------- warnings


def test_short_hmac_secret_is_accepted_with_a_warning() -> None:
    raw = jwt_introspector("shorty", jwt={"iss": "https://x", "secret": "s" * 31})
    config = parse_config(dump({"introspectors": [raw, jwt_introspector("long", iss="https://y")]}), {})
    intro = config.introspectors[0]
    assert isinstance(intro, JwtIntrospectorConfig)
    assert intro.secret == b"s" * 31
    assert len(config.warnings) == 1
    assert "'shorty'" in config.warnings[0]
    assert "jwt.secret" in config.warnings[0]
    assert "32" in config.warnings[0]


@pytest.mark.parametrize(
    ("workers", "backend", "warned"), [(2, "memory", True), (1, "memory", False), (2, "redis", False)]
)
def test_workers_with_a_memory_cache_warn_that_dpop_replays_cross_workers(
    workers: int, backend: str, warned: bool
) -> None:
    cache: dict[str, object] = {"backend": backend}
    if backend == "redis":
        cache["url"] = "redis://127.0.0.1:6379/0"
    raw = {"server": {"workers": workers}, "cache": cache, "introspectors": [jwt_introspector("long", iss="https://y")]}
    warnings = [w for w in parse_config(dump(raw), {}).warnings if "DPoP replay cache" in w]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert "cache.backend: redis" in warnings[0]


def test_secret_of_32_bytes_gives_no_warning() -> None:
    raw = jwt_introspector("ok", jwt={"iss": "https://x", "secret": "s" * 32})
    assert parse_config(dump({"introspectors": [raw]}), {}).warnings == ()


def test_short_secret_is_measured_in_bytes_not_characters() -> None:
    raw = jwt_introspector("utf8", jwt={"iss": "https://x", "secret": "\u00e9" * 16})  # 16 chars, 32 bytes
    assert parse_config(dump({"introspectors": [raw]}), {}).warnings == ()


def test_short_secret_from_env_warns() -> None:
    raw = jwt_introspector("env", jwt={"iss": "https://x", "secret": "${SECRET}"})
    config = parse_config(dump({"introspectors": [raw]}), {"SECRET": "secret"})
    assert len(config.warnings) == 1
    assert "'env'" in config.warnings[0]


def test_short_oct_static_key_warns_too() -> None:
    # An OCT key's `k` is an HMAC secret just like jwt.secret.
    config = parse_config(with_keys({"kty": "OCT", "alg": "HS256", "k": "short"}), {})
    assert len(jwt_introspectors(config)[0].keys) == 1
    assert len(config.warnings) == 1
    assert "'k'" in config.warnings[0]


def test_numbers_from_environment_variables_are_numbers() -> None:
    text = dump({"introspectors": [jwt_introspector(cache_ttl="${TTL}", timeout="${TIMEOUT}")]})
    config = parse_config(text, {"TTL": "120", "TIMEOUT": "0.5"})
    assert config.introspectors[0].cache_ttl == 120
    assert config.introspectors[0].timeout == 0.5


# --------------------------------------------------------------------------- sender-constrained tokens


def test_sender_constraints_defaults_and_values() -> None:
    default = parse_config(dump({"introspectors": [jwt_introspector()]}))
    assert default.sender_constraints.proof_window == 60
    assert default.sender_constraints.proof_leeway == 5
    assert default.sender_constraints.client_certificate_header is None
    assert jwt_introspectors(default)[0].sender_constraint == "optional"
    raw = {
        "introspectors": [jwt_introspector(sender_constraint="required")],
        "sender_constraints": {
            "proof_window": 30,
            "proof_leeway": 2,
            "algorithms": ["ES256", "EdDSA"],
            "client_certificate_header": "X-Client-Cert",
        },
    }
    config = parse_config(dump(raw))
    assert jwt_introspectors(config)[0].sender_constraint == "required"
    assert config.sender_constraints.algorithms == ("ES256", "EdDSA")
    assert config.sender_constraints.client_certificate_header == "x-client-cert"
    assert (config.sender_constraints.proof_window, config.sender_constraints.proof_leeway) == (30, 2)


def test_bad_sender_constraint_settings_name_the_resource_and_field() -> None:
    assert single_problem(dump({"introspectors": [jwt_introspector(sender_constraint="always")]})) == (
        "introspector 'a': sender_constraint must be optional or required, got 'always'"
    )
    problems = problems_of(
        dump(
            {
                "introspectors": [jwt_introspector()],
                "sender_constraints": {
                    "proof_window": 0,
                    "algorithms": ["HS256", "none"],
                    "client_certificate_header": "dpop",
                    "replay": 1,
                },
            }
        )
    )
    assert problems[0] == "sender_constraints: proof_window must be between 1 and 3600, got 0"
    assert problems[1].startswith("sender_constraints: algorithms[0] must be an asymmetric JWS algorithm")
    assert problems[2].startswith("sender_constraints: algorithms[1] must be")
    assert problems[3] == "sender_constraints: client_certificate_header must not be 'dpop'"
    assert problems[4] == "sender_constraints: replay is not a known field"
