"""dpop: DPoP proofs (RFC 9449) minted by jwcrypto, certificate binding (RFC 8705), replay, challenges."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from jwcrypto import jwk, jws  # type: ignore[import-untyped]  # no type information shipped

from authz_service.lru import Lru
from authz_service.model import Confirmation, HttpRequest
from authz_service.tokens.base import Credential
from authz_service.tokens.dpop import (
    DEFAULT_PROOF_LEEWAY,
    DEFAULT_PROOF_WINDOW,
    DPOP_ALGORITHMS,
    MAX_PROOF_BYTES,
    XFCC,
    CertificateBindingRejected,
    InvalidDPoPProof,
    MemoryReplayCache,
    ProofClaims,
    ReplayCacheUnavailable,
    SenderConstraintRejected,
    SenderConstraints,
    access_token_hash,
    certificate_der,
    normal_url,
    proof_header,
    read_confirmation,
    replay_key,
    replay_ttl,
    thumbprint,
    verify_certificate_binding,
    verify_dpop_proof,
    www_authenticate_dpop,
    x5t_s256,
    xfcc_certificate,
)
from authz_service.tokens.keys import VerificationKey
from tests.certs import make_pki
from tests.unit.fakes import EPOCH, FakeClock

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2lnbmF0dXJl"  # what the proof is bound to
URL = "https://api.example.com/fhir/Patient"
NOW = float(EPOCH)
OMIT = object()  # a claim or header member left out of a proof


class Holder:
    """A client's DPoP key (jwcrypto, not PyJWT: an independent implementation) that mints proofs."""

    def __init__(self, key: Any, alg: str) -> None:
        self.key = key
        self.alg = alg
        self.public = key.export_public(as_dict=True)
        self.jkt: str = key.thumbprint()  # jwcrypto's RFC 7638 thumbprint (SHA-256)
        self._count = 0

    def proof(self, *, header: dict[str, Any] | None = None, **claims: Any) -> str:
        """A signed proof for GET URL with TOKEN at NOW; `claims`/`header` override (OMIT drops)."""
        self._count += 1
        payload: dict[str, Any] = {
            "jti": f"jti-{self._count}",
            "htm": "GET",
            "htu": URL,
            "iat": int(NOW),
            "ath": access_token_hash(TOKEN),
        }
        protected: dict[str, Any] = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.public}
        for values, overrides in ((payload, claims), (protected, header or {})):
            for name, value in overrides.items():
                if value is OMIT:
                    values.pop(name, None)
                else:
                    values[name] = value
        signed = jws.JWS(json.dumps(payload))
        signed.add_signature(self.key, alg=self.alg, protected=json.dumps(protected))
        return str(signed.serialize(compact=True))


def _holder(alg: str) -> Holder:
    if alg.startswith(("RS", "PS")):
        return Holder(jwk.JWK.generate(kty="RSA", size=2048), alg)
    if alg == "EdDSA":
        return Holder(jwk.JWK.generate(kty="OKP", crv="Ed25519"), alg)
    curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]
    return Holder(jwk.JWK.generate(kty="EC", crv=curve), alg)


HOLDERS = {alg: _holder(alg) for alg in ("ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA")}
EC = HOLDERS["ES256"]
OTHER_EC = _holder("ES256")


def verify(proof: str, holder: Holder = EC, **overrides: Any) -> ProofClaims:
    arguments: dict[str, Any] = {
        "token": TOKEN,
        "jkt": holder.jkt,
        "method": "GET",
        "url": URL,
        "now": NOW,
        "window": DEFAULT_PROOF_WINDOW,
        "leeway": DEFAULT_PROOF_LEEWAY,
    }
    return verify_dpop_proof(proof, **(arguments | overrides))


