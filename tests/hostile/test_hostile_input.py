"""Hostile input through the real grpc.aio service: every case denies as documented, the server stays healthy.

Each test throws one family of attacks at a service started from a config dict (a JWKS introspector
trusting the in-test identity provider, an HMAC introspector for tokens we must sign byte by byte,
and where relevant an opaque introspector and policies), then proves the server still allows a
valid token and reports SERVING. Every answer is also checked for control characters in any
header value, deny or allow.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import random
import re
import time
from collections.abc import Callable
from typing import Any

import grpc
import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2

from authz_service._pb.envoy.config.core.v3 import base_pb2
from authz_service._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_service.engine import build_engine
from authz_service.server import grpc as server_module
from authz_service.server.grpc import AUTHORIZATION_SERVICE
from tests.conftest import StartService, jwks_introspector, opaque_introspector
from tests.harness import Answer, Harness, HealthClient, check_request
from tests.hostile_idp import HostileIdentityProvider

HS_ISS = "https://hs.hostile.example"
HS_SECRET = "hostile-suite-hmac-secret-0123456789"
CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
GRPC_CODE = {400: 3, 401: 16, 403: 7, 503: 14}
CLAIM_HEADERS = {"email": "x-user-email", "tenant": "x-tenant"}
SIGNED_IN = {"id": "signed-in", "engine": "matcho", "matcho": {"jwt": {"sub": "present?"}}}


# --------------------------------------------------------------------------- token builders


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned(header: str | bytes, payload: str | bytes, signature: bytes = b"not-a-signature") -> str:
    """A compact JWS from raw header/payload bytes with a junk signature."""
    raw_header = header.encode() if isinstance(header, str) else header
    raw_payload = payload.encode() if isinstance(payload, str) else payload
    return f"{b64(raw_header)}.{b64(raw_payload)}.{b64(signature)}"


def hs_signed(header: str | bytes, payload: str | bytes) -> str:
    """HS256 over the exact header/payload bytes given (duplicate keys, NaN, UTF-16 survive)."""
    raw_header = header.encode() if isinstance(header, str) else header
    raw_payload = payload.encode() if isinstance(payload, str) else payload
    signing_input = f"{b64(raw_header)}.{b64(raw_payload)}"
    digest = hmac.new(HS_SECRET.encode(), signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64(digest)}"


def hs_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": HS_ISS, "sub": "hs-user", "aud": "authz-service", "iat": now, "exp": now + 300}
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


def hs_mint(claims: dict[str, Any] | None = None, header: dict[str, Any] | None = None) -> str:
    header_json = json.dumps(header or {"alg": "HS256", "typ": "JWT"})
    return hs_signed(header_json, json.dumps(hs_claims() if claims is None else claims))


def payload_with(overrides: dict[str, str]) -> str:
    """Valid HS claims as JSON text, some values replaced by raw JSON text (e.g. exp=NaN); "REMOVE" drops one."""
    values = {k: v for k, v in overrides.items() if v != "REMOVE"}
    claims = hs_claims(**{k: None for k, v in overrides.items() if v == "REMOVE"})
    parts = [f"{json.dumps(k)}: {values.pop(k) if k in values else json.dumps(v)}" for k, v in claims.items()]
    parts += [f"{json.dumps(k)}: {v}" for k, v in values.items()]
    return "{" + ", ".join(parts) + "}"


def nested(depth: int, opener: str = "[", closer: str = "]", leaf: str = "") -> str:
    return opener * depth + leaf + closer * depth


# --------------------------------------------------------------------------- service and assertions


def hostile_config(
    idp: HostileIdentityProvider, *extra_introspectors: dict[str, Any], **sections: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "introspectors": [
            jwks_introspector(idp),
            {"id": "hs", "type": "jwt", "jwt": {"iss": HS_ISS, "secret": HS_SECRET, "aud": "authz-service"}},
            *extra_introspectors,
        ],
        "response": {"claim_headers": CLAIM_HEADERS},
    }
    config.update(sections)
    return config


def control_free(response: pb.CheckResponse) -> None:
    """No header of any answer (allow or deny) carries a control character, in its name or value."""
    options = [*response.ok_response.headers, *response.denied_response.headers]
    for option in options:
        assert not CONTROL.search(option.header.key), option.header.key
        assert not CONTROL.search(option.header.value), (option.header.key, option.header.value)
    for name in response.ok_response.headers_to_remove:
        assert not CONTROL.search(name), name


async def ask(service: Harness, path: str = "/", **kwargs: Any) -> Answer:
    answer = await service.check(path, **kwargs)
    control_free(answer.response)
    return answer


def assert_denied(answer: Answer, status: int, *labels: str, case: Any = None) -> None:
    assert not answer.allowed, (case, "allowed")
    assert (answer.code, answer.http_status) == (GRPC_CODE[status], status), (
        case,
        answer.code,
        answer.http_status,
        answer.response.status.message,
    )
    if labels:
        assert answer.response.status.message in labels, (case, answer.response.status.message)
    assert answer.headers["content-type"] == "application/json", case
    assert set(answer.body) == {"error", "error_description"}, case


async def assert_healthy(service: Harness, token: str, path: str = "/") -> None:
    """The server still allows a valid token and reports SERVING for both health service names."""
    answer = await ask(service, path, token=token)
    assert answer.allowed, answer.response
    stub = HealthClient(service.channel)
    for name in ("", AUTHORIZATION_SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


def hits(idp: HostileIdentityProvider) -> dict[str, int]:
    return dict(idp.hits)


# --------------------------------------------------------------------------- size


async def test_oversized_tokens_are_rejected_before_any_decoding(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    service = await start_service(hostile_config(idp, opaque_introspector(idp)))
    before = hits(idp)
    oversized = {
        # A JWT whose unknown kid would cost a JWKS refetch, were it ever decoded.
        "jwt with unknown kid": idp.mint({"pad": "x" * 9000}, kid="kid-that-would-trigger-a-refetch"),
        # Not a JWT: it would go to the introspection endpoint, were it ever looked at.
        "opaque, one byte over": "o" * 8193,
        "jwt-shaped, one byte over": "eyJ" + "A" * 4000 + "." + "B" * 4000 + "." + "C" * 188,
        "one mebibyte": "eyJ" + "x" * (1024 * 1024),
    }
    for name, token in oversized.items():
        assert len(token) > 8192, name
        answer = await ask(service, token=token)
        assert_denied(answer, 401, "too_large", case=name)
        assert answer.body == {"error": "invalid_token", "error_description": "token too large"}
        assert token[:64] not in answer.headers["www-authenticate"]
    assert hits(idp) == before  # no JWKS refetch, no introspection call: nothing was decoded
    # The bound is 8 KiB exactly: 8192 bytes are looked at (here: introspected, and inactive).
    answer = await ask(service, token="o" * 8192)
    assert_denied(answer, 401, "inactive", case="8192 bytes")
    assert idp.hits["introspect"] == before.get("introspect", 0) + 1
    await assert_healthy(service, idp.mint())


async def test_token_limit_counts_bytes_not_characters(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    """8 KiB is a size on the wire: 4,097 two-byte characters are 8,194 bytes, over the limit, never sent to the IdP."""
    service = await start_service(hostile_config(idp, opaque_introspector(idp)))
    before = hits(idp)
    for token in ("é" * 4097, "用" * 2731, "🙂" * 2049):
        assert len(token) <= 8192 < len(token.encode()), len(token)
        # Too large, or refused for not being a visible-ASCII token at all: either way never decoded.
        assert_denied(await ask(service, token=token), 401, "too_large", "malformed", case=token[:3])
    assert hits(idp) == before
    await assert_healthy(service, idp.mint())


# --------------------------------------------------------------------------- structure


async def test_structurally_broken_tokens_are_401(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service(hostile_config(idp))
    head, payload, sig = idp.mint().split(".")
    header_json = json.dumps({"alg": "RS256", "kid": idp.kid()})
    claims_json = json.dumps({"iss": idp.issuer, "sub": "x", "aud": "authz-service", "exp": int(time.time()) + 60})
    cases: dict[str, str] = {
        "four segments": f"{head}.{payload}.{sig}.{sig}",
        "fifty dots": head + "." * 50,
        "a thousand dots": "." * 1000,
        "dots everywhere": "eyJ" + ".x" * 3000,
        "two dots only": "..",
        "empty header": f".{payload}.{sig}",
        "empty payload": f"{head}..{sig}",
        "empty signature": f"{head}.{payload}.",
        "padding in a segment": f"{head}==.{payload}.{sig}",
        "standard base64 alphabet": f"{head}+/.{payload}.{sig}",
        "percent-encoded": f"eyJ%22alg%22.{payload}.{sig}",
        "punctuation": f"{head}.{payload}!.{sig}",
        "non-ascii in a segment": f"{head}é.{payload}.{sig}",
        "emoji": f"eyJ😀.{payload}.{sig}",
        "one-character segment": f"e.{payload}.{sig}",
        "five-character segment": f"eyJhb.{payload}.{sig}",
        "base64 of non-utf-8 bytes (header)": unsigned(b'{"alg":"RS256","kid":"\xff\xfe"}', claims_json),
        "base64 of non-utf-8 bytes (payload)": unsigned(header_json, b'{"iss":"\xc3\x28","sub":"\xff"}'),
        "base64 of lone surrogate escape": unsigned(header_json, '{"sub": "\\ud800", "iss": "' + idp.issuer + '"}'),
        "base64 of random bytes": f"eyJ{b64(random.Random(1).randbytes(200))}.{payload}.{sig}",
        "header is an array": unsigned('["RS256"]', claims_json),
        "header is a string": unsigned('"RS256"', claims_json),
        "header is a number": unsigned("256", claims_json),
        "header is null": unsigned("null", claims_json),
        "header is true": unsigned("true", claims_json),
        "header is empty object": unsigned("{}", claims_json),
        "alg is a number": unsigned('{"alg": 256}', claims_json),
        "alg is empty": unsigned('{"alg": ""}', claims_json),
        "alg is null": unsigned('{"alg": null}', claims_json),
        "alg is a list": unsigned('{"alg": ["RS256"]}', claims_json),
        "alg none": unsigned('{"alg": "none"}', claims_json, b""),
        "alg NONE": unsigned('{"alg": "NONE"}', claims_json, b""),
        "alg nOnE": unsigned('{"alg": "nOnE"}', claims_json, b""),
        "alg with a space": unsigned('{"alg": "RS256 "}', claims_json),
        "payload is an array": unsigned(header_json, "[1, 2]"),
        "payload is a string": unsigned(header_json, '"claims"'),
        "payload is a number": unsigned(header_json, "1e400"),
        "payload is null": unsigned(header_json, "null"),
        "payload trailing garbage": unsigned(header_json, claims_json + " trailing"),
        "payload two objects": unsigned(header_json, claims_json + claims_json),
        "payload empty": unsigned(header_json, ""),
        "payload huge integer": unsigned(header_json, '{"exp": ' + "9" * 5000 + "}"),
        "header json with NUL": unsigned('{"alg": "RS256\\u0000"}', claims_json),
    }
    before = hits(idp)
    for name, token in cases.items():
        answer = await ask(service, token=token)
        assert_denied(answer, 401, "malformed", "bad_algorithm", "bad_signature", "untrusted_issuer", case=name)
        assert answer.body["error"] == "invalid_token", name
    assert hits(idp).get("jwks", 0) <= before.get("jwks", 0) + 1  # at most the one rate-limited refetch
    await assert_healthy(service, idp.mint())


async def test_non_utf8_json_is_rejected_even_when_signed(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    """RFC 7515: the header and payload are UTF-8 JSON. UTF-16/32 text, correctly signed, is still malformed."""
    service = await start_service(hostile_config(idp))
    header, payload = json.dumps({"alg": "HS256"}), json.dumps(hs_claims(sub="utf16-user"))
    assert (await ask(service, token=hs_signed(header, payload))).allowed  # the control: UTF-8 passes
    cases = {
        "payload utf-16-le": hs_signed(header, payload.encode("utf-16-le")),
        "payload utf-16 with bom": hs_signed(header, payload.encode("utf-16")),
        "payload utf-32": hs_signed(header, payload.encode("utf-32")),
        "header utf-16-le": hs_signed(header.encode("utf-16-le"), payload),
    }
    for name, token in cases.items():
        assert_denied(await ask(service, token=token), 401, "malformed", case=name)
    await assert_healthy(service, idp.mint())


async def test_deeply_nested_json_is_401_never_503(idp: HostileIdentityProvider, start_service: StartService) -> None:
    # A policy makes the service build the request context from the claims (the deepest walk).
    service = await start_service(hostile_config(idp, policies=[SIGNED_IN]))
    header_json = json.dumps({"alg": "RS256", "kid": idp.kid()})
    claims = {"iss": idp.issuer, "sub": "x", "aud": "authz-service", "exp": int(time.time()) + 60}
    prefix = json.dumps(claims)[:-1]

    def deep_claim(value: str) -> str:
        return prefix + ', "deep": ' + value + "}"

    unsigned_cases = {
        "5000 levels of [ (too large to look at)": (unsigned(header_json, nested(5000)), "too_large"),
        "2000 levels of [ in a claim": (unsigned(header_json, deep_claim(nested(2000))), "malformed"),
        "1100 levels of { in a claim": (unsigned(header_json, deep_claim(nested(1100, '{"":', "}", "1"))), "malformed"),
        "2500 unbalanced [": (unsigned(header_json, "[" * 2500), "malformed"),
        "2000 levels of [ in the header": (
            unsigned('{"alg": "RS256", "x": ' + nested(2000) + "}", json.dumps(claims)),
            "malformed",
        ),
        # Refused by the nesting bound before the signature is looked at.
        "600 levels, forged signature": (unsigned(header_json, deep_claim(nested(600))), "malformed"),
    }
    for name, (token, label) in unsigned_cases.items():
        assert_denied(await ask(service, token=token), 401, label, case=name)
    await assert_healthy(service, idp.mint())


SIGNED_DEEP: dict[str, Callable[[HostileIdentityProvider], str]] = {
    "2000 levels of [": lambda idp: hs_signed('{"alg": "HS256"}', payload_with({"deep": nested(2000)})),
    "600 levels of [": lambda idp: hs_signed('{"alg": "HS256"}', payload_with({"deep": nested(600)})),
    "450 levels of [": lambda idp: hs_signed('{"alg": "HS256"}', payload_with({"deep": nested(450)})),
    "900 levels of {": lambda idp: hs_signed('{"alg": "HS256"}', payload_with({"deep": nested(900, '{"":', "}", "1")})),
    "600 levels of [ from the JWKS issuer": lambda idp: idp.mint({"deep": json.loads(nested(600))}),
}


@pytest.mark.parametrize("name", list(SIGNED_DEEP))
async def test_deeply_nested_signed_claims_are_never_503(
    idp: HostileIdentityProvider, start_service: StartService, name: str
) -> None:
    """Correctly signed, so only the depth can be held against the token: 401 (or a clean allow), never a 503."""
    # A policy makes the service build the request context from the claims (the deepest walk).
    service = await start_service(hostile_config(idp, policies=[SIGNED_IN]))
    answer = await ask(service, token=SIGNED_DEEP[name](idp))
    assert answer.code != 14, (name, "503", answer.response.status.message)
    if not answer.allowed:
        assert_denied(answer, 401, case=name)
    await assert_healthy(service, idp.mint())


# --------------------------------------------------------------------------- header parameters


async def test_kid_is_only_a_lookup_key(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service(hostile_config(idp))
    before = hits(idp)
    lookups = [
        "../../etc/passwd",
        "/dev/zero",
        "file:///etc/passwd",
        f"{idp.url}/.well-known/jwks.json",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "..\\..\\windows\\win.ini",
        "kid\x00.pem",
        "' OR 1=1 --",
        "*",
    ]
    for kid in lookups:
        answer = await ask(service, token=idp.mint(kid=kid))  # signed by the real key: only the kid is wrong
        assert_denied(answer, 401, "unknown_key", case=kid)
    assert idp.hits["jwks"] <= before["jwks"] + 1  # one rate-limited refetch for the whole lot
    assert idp.hits["jwks_redirected"] == 0
    malformed: dict[str, Any] = {
        "kid of 257 characters": "k" * 257,
        "kid as a number": 7,
        "kid as a float": 1.5,
        "kid as an object": {"path": "../../etc/passwd"},
        "kid as a list": ["k"],
        "kid as true": True,
    }
    for name, kid in malformed.items():
        # PyJWT refuses to sign these, so sign the raw header ourselves: only the kid is wrong.
        answer = await ask(service, token=hs_mint(header={"alg": "HS256", "kid": kid}))
        assert_denied(answer, 401, "malformed", case=name)
    answer = await ask(service, token=idp.mint(kid="k" * 10 * 1024))
    assert_denied(answer, 401, "too_large", case="10 KB kid")
    await assert_healthy(service, idp.mint())


async def test_kid_null_is_not_a_missing_kid(idp: HostileIdentityProvider, start_service: StartService) -> None:
    """RFC 7515 4.1.4: kid is a string. PyJWT refuses `"kid": null`; so must we, even with a valid signature."""
    service = await start_service(hostile_config(idp))
    assert (await ask(service, token=hs_mint(header={"alg": "HS256"}))).allowed  # the control: no kid at all
    assert_denied(await ask(service, token=hs_mint(header={"alg": "HS256", "kid": None})), 401, "malformed")
    await assert_healthy(service, idp.mint())


def _self_signed_certificate(key: rsa.RSAPrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker.example")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode("ascii")


async def test_embedded_and_remote_keys_are_never_used(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    service = await start_service(hostile_config(idp))
    attacker_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker_jwk = pyjwt.algorithms.RSAAlgorithm.to_jwk(attacker_key.public_key(), as_dict=True)
    attacker_jwk |= {"kid": "evil", "alg": "RS256"}
    oct_jwk = {"kty": "oct", "k": b64(b"attacker-chosen-hmac-secret-0123456789"), "alg": "HS256"}
    async with HostileIdentityProvider() as attacker:
        before = hits(idp)
        headers_variants: dict[str, dict[str, Any]] = {
            "jku at the attacker": {"jku": attacker.jwks_uri},
            "jku at the real idp's redirect target": {"jku": f"{idp.url}/moved/jwks.json"},
            "x5u at the attacker": {"x5u": f"{attacker.url}/.well-known/jwks.json"},
            "embedded jwk": {"jwk": attacker_jwk},
            "embedded x5c": {"x5c": [_self_signed_certificate(attacker_key)]},
            "all of them": {
                "jku": attacker.jwks_uri,
                "x5u": attacker.jwks_uri,
                "jwk": attacker_jwk,
                "x5c": [_self_signed_certificate(attacker_key)],
            },
        }
        claims = {"iss": idp.issuer, "sub": "admin", "aud": "authz-service", "exp": int(time.time()) + 300}
        for name, extra in headers_variants.items():
            for kid in ("evil", idp.kid(), None):
                header = {"kid": kid, **extra} if kid is not None else dict(extra)
                token = pyjwt.encode(claims, attacker_key, algorithm="RS256", headers=header)
                assert_denied(await ask(service, token=token), 401, "unknown_key", "bad_signature", case=(name, kid))
        # An HMAC token keyed by the embedded oct JWK: the key set has no HMAC key, the alg is refused.
        token = pyjwt.encode(
            claims,
            b"attacker-chosen-hmac-secret-0123456789",
            algorithm="HS256",
            headers={"jwk": oct_jwk, "kid": idp.kid()},
        )
        assert_denied(await ask(service, token=token), 401, "bad_algorithm", case="oct jwk")
        assert sum(attacker.hits.values()) == 0  # nothing ever fetched from a URL a token named
        assert idp.hits["jwks_redirected"] == 0
        assert idp.hits["jwks"] <= before["jwks"] + 1  # only the configured JWKS, once, for kid "evil"
    await assert_healthy(service, idp.mint())


async def test_any_crit_is_rejected(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service(hostile_config(idp))
    assert_denied(await ask(service, token=idp.mint(headers={"crit": ["exp"]})), 401, "unsupported_crit")
    crits: tuple[object, ...] = (["exp"], ["b64"], [], "b64", None, {}, 1, False, ["b64", "b64"], ["x" * 100])
    for crit in crits:
        # Correctly signed (raw header, PyJWT would refuse some of these values): only crit is held against it.
        token = hs_mint(header={"alg": "HS256", "crit": crit})
        assert_denied(await ask(service, token=token), 401, "unsupported_crit", case=crit)
    await assert_healthy(service, idp.mint())


# --------------------------------------------------------------------------- claims


async def test_duplicate_keys_are_rejected(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service(hostile_config(idp))
    now = int(time.time())
    base = f'"iss": "{HS_ISS}", "aud": "authz-service", "exp": {now + 300}'
    cases = {
        "sub twice": ('{"alg": "HS256"}', '{"sub": "a", "sub": "admin", ' + base + "}"),
        "exp twice": ('{"alg": "HS256"}', '{"sub": "a", ' + base + f', "exp": {now + 10**8}' + "}"),
        "iss twice": ('{"alg": "HS256"}', '{"sub": "a", ' + base + ', "iss": "https://evil.example"}'),
        "box_user twice": ('{"alg": "HS256"}', '{"box_user": "a", "box_user": "admin", ' + base + "}"),
        "nested duplicate": (
            '{"alg": "HS256"}',
            '{"sub": "a", "ext": {"role": "user", "role": "admin"}, ' + base + "}",
        ),
        "alg twice": ('{"alg": "none", "alg": "HS256"}', '{"sub": "a", ' + base + "}"),
        "kid twice": ('{"alg": "HS256", "kid": "a", "kid": "b"}', '{"sub": "a", ' + base + "}"),
    }
    for name, (header, payload) in cases.items():
        assert_denied(await ask(service, token=hs_signed(header, payload)), 401, "malformed", case=name)
    await assert_healthy(service, hs_mint())


WRONG_TYPED: dict[str, dict[str, str]] = {
    "exp as string": {"exp": '"4102444800"'},
    "exp as true": {"exp": "true"},
    "exp as null": {"exp": "null"},
    "exp as list": {"exp": "[4102444800]"},
    "exp as object": {"exp": '{"$date": 4102444800}'},
    "exp missing": {"exp": "REMOVE"},
    "nbf as string": {"nbf": '"0"'},
    "nbf as null": {"nbf": "null"},
    "iat as string": {"iat": '"0"'},
    "iat as list": {"iat": "[0]"},
    "iss as list": {"iss": f'["{HS_ISS}"]'},
    "iss as null": {"iss": "null"},
    "iss as object": {"iss": f'{{"value": "{HS_ISS}"}}'},
    "sub as object": {"sub": '{"id": "admin"}'},
    "sub as number": {"sub": "42"},
    "sub as list": {"sub": '["admin"]'},
    "sub as true": {"sub": "true"},
    "box_user as number": {"box_user": "1"},
    "jti as number": {"jti": "1"},
    "aud as number": {"aud": "1"},
    "aud as object": {"aud": '{"aud": "authz-service"}'},
    "aud as list of numbers": {"aud": "[1, 2]"},
    "aud as nested list": {"aud": '[["authz-service"]]'},
    "aud as null": {"aud": "null"},
}

# Not JSON at all (RFC 8259 has no NaN or Infinity), yet Python's json module reads them as floats.
NON_JSON_NUMBERS: dict[str, dict[str, str]] = {
    "exp as NaN": {"exp": "NaN"},
    "exp as Infinity": {"exp": "Infinity"},
    "nbf as NaN": {"nbf": "NaN"},
    "iat as NaN": {"iat": "NaN"},
    "exp as -Infinity": {"exp": "-Infinity"},
}


async def test_wrong_typed_claims_are_401(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service(hostile_config(idp))
    for name, overrides in WRONG_TYPED.items():
        token = hs_signed('{"alg": "HS256"}', payload_with(overrides))  # correctly signed: only the type is wrong
        assert_denied(await ask(service, token=token), 401, case=name)
    # The JWKS introspector too (signed by the IdP itself).
    now = time.time()
    wrong_claims: dict[str, dict[str, Any]] = {
        "exp as string": {"exp": str(int(now) + 60)},
        "exp as bool": {"exp": True},
        "exp as list": {"exp": [int(now) + 60]},
        "iat as string": {"iat": "0"},
        "sub as number": {"sub": 7},
        "nbf as string": {"nbf": "0"},
        "aud as number": {"aud": 1},
        "aud as object": {"aud": {"x": "authz-service"}},
    }
    for name, claims in wrong_claims.items():
        assert_denied(await ask(service, token=idp.mint(claims)), 401, case=("jwks", name))
    await assert_healthy(service, hs_mint())


@pytest.mark.parametrize("name", sorted(NON_JSON_NUMBERS))
async def test_nan_and_infinity_are_not_numbers(
    idp: HostileIdentityProvider, start_service: StartService, name: str
) -> None:
    """`exp`/`nbf`/`iat` must be JSON numbers: `exp: NaN` or `exp: Infinity` would never expire."""
    service = await start_service(hostile_config(idp))
    token = hs_signed('{"alg": "HS256"}', payload_with(NON_JSON_NUMBERS[name]))
    assert_denied(await ask(service, token=token), 401, "malformed", "bad_claims", "expired", case=name)
    await assert_healthy(service, hs_mint())


CONTROL_VALUES = [
    "admin\r\nx-injected: 1",
    "a\nb",
    "a\rb",
    "nul\x00byte",
    "del\x7f",
    "tab\there",
    "esc\x1b[31m",
    "\x01",
    "trailing\n",
    "\x0b\x0c",
    "\x1f",
]
NON_ASCII = ["Jürgen", "用户-42", "مستخدم", "🙂‍↕️", "ＡＤＭＩＮ", "zero\u200bwidth", "é" * 100]


async def test_control_characters_never_reach_a_header(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    service = await start_service(hostile_config(idp))
    for value in CONTROL_VALUES:
        # As the user id it is the identity: 401, never a mangled header.
        for claim in ("sub", "box_user"):
            answer = await ask(service, token=idp.mint({claim: value}))
            assert_denied(answer, 401, "bad_claims", case=(claim, value))
        # As a claim mapped to a header it is an extra: left out, and removed upstream.
        answer = await ask(service, token=idp.mint({"sub": "ok-user", "email": value, "tenant": {"name": value}}))
        assert answer.allowed, value
        assert answer.headers["x-user-id"] == "ok-user"
        assert "x-user-email" not in answer.headers, value
        assert "x-user-email" in answer.removed, value
        assert answer.claims()["email"] == value  # the claims header is base64url: the value survives intact
        assert not CONTROL.search(answer.headers.get("x-tenant", "")), value
    for value in NON_ASCII:
        answer = await ask(service, token=idp.mint({"sub": value, "email": value}))
        assert answer.allowed, value
        assert answer.headers["x-user-id"] == value  # unchanged, not escaped
        assert answer.headers["x-user-email"] == value
        assert answer.metadata["user_id"] == value
    await assert_healthy(service, idp.mint())


async def test_opaque_results_with_control_characters(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    service = await start_service(hostile_config(idp, opaque_introspector(idp)))
    for value in CONTROL_VALUES:
        answer = await ask(service, token=idp.issue_opaque({"sub": value}))
        assert_denied(answer, 401, "bad_claims", case=("sub", value))
        token = idp.issue_opaque({"sub": None, "username": value})
        assert_denied(await ask(service, token=token), 401, "bad_claims", case=("username", value))
        answer = await ask(service, token=idp.issue_opaque({"sub": "opaque-user", "email": value}))
        assert answer.allowed, value
        assert "x-user-email" in answer.removed, value
    # An introspection result is not bounded by the 8 KiB token limit: big values stay out of headers.
    answer = await ask(service, token=idp.issue_opaque({"sub": "opaque-user", "email": "e" * 20000}))
    assert answer.allowed
    assert "x-user-email" not in answer.headers
    answer = await ask(service, token=idp.issue_opaque({"sub": "u" * 20000}))
    assert not answer.allowed
    assert answer.http_status == 401
    await assert_healthy(service, idp.issue_opaque())


# --------------------------------------------------------------------------- credentials


async def test_authorization_header_variants(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service(hostile_config(idp))
    token = idp.mint()
    for scheme in ("bearer", "BEARER", "Bearer", "bEaReR"):
        assert (await ask(service, headers={"authorization": f"{scheme} {token}"})).allowed, scheme
    two_values = [
        f"Bearer {token},Bearer {idp.mint()}",
        f"Bearer {token}, Bearer {token}",
        "Bearer a,Bearer b",
        f"Bearer {token},",
        f",Bearer {token}",
        "Bearer ,",
        f"Basic dXNlcjpwYXNz,Bearer {token}",
    ]
    for value in two_values:
        answer = await ask(service, headers={"authorization": value})
        assert_denied(answer, 400, "multiple_credentials", case=value)
        assert answer.body["error"] == "invalid_request"
        assert 'error="invalid_request"' in answer.headers["www-authenticate"]
    broken_bearer = [
        "Bearer",
        "Bearer ",
        "Bearer  ",
        "Bearer\t",
        "Bearer \t",
        "  Bearer  ",
        f"Bearer {token} extra",
        f"Bearer {token[:20]}\x0b{token[20:]}",
        f"Bearer {token[:20]}\x00{token[20:]}",
        f"Bearer {token[:20]}\u2028{token[20:]}",
        f"Bearer {token[:20]}\u00a0{token[20:]}",
        "Bearer \u00a0",
    ]
    for value in broken_bearer:
        assert_denied(await ask(service, headers={"authorization": value}), 401, case=value)
    not_ours = [
        "Basic dXNlcjpwYXNz",
        'Digest username="a"',
        "",
        " ",
        "Bearer\t" + token,
        "Bearer\u00a0" + token,
        "Token " + token,
        "BearerX " + token,
        token,
    ]
    for value in not_ours:
        answer = await ask(service, headers={"authorization": value})
        assert_denied(answer, 401, "missing_token", case=value)
        assert answer.headers["www-authenticate"] == 'Bearer realm="authz-service"'
    await assert_healthy(service, token)


async def test_hostile_cookie_headers(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service(hostile_config(idp, opaque_introspector(idp, cookie="ASPXAUTH")))
    token = idp.issue_opaque({"sub": "cookie-user"})
    before = hits(idp)
    missing = {
        "only separators": ";" * 10000,
        "empty names": "=; =x; ==; =ASPXAUTH",
        "name without value": "ASPXAUTH",
        "name with spaces inside": "ASPX AUTH=" + token,
        "100 KB of other cookies": "; ".join(f"c{i}=" + "v" * 90 for i in range(1100)),
        "one 100 KB cookie": "big=" + "x" * 100 * 1024,
        "control characters": "\x00=\x01; \r\n=\t",
        "lowercase name": f"aspxauth={token}",
    }
    for name, cookie in missing.items():
        assert_denied(await ask(service, headers={"cookie": cookie}), 401, "missing_token", case=name)
    broken = {
        "empty value": "ASPXAUTH=",
        "quoted empty": 'ASPXAUTH=""',
        "value with a space": "ASPXAUTH=a b",
        "100 KB token": "ASPXAUTH=" + "t" * 100 * 1024,
        "8 KiB + 1 token": "ASPXAUTH=" + "t" * 8193,
    }
    for name, cookie in broken.items():
        assert_denied(await ask(service, headers={"cookie": cookie}), 401, "malformed", "too_large", case=name)
    assert idp.hits["introspect"] == before.get("introspect", 0)  # none of that reached the IdP
    found = {
        "among junk": f";;; =x; a=1;; ASPXAUTH={token}; ;",
        "quoted": f'ASPXAUTH="{token}"',
        "first of two": f"ASPXAUTH={token}; ASPXAUTH=attacker",
        "after 100 KB": "; ".join(f"c{i}=" + "v" * 90 for i in range(1100)) + f"; ASPXAUTH={token}",
    }
    for name, cookie in found.items():
        answer = await ask(service, headers={"cookie": cookie})
        assert answer.allowed, name
        assert answer.headers["x-user-id"] == "cookie-user", name
    assert_denied(await ask(service, headers={"cookie": "ASPXAUTH=attacker; ASPXAUTH=" + token}), 401, "inactive")
    await assert_healthy(service, idp.mint())


# --------------------------------------------------------------------------- the CheckRequest itself


def _raw_check(service: Harness) -> Any:
    return service.channel.unary_unary(CHECK_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)


async def _send_raw(service: Harness, data: bytes) -> tuple[grpc.StatusCode, pb.CheckResponse | None]:
    try:
        reply = await _raw_check(service)(data, timeout=30)
    except grpc.aio.AioRpcError as err:
        return err.code(), None
    response = pb.CheckResponse.FromString(reply)
    control_free(response)
    return grpc.StatusCode.OK, response


def _never_allowed(name: str, result: tuple[grpc.StatusCode, pb.CheckResponse | None]) -> None:
    code, response = result
    if response is None:
        assert code != grpc.StatusCode.OK, name
        return
    assert response.status.code != 0, (name, response.status)
    assert not response.HasField("ok_response"), (name, response.status)
    assert response.denied_response.status.code in (400, 401, 403, 503), name


async def test_malformed_and_huge_check_requests(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service(hostile_config(idp))
    token = idp.mint()
    rng = random.Random(20240601)
    garbage = {f"random {n} bytes #{i}": rng.randbytes(n) for n in (1, 2, 7, 64, 1000, 65536) for i in range(3)}
    garbage |= {
        "all 0xff": b"\xff" * 100,
        "huge length prefix": b"\x0a\xff\xff\xff\xff\x0f",
        "field 1 claims 2 GiB": b"\x0a\xff\xff\xff\xff\x07" + b"\x00" * 10,
        "deep nested group": b"\x0b" * 10000,
        "unknown field numbers": b"\xf8\xff\xff\xff\x0f\x01" * 100,
    }
    for name, data in garbage.items():
        _never_allowed(name, await _send_raw(service, data))
    valid = check_request(token=token).SerializeToString()
    offset = valid.index(token.encode())
    for cut in (1, len(valid) // 3, offset + 10, offset + len(token) // 2, len(valid) - len(token) + 5):
        truncated = valid[:cut]
        if token.encode() in truncated:
            continue  # a whole token survived the cut: that request is legitimately valid
        _never_allowed(f"truncated at {cut}", await _send_raw(service, truncated))
    # Valid protobuf, but big: no token in any of them.
    big = {
        "10,000 headers": check_request(headers={f"x-h-{i}": "v" * 10 for i in range(10000)}),
        "3 MB header value": check_request(headers={"x-big": "v" * 3 * 1024 * 1024}),
        "3 MB authorization value": check_request(headers={"authorization": "Bearer " + "a" * 3 * 1024 * 1024}),
        "3 MB cookie": check_request(headers={"cookie": "a=b;" * (3 * 1024 * 256)}),
        "10,000 context extensions": check_request(context_extensions={f"k{i}": "v" for i in range(10000)}),
    }
    for name, request in big.items():
        result = await _send_raw(service, request.SerializeToString())
        _never_allowed(name, result)
        assert result[0] == grpc.StatusCode.OK, name
        assert result[1] is not None, name
        assert result[1].status.code == 16, name
    oversized = check_request(token=token, headers={"x-big": "v" * 5 * 1024 * 1024}).SerializeToString()
    code, response = await _send_raw(service, oversized)
    assert (code, response) == (grpc.StatusCode.RESOURCE_EXHAUSTED, None)  # over gRPC's 4 MiB, never decoded
    await assert_healthy(service, token)


def _header_map_request(entries: list[tuple[str, bytes]], path: str = "/") -> pb.CheckRequest:
    """A CheckRequest as Envoy sends it with encode_raw_headers: every value separately, as bytes."""
    return pb.CheckRequest(
        attributes=ac.AttributeContext(
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(
                    method="GET",
                    path=path,
                    host="api.example.com",
                    header_map=base_pb2.HeaderMap(
                        headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in entries]
                    ),
                )
            )
        )
    )


async def test_raw_header_map_requests(idp: HostileIdentityProvider, start_service: StartService) -> None:
    service = await start_service(hostile_config(idp))
    token = idp.mint()
    cases: dict[str, tuple[list[tuple[str, bytes]], int]] = {
        "non-utf-8 token": ([("authorization", b"Bearer \xff\xfe\xfd")], 401),
        "token with non-utf-8 tail": ([("authorization", f"Bearer {token}".encode() + b"\xc3")], 401),
        "repeated authorization": (
            [("authorization", f"Bearer {token}".encode()), ("authorization", b"Bearer x")],
            400,
        ),
        "mixed case repeated": ([("Authorization", f"Bearer {token}".encode()), ("AUTHORIZATION", b"Basic eA==")], 400),
        "empty key": ([("", b"Bearer x")], 401),
        "control characters in the key": ([("author\x00ization", f"Bearer {token}".encode())], 401),
    }
    for name, (entries, status) in cases.items():
        code, response = await _send_raw(service, _header_map_request(entries).SerializeToString())
        assert code == grpc.StatusCode.OK, name
        assert response is not None, name
        answer = Answer.of(response)
        assert_denied(answer, status, case=name)
    plain = _header_map_request([("Authorization", f"Bearer {token}".encode())])
    code, response = await _send_raw(service, plain.SerializeToString())
    assert response is not None
    assert Answer.of(response).allowed
    await assert_healthy(service, token)


async def test_huge_paths_and_odd_methods_reach_policies_safely(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    policies = [
        {
            "id": "public",
            "engine": "matcho",
            "matcho": {"uri": "#^/public/", "request-method": {"$enum": ["get", "head"]}},
        },
        {"id": "api", "engine": "matcho", "matcho": {"jwt": {"sub": "present?"}, "uri": "#^/api/[a-z]+$"}},
    ]
    service = await start_service(hostile_config(idp, policies=policies))
    token = idp.mint()
    long = "a" * 64 * 1024
    assert (await ask(service, "/public/" + long)).allowed
    assert (await ask(service, "/api/" + long, token=token)).allowed
    assert (await ask(service, "/api/" + long + "?" + "&".join(f"p{i}={i}" for i in range(5000)), token=token)).allowed
    assert_denied(await ask(service, "/private/" + long), 401, "missing_token")
    assert_denied(await ask(service, "/api/" + long + "/", token=token), 403, "forbidden")
    # Encoded dots and a NUL: paths parsers read two ways are refused before anything else.
    assert_denied(await ask(service, "/" + "%2e%2e/" * 8000 + "api/x", token=token), 400, "ambiguous_path")
    assert_denied(await ask(service, "/api/x\x00/../admin", token=token), 400, "ambiguous_path")
    odd_methods = ["FOO", "", "G E T", "get\r\n", "GET\x00", "DELETE" * 1000, "ÄÖÜ", "\x7f", "CONNECT", "GET,POST"]
    for method in odd_methods:
        answer = await ask(service, "/public/x", method=method)
        assert_denied(answer, 401, "missing_token", case=method)
        answer = await ask(service, "/admin", method=method, token=token)
        assert_denied(answer, 403, "forbidden", case=method)
    for method in ("get", "GET", "Head"):
        assert (await ask(service, "/public/x", method=method)).allowed, method
    odd_paths = ["", "*", "?", "?a", "//", "/public", "/public/?" + "a=" * 20000, "\x00", "/é/✓", "%", "/public/%zz"]
    for path in odd_paths:
        answer = await ask(service, path, method="GET")
        # A broken escape (`%zz`) is read differently by different parsers: refused, not allowed.
        assert answer.allowed == (path.startswith("/public/") and "%zz" not in path), path
    assert_denied(await ask(service, "/public/%zz", method="GET"), 400, "ambiguous_path")
    await assert_healthy(service, token, "/api/x")


# --------------------------------------------------------------------------- fail closed


async def test_internal_errors_fail_closed(
    idp: HostileIdentityProvider, start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await start_service(hostile_config(idp, policies=[SIGNED_IN]))
    running = service.service
    engine = running.engine

    def explode(context: Any) -> bool:
        raise RuntimeError(f"policy bug while looking at {context!r}")

    async def expect_internal_error(case: str) -> None:
        token = idp.mint()  # a fresh token each time: never answered from the verified-token cache
        answer = await ask(service, token=token)
        assert_denied(answer, 503, "internal_error", case=case)
        assert answer.body == {"error": "temporarily_unavailable", "error_description": "internal error"}
        assert token not in answer.response.SerializeToString().decode("utf-8", "replace")

    # A policy whose evaluation raises (an engine built from the same config, its predicates broken).
    broken_policies = tuple(dataclasses.replace(p, predicate=explode) for p in engine.config.policies)
    broken_config = dataclasses.replace(engine.config, policies=broken_policies)
    running.engine = build_engine(broken_config, running.client, running.caches, previous=engine)
    await expect_internal_error("policy raises")
    running.engine = engine
    await assert_healthy(service, idp.mint())

    # An introspector that raises something no one planned for.
    introspector = engine.introspectors["idp"]
    for error in (RuntimeError("boom"), RecursionError(), KeyError("kid"), TypeError("x"), MemoryError()):

        async def broken(credential: Any, error: BaseException = error) -> Any:
            raise error

        monkeypatch.setattr(introspector, "introspect", broken)
        await expect_internal_error(type(error).__name__)
        monkeypatch.undo()
        await assert_healthy(service, idp.mint())

    # The Envoy adapter itself raising (outside the Authorizer).
    def broken_adapter(raw: Any) -> Any:
        raise ValueError("adapter bug")

    monkeypatch.setattr(server_module, "decode_check", broken_adapter)
    await expect_internal_error("adapter raises")
    monkeypatch.undo()
    await assert_healthy(service, idp.mint())