def rejected(proof: str, holder: Holder = EC, **overrides: Any) -> str:
    """The detail label of the rejection; fails if the proof passes, or if an error leaks it."""
    with pytest.raises(InvalidDPoPProof) as caught:
        verify(proof, holder, **overrides)
    error = caught.value
    for secret in (proof, TOKEN, *proof.split(".")[1:2]):
        if len(secret) > 3:  # "" and the like are in every string
            assert secret not in str(error)
            assert secret not in error.description
    assert (error.scheme, error.error) == ("DPoP", "invalid_dpop_proof")
    return error.detail


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}.{_b64(signature)}"


# ---- a valid proof ----


@pytest.mark.parametrize("alg", sorted(HOLDERS))
def test_a_proof_from_jwcrypto_verifies(alg: str) -> None:
    holder = HOLDERS[alg]
    claims = verify(holder.proof(jti="one"), holder)
    assert claims == ProofClaims(holder.jkt, "one", NOW, "GET", URL)
    assert claims.replay_key == replay_key(holder.jkt, "one")


def test_thumbprint_agrees_with_jwcrypto_for_every_key_type() -> None:
    for holder in HOLDERS.values():
        assert thumbprint(holder.public) == holder.jkt
    # Only the required members count (RFC 7638 3.2): `alg`, `kid`, `use` change nothing.
    assert thumbprint(EC.public | {"kid": "k1", "alg": "ES256", "use": "sig"}) == EC.jkt
    with pytest.raises(ValueError, match="unsupported key type"):
        thumbprint({"kty": "oct", "k": "c2VjcmV0"})
    with pytest.raises(ValueError, match="missing or non-string"):
        thumbprint({"kty": "EC", "crv": "P-256", "x": "AA"})  # no y


def test_access_token_hash_is_rfc_9449s_example() -> None:
    assert access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == (
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    )


def test_htu_is_compared_without_query_and_fragment_after_normalization() -> None:
    proof = EC.proof(htu="HTTPS://API.Example.COM:443/fhir/./Patient")
    assert verify(proof, url="https://api.example.com/fhir/Patient?_count=10").htu.startswith("HTTPS://")
    assert verify(EC.proof(htu=URL + "?ignored=1#frag"), url=URL).jti
    assert verify(EC.proof(htu="http://h:8080/%7Ex"), url="http://H:8080/~x").jti
    assert normal_url("https://[::1]:443/a") == "https://[::1]/a"
    assert normal_url("http://h:80") == "http://h/"
    for not_one in ("/fhir/Patient", "ftp://h/x", "https://user@h/x", "https://h:99999/x", "https:///x"):
        assert normal_url(not_one) is None


# ---- what a proof must be ----


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"htu": "https://api.example.com/fhir/Observation"}, "htu_mismatch"),
        ({"htu": "https://evil.example.com/fhir/Patient"}, "htu_mismatch"),
        ({"htu": "http://api.example.com/fhir/Patient"}, "htu_mismatch"),
        ({"htu": "https://api.example.com:8443/fhir/Patient"}, "htu_mismatch"),
        ({"htu": "/fhir/Patient"}, "htu_mismatch"),
        ({"htu": 7}, "htu_mismatch"),
        ({"htu": OMIT}, "htu_mismatch"),
        ({"htm": "POST"}, "htm_mismatch"),
        ({"htm": "get"}, "htm_mismatch"),  # methods are case-sensitive
        ({"htm": OMIT}, "htm_mismatch"),
        ({"iat": int(NOW - DEFAULT_PROOF_WINDOW - 1)}, "stale"),
        ({"iat": int(NOW + DEFAULT_PROOF_LEEWAY + 1)}, "issued_in_future"),
        ({"iat": str(int(NOW))}, "bad_iat"),
        ({"iat": True}, "bad_iat"),
        ({"iat": OMIT}, "bad_iat"),
        ({"ath": access_token_hash("another-token")}, "ath_mismatch"),
        ({"ath": OMIT}, "ath_mismatch"),
        ({"jti": OMIT}, "bad_jti"),
        ({"jti": ""}, "bad_jti"),
        ({"jti": "j" * 257}, "bad_jti"),
        ({"jti": 12}, "bad_jti"),
    ],
)
def test_claims_that_do_not_fit_the_request_are_refused(overrides: dict[str, Any], detail: str) -> None:
    assert rejected(EC.proof(**overrides)) == detail


def test_the_window_edges_are_inclusive() -> None:
    assert verify(EC.proof(iat=int(NOW - DEFAULT_PROOF_WINDOW))).jti
    assert verify(EC.proof(iat=int(NOW + DEFAULT_PROOF_LEEWAY))).jti
    assert verify(EC.proof(jti="j" * 256)).jti


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        ({"typ": "JWT"}, "bad_typ"),
        ({"typ": OMIT}, "bad_typ"),
        ({"typ": "application/dpop+jwt+x"}, "bad_typ"),
        ({"jwk": OMIT}, "bad_jwk"),
        ({"jwk": "not-an-object"}, "bad_jwk"),
        ({"jwk": {"kty": "oct", "k": "c2VjcmV0"}}, "bad_jwk"),
    ],
)
def test_headers_that_do_not_make_a_dpop_proof_are_refused(header: dict[str, Any], detail: str) -> None:
    assert rejected(EC.proof(header=header)) == detail


def test_typ_compares_as_a_media_type() -> None:
    assert verify(EC.proof(header={"typ": "DPoP+JWT"})).jti


def test_a_key_other_than_the_tokens_is_refused() -> None:
    assert rejected(OTHER_EC.proof(), jkt=EC.jkt) == "jkt_mismatch"
    # A proof carrying the bound key's public JWK but signed by another key fails its signature.
    assert rejected(OTHER_EC.proof(header={"jwk": EC.public})) == "bad_signature"


def test_a_signature_over_other_claims_is_refused() -> None:
    header, _, signature = EC.proof().split(".")
    _, payload, _ = EC.proof(jti="other").split(".")
    assert rejected(f"{header}.{payload}.{signature}") == "bad_signature"


def test_alg_none_and_hmac_are_refused_before_any_key_is_read() -> None:
    claims = {"jti": "x", "htm": "GET", "htu": URL, "iat": int(NOW), "ath": access_token_hash(TOKEN)}
    for alg in ("none", "None", "HS256", "HS512", "RSA-OAEP"):
        header = {"typ": "dpop+jwt", "alg": alg, "jwk": EC.public}
        assert rejected(_unsigned(header, claims, b"\x00" * 32)) == "bad_alg"
    hmac_key = jwk.JWK.generate(kty="oct", size=256)
    signed = jws.JWS(json.dumps(claims))
    signed.add_signature(
        hmac_key, alg="HS256", protected=json.dumps({"typ": "dpop+jwt", "alg": "HS256", "jwk": EC.public})
    )
    assert rejected(signed.serialize(compact=True)) == "bad_alg"


def test_an_alg_the_key_cannot_verify_is_refused() -> None:
    # An ES384 signature from a P-256 key (jwcrypto signs it): the key decides the alg, never the header.
    assert rejected(Holder(EC.key, "ES384").proof()) == "bad_alg"
    rsa = HOLDERS["RS256"]
    assert rejected(rsa.proof(header={"jwk": rsa.public | {"alg": "PS256"}}), rsa) == "bad_alg"


def test_a_private_key_in_the_jwk_is_refused() -> None:
    private = EC.key.export_private(as_dict=True)
    assert thumbprint(private) == EC.jkt  # same thumbprint: only the private members make it wrong
    assert rejected(EC.proof(header={"jwk": private})) == "bad_jwk"
    rsa = HOLDERS["RS256"]
    assert rejected(rsa.proof(header={"jwk": rsa.key.export_private(as_dict=True)}), rsa) == "bad_jwk"


def test_a_loaded_proof_key_is_reused_only_for_the_very_same_jwk() -> None:
    keys: Lru[str, VerificationKey] = Lru(8)
    assert verify(EC.proof(), keys=keys).jkt == EC.jkt
    assert len(keys) == 1
    assert verify(EC.proof(), keys=keys).jkt == EC.jkt  # from the cache
    assert len(keys) == 1
    # Same thumbprint, other members: loaded (and refused) on its own, never taken from the cache.
    private = EC.key.export_private(as_dict=True)
    assert rejected(EC.proof(header={"jwk": private}), keys=keys) == "bad_jwk"
    assert len(keys) == 1


def test_a_weak_rsa_key_is_refused() -> None:
    weak = Holder(jwk.JWK.generate(kty="RSA", size=1024), "RS256")
    assert rejected(weak.proof(), weak) == "bad_jwk"


def test_oversize_and_garbage_are_refused_before_decoding() -> None:
    big = EC.proof(pad="x" * MAX_PROOF_BYTES)
    assert rejected(big) == "too_large"
    for garbage in ("", "garbage", "a.b", "a.b.c.d", "!!.??.**", "eyJhbGciOiJFUzI1NiJ9.e30", "e30.e30.", "W10.e30."):
        assert rejected(garbage) == "malformed"
    duplicate = _unsigned({"typ": "dpop+jwt", "alg": "ES256", "jwk": EC.public}, {}).split(".")
    payload = _b64(b'{"jti":"a","jti":"b"}')
    assert rejected(f"{duplicate[0]}.{payload}.") == "malformed"
    # An unknown critical extension (jwcrypto will not sign one): refused before the signature.
    header, payload, signature = EC.proof().split(".")
    crit = {**json.loads(base64.urlsafe_b64decode(header + "==")), "crit": ["exp"], "exp": 1}
    assert rejected(f"{_b64(json.dumps(crit).encode())}.{payload}.{signature}") == "malformed"


def test_errors_carry_no_proof_or_token_text() -> None:
    with pytest.raises(InvalidDPoPProof) as caught:
        verify(EC.proof(jti="secret-jti"), token="secret-token-value")
    assert "secret" not in str(caught.value)
    assert caught.value.detail == "ath_mismatch"


# ---- the DPoP header and the challenge ----


def test_exactly_one_dpop_header() -> None:
    proof = EC.proof()
    assert proof_header({}) is None
    assert proof_header({"dpop": f" {proof} "}) == proof
    with pytest.raises(InvalidDPoPProof) as caught:
        proof_header({"dpop": f"{proof},{proof}"})  # Envoy joins repeated headers with ","
    assert caught.value.detail == "multiple_proofs"


def test_www_authenticate_dpop() -> None:
    algs = " ".join(sorted(DPOP_ALGORITHMS))
    assert www_authenticate_dpop() == f'DPoP algs="{algs}"'
    assert www_authenticate_dpop("invalid_dpop_proof", "DPoP proof is too old", realm="authz-service") == (
        f'DPoP realm="authz-service", error="invalid_dpop_proof", error_description="DPoP proof is too old", '
        f'algs="{algs}"'
    )
    # A description can never break out of its quotes or add a header line.
    assert www_authenticate_dpop("invalid_token", 'a"b\\c\r\nX: y') == (
        f'DPoP error="invalid_token", error_description="abcX: y", algs="{algs}"'
    )
    for bad in ('x"y', "a\nb", ""):
        with pytest.raises(ValueError, match="not an OAuth error code"):
            www_authenticate_dpop(bad)
    assert not {"none", "HS256", "HS384", "HS512"} & set(algs.split())


# ---- replay: the memory cache ----


async def test_memory_cache_detects_a_replay_until_it_expires() -> None:
    clock = FakeClock(100.0)
    cache = MemoryReplayCache(10, clock=clock)
    ttl = replay_ttl(DEFAULT_PROOF_WINDOW, DEFAULT_PROOF_LEEWAY)
    assert ttl == DEFAULT_PROOF_WINDOW + DEFAULT_PROOF_LEEWAY
    assert await cache.seen("k1", ttl) is False
    assert await cache.seen("k1", ttl) is True
    assert await cache.seen("k2", ttl) is False
    clock.now += ttl - 0.001
    assert await cache.seen("k1", ttl) is True
    clock.now += 0.002
    assert await cache.seen("k1", ttl) is False  # expired: remembered again, from now
    assert await cache.seen("k1", ttl) is True


async def test_a_full_memory_cache_forgets_only_expired_proofs() -> None:
    clock = FakeClock(0.0)
    cache = MemoryReplayCache(3, clock=clock)
    for key in ("a", "b", "c"):
        assert await cache.seen(key, 10) is False
        clock.now += 1
    # Full of live proofs: a new one is refused (503), never let in by forgetting a live one.
    with pytest.raises(ReplayCacheUnavailable) as caught:
        await cache.seen("d", 10)
    assert caught.value.outcome == "full"
    assert await cache.seen("a", 10) is True  # still remembered
    assert len(cache) == 3
    clock.now = 10.5  # "a" (until 10) has expired, "b" (11) and "c" (12) have not
    assert await cache.seen("d", 10) is False
    assert len(cache) == 3
    assert await cache.seen("b", 10) is True
    assert await cache.seen("c", 10) is True
    # "a" was forgotten once expired, but the cache is full of live proofs again.
    with pytest.raises(ReplayCacheUnavailable):
        await cache.seen("a", 10)


async def test_expired_proofs_are_dropped_as_new_ones_arrive() -> None:
    clock = FakeClock(0.0)
    cache = MemoryReplayCache(1000, clock=clock)
    for i in range(100):
        await cache.seen(f"old-{i}", 5)
    clock.now = 6
    for i in range(30):
        await cache.seen(f"new-{i}", 5)
    assert len(cache) == 100 - 2 * 30 + 30  # two expired entries go with every insert


# ---- certificate binding (RFC 8705) ----


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A client certificate and one from another CA, as PEM."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    return Path(pki.client_cert).read_text(), Path(pki.rogue_cert).read_text()


def test_x5t_s256_is_the_sha256_of_the_der(certificates: tuple[str, str]) -> None:
    client, _ = certificates
    cert = x509.load_pem_x509_certificate(client.encode())
    expected = _b64(cert.fingerprint(hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    assert expected == _b64(hashlib.sha256(der).digest())
    assert x5t_s256(client) == expected
    assert x5t_s256(quote(client, safe="")) == expected  # Envoy's `source.certificate`: URL-encoded PEM
    assert x5t_s256(der) == expected
    assert x5t_s256(base64.b64encode(der).decode()) == expected  # bare base64 DER (Traefik)
    assert certificate_der(client.encode()) == der


def test_certificate_binding_matches_the_certificate_it_names(certificates: tuple[str, str]) -> None:
    client, rogue = certificates
    bound = x5t_s256(client)
    verify_certificate_binding(bound, quote(client, safe=""))
    verify_certificate_binding(bound, client)
    for presented, detail in (
        (rogue, "certificate_mismatch"),
        (quote(rogue, safe=""), "certificate_mismatch"),
        (None, "no_certificate"),
        ("", "no_certificate"),
        ("garbage", "bad_certificate"),
        (client + rogue, "bad_certificate"),  # a chain: which one was presented is not ours to guess
        (client.replace("A", "B", 5), "bad_certificate"),
        ("%FF%FE", "bad_certificate"),
    ):
        with pytest.raises(CertificateBindingRejected) as caught:
            verify_certificate_binding(bound, presented)
        assert caught.value.detail == detail
        assert (caught.value.scheme, caught.value.error) == ("Bearer", "invalid_token")
        assert bound not in str(caught.value)


# ---- cnf, and which proof a token needs ----


def test_read_confirmation() -> None:
    jkt, x5t = EC.jkt, _b64(b"\x01" * 32)
    assert read_confirmation({"sub": "u"}) is None
    assert read_confirmation({"cnf": {"jkt": jkt}}) == Confirmation(jkt=jkt)
    assert read_confirmation({"cnf": {"x5t#S256": x5t, "jkt": jkt}}) == Confirmation(jkt, x5t)
    for cnf, detail in (
        ({"jwk": EC.public}, "unsupported_cnf"),  # RFC 7800 keys: not verified here, so refused
        ({"jkt": jkt, "kid": "k"}, "unsupported_cnf"),
        ({"jkt": "short"}, "bad_cnf"),
        ({"jkt": 1}, "bad_cnf"),
        ({}, "bad_cnf"),
        ("jkt", "bad_cnf"),
    ):
        with pytest.raises(SenderConstraintRejected) as caught:
            read_confirmation({"cnf": cnf})
        assert caught.value.detail == detail


class Request:
    """Keyword arguments of SenderConstraints.verify for one request."""

    @staticmethod
    def of(**overrides: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "required": False,
            "scheme": "dpop",
            "token": TOKEN,
            "proof": None,
            "method": "GET",
            "url": URL,
            "certificate": None,
        }
        return base | overrides


def _constraints() -> tuple[SenderConstraints, MemoryReplayCache]:
    cache = MemoryReplayCache(100, clock=FakeClock(0.0))
    return SenderConstraints(cache, clock=FakeClock(NOW)), cache


async def _refusal(constraints: SenderConstraints, confirmation: Confirmation | None, **request: Any) -> str:
    with pytest.raises(SenderConstraintRejected) as caught:
        await constraints.verify(confirmation, **Request.of(**request))
    return f"{caught.value.scheme}:{caught.value.error}:{caught.value.detail}"


async def test_a_dpop_bound_token_needs_a_fresh_proof() -> None:
    constraints, cache = _constraints()
    bound = Confirmation(jkt=EC.jkt)
    proof = EC.proof(jti="shared")
    await constraints.verify(bound, **Request.of(proof=proof))
    assert len(cache) == 1
    assert await _refusal(constraints, bound, proof=proof) == "DPoP:invalid_dpop_proof:replayed"
    assert await _refusal(constraints, bound) == "DPoP:invalid_dpop_proof:missing_proof"
    assert await _refusal(constraints, bound, scheme="bearer", proof=EC.proof()) == "DPoP:invalid_token:dpop_required"
    # The same jti under another key is another proof: a client cannot burn another's jti.
    other = HOLDERS["EdDSA"]
    await constraints.verify(Confirmation(jkt=other.jkt), **Request.of(proof=other.proof(jti="shared")))
    assert len(cache) == 2


async def test_a_proof_spelled_another_way_is_still_a_replay() -> None:
    # base64url's last character carries bits no byte uses: flipping them spells the same signature
    # differently. The replay cache keys on (key, jti), never on the proof's text, so it still knows it.
    constraints, _ = _constraints()
    bound = Confirmation(jkt=EC.jkt)
    proof = EC.proof()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    respelled = proof[:-1] + alphabet[alphabet.index(proof[-1]) ^ 1]
    assert respelled != proof
    assert base64.urlsafe_b64decode(respelled.split(".")[2] + "==") == base64.urlsafe_b64decode(
        proof.split(".")[2] + "=="
    )
    await constraints.verify(bound, **Request.of(proof=proof))
    assert await _refusal(constraints, bound, proof=respelled) == "DPoP:invalid_dpop_proof:replayed"


async def test_a_refused_proof_spends_nothing() -> None:
    constraints, cache = _constraints()
    proof = EC.proof(htm="POST")
    assert await _refusal(constraints, Confirmation(jkt=EC.jkt), proof=proof) == "DPoP:invalid_dpop_proof:htm_mismatch"
    await constraints.verify(Confirmation(jkt=EC.jkt), **Request.of(proof=proof, method="POST"))
    assert len(cache) == 1


async def test_unbound_tokens_under_each_scheme_and_mode() -> None:
    constraints, _ = _constraints()
    await constraints.verify(None, **Request.of(scheme="bearer"))
    assert await _refusal(constraints, None, scheme="bearer", required=True) == "Bearer:invalid_token:unbound_token"
    # The DPoP scheme promises a binding: an unbound token under it is refused even when optional.
    assert await _refusal(constraints, None, proof=EC.proof()) == "DPoP:invalid_token:unbound_token"


async def test_a_certificate_bound_token_needs_its_certificate(certificates: tuple[str, str]) -> None:
    client, rogue = certificates
    constraints, cache = _constraints()
    bound = Confirmation(x5t_s256=x5t_s256(client))
    await constraints.verify(bound, **Request.of(scheme="bearer", certificate=quote(client, safe="")))
    assert (
        await _refusal(constraints, bound, scheme="bearer", certificate=rogue)
        == "Bearer:invalid_token:certificate_mismatch"
    )
    assert await _refusal(constraints, bound, scheme="bearer") == "Bearer:invalid_token:no_certificate"
    # Both bindings: both proofs, and a wrong certificate leaves the proof's jti unspent.
    both = Confirmation(jkt=EC.jkt, x5t_s256=x5t_s256(client))
    proof = EC.proof()
    assert await _refusal(constraints, both, proof=proof, certificate=rogue) == (
        "Bearer:invalid_token:certificate_mismatch"
    )
    assert len(cache) == 0
    await constraints.verify(both, **Request.of(proof=proof, certificate=client))
    assert len(cache) == 1


async def test_a_full_replay_cache_is_an_outage_not_an_allow() -> None:
    cache = MemoryReplayCache(1, clock=FakeClock(0.0))
    constraints = SenderConstraints(cache, clock=FakeClock(NOW))
    await constraints.verify(Confirmation(jkt=EC.jkt), **Request.of(proof=EC.proof()))
    with pytest.raises(ReplayCacheUnavailable):
        await constraints.verify(Confirmation(jkt=EC.jkt), **Request.of(proof=EC.proof()))


async def test_the_certificate_comes_from_the_peer_or_the_configured_header_only(
    certificates: tuple[str, str],
) -> None:
    client, rogue = certificates
    bound = Confirmation(x5t_s256=x5t_s256(client))
    credential = Credential("opaque-token")
    escaped = quote(client, safe="")
    for header in ("x-client-cert", XFCC):
        constraints = SenderConstraints(MemoryReplayCache(), certificate_header=header)
        value = escaped if header != XFCC else f'By=spiffe://a;Hash=00;Cert="{escaped}";Subject="CN=envoy"'
        await constraints.check(bound, credential, HttpRequest(headers={header: value}))
        # Envoy's peer certificate comes first: a header cannot override it.
        with pytest.raises(CertificateBindingRejected):
            await constraints.check(bound, credential, HttpRequest(headers={header: value}, certificate=rogue))
    # Not configured: the header is not read at all.
    with pytest.raises(CertificateBindingRejected) as caught:
        await SenderConstraints(MemoryReplayCache()).check(bound, credential, HttpRequest(headers={XFCC: escaped}))
    assert caught.value.detail == "no_certificate"


def test_xfcc_gives_its_one_cert_only() -> None:
    assert xfcc_certificate('Hash=ab;Cert="PEM";Subject="CN=a,O=b"') == "PEM"
    assert xfcc_certificate('By=x;Cert="ONE",By=y;Cert="TWO"') == ""  # two proxies' elements: whose is it?
    assert xfcc_certificate("Hash=ab;Subject=x") == ""
