"""Sender-constrained tokens through Check (issue 23 item 4), gRPC and HTTP mode, real servers: a
real IdP mints tokens with `cnf`, jwcrypto (a second JOSE library) mints the DPoP proofs (RFC 9449),
and certificate-bound tokens (RFC 8705) are checked against Envoy's `source.certificate` or the
configured header a proxy sets."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc
import pytest
import redis.asyncio  # noqa: F401  # imported up front: the service's first import of it would block the test's loop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from jwcrypto import jwk, jws  # type: ignore[import-untyped]  # no type information shipped

from authz_service.tokens.dpop import access_token_hash
from tests.certs import make_pki
from tests.conftest import Spawn, StartService, free_port, jwks_introspector, opaque_introspector
from tests.harness import Answer, AuthorizationClient, Harness, check_request
from tests.hostile_idp import HostileIdentityProvider

HOST = "api.example.com"
PATH = "/fhir/Patient"
URL = f"http://{HOST}{PATH}"  # what gRPC (scheme http) and HTTP mode (no x-forwarded-proto) judge
CERT_HEADER = "x-client-cert"
INVALID_PROOF = 'DPoP error="invalid_dpop_proof"'


class Holder:
    """A client's DPoP key, in jwcrypto, minting proofs for a token."""

    def __init__(self, alg: str = "ES256") -> None:
        self.key = jwk.JWK.generate(kty="EC", crv="P-256")
        self.alg = alg
        self.jkt: str = self.key.thumbprint()

    def proof(self, token: str, *, header: Mapping[str, Any] | None = None, **claims: Any) -> str:
        payload: dict[str, Any] = {
            "jti": str(uuid.uuid4()),
            "htm": "GET",
            "htu": URL + "?page=2",  # the query is not compared (RFC 9449 4.3)
            "iat": int(time.time()),
            "ath": access_token_hash(token),
            **claims,
        }
        protected = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.key.export_public(as_dict=True), **(header or {})}
        signed = jws.JWS(json.dumps(payload))
        signed.add_signature(self.key, alg=self.alg, protected=json.dumps(protected))
        return str(signed.serialize(compact=True))


@dataclass
class Reply:
    """What a client of either mode sees."""

    status: int
    challenge: str


class Via:
    """Sends the original request through gRPC Check or HTTP mode's /ext_authz."""

    def __init__(self, mode: str, harness: Harness, session: aiohttp.ClientSession) -> None:
        self.mode = mode
        self.harness = harness
        self.session = session

    async def send(
        self,
        token: str,
        *,
        scheme: str = "DPoP",
        proof: str | None = None,
        method: str = "GET",
        certificate: str | None = None,
    ) -> Reply:
        headers = {"authorization": f"{scheme} {token}"}
        if proof is not None:
            headers["dpop"] = proof
        if self.mode == "grpc":
            request = check_request(PATH + "?page=2", method=method, headers=headers, host=HOST)
            if certificate is not None:  # Envoy's include_peer_certificate: URL-encoded PEM
                request.attributes.source.certificate = quote(certificate, safe="")
            answer = Answer.of(await self.harness.stub.Check(request, timeout=10))
            return Reply(answer.http_status, answer.headers.get("www-authenticate", ""))
        assert self.harness.service.http is not None
        if certificate is not None:  # as nginx's $ssl_client_escaped_cert
            headers[CERT_HEADER] = quote(certificate, safe="")
        target = f"http://127.0.0.1:{self.harness.service.http.port}/ext_authz{PATH}?page=2"
        async with self.session.request(method, target, headers={**headers, "host": HOST}) as response:
            return Reply(response.status, response.headers.get("www-authenticate", ""))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A client certificate and another one (a rogue CA's), as PEM."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    return Path(pki.client_cert).read_text(), Path(pki.rogue_cert).read_text()


def x5t(pem: str) -> str:
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def config(idp: HostileIdentityProvider, **introspector: Any) -> dict[str, Any]:
    return {
        "server": {"grpc_address": "127.0.0.1:0", "admin_address": None, "http_address": "127.0.0.1:0"},
        "introspectors": [jwks_introspector(idp, **introspector), opaque_introspector(idp)],
        "sender_constraints": {"client_certificate_header": CERT_HEADER},
    }


@pytest.fixture(params=["grpc", "http"])
async def via(
    request: pytest.FixtureRequest,
    idp: HostileIdentityProvider,
    start_service: StartService,
    session: aiohttp.ClientSession,
) -> Via:
    return Via(request.param, await start_service(config(idp)), session)


async def test_a_valid_proof_allows_and_its_replay_is_refused(idp: HostileIdentityProvider, via: Via) -> None:
    holder = Holder()
    token = idp.mint({"cnf": {"jkt": holder.jkt}})
    proof = holder.proof(token)
    assert (await via.send(token, proof=proof)).status == 200
    # A fresh proof for every request: the verified-token cache never stands in for one.
    assert (await via.send(token, proof=holder.proof(token))).status == 200
    replayed = await via.send(token, proof=proof)
    assert replayed.status == 401
    assert replayed.challenge.startswith(INVALID_PROOF)
    assert 'error_description="DPoP proof already used"' in replayed.challenge
    assert 'algs="' in replayed.challenge
    assert "ES256" in replayed.challenge


async def test_each_broken_proof_is_a_401_with_the_dpop_challenge(idp: HostileIdentityProvider, via: Via) -> None:
    holder, other = Holder(), Holder()
    token = idp.mint({"cnf": {"jkt": holder.jkt}})
    now = int(time.time())
    cases = {
        "wrong htu": (holder.proof(token, htu=f"http://{HOST}/fhir/Observation"), "htu does not match"),
        "wrong host": (holder.proof(token, htu=f"http://evil.example{PATH}"), "htu does not match"),
        "wrong htm": (holder.proof(token, htm="POST"), "htm does not match"),
        "stale iat": (holder.proof(token, iat=now - 120), "too old"),
        "future iat": (holder.proof(token, iat=now + 60), "issued in the future"),
        "thumbprint mismatch": (other.proof(token), "key does not match the token"),
        "wrong ath": (holder.proof(token, ath=access_token_hash("another-token")), "not bound to this token"),
        "typ not dpop+jwt": (holder.proof(token, header={"typ": "JWT"}), "typ must be dpop+jwt"),
        "alg none": (_unsigned(holder.proof(token)), "algorithm not allowed"),
        "alg HS256": (_hs256(token), "algorithm not allowed"),
        "not a JWS": ("not-a-proof", "malformed DPoP proof"),
    }
    for name, (proof, description) in cases.items():
        reply = await via.send(token, proof=proof)
        assert reply.status == 401, name
        assert reply.challenge.startswith(INVALID_PROOF), (name, reply.challenge)
        assert description in reply.challenge, (name, reply.challenge)
        assert proof not in reply.challenge, name
        assert token not in reply.challenge, name
    # None of those spent anything: a good proof still passes.
    assert (await via.send(token, proof=holder.proof(token))).status == 200


async def test_a_dpop_token_needs_the_dpop_scheme_and_a_proof(idp: HostileIdentityProvider, via: Via) -> None:
    holder = Holder()
    token = idp.mint({"cnf": {"jkt": holder.jkt}})
    as_bearer = await via.send(token, scheme="Bearer", proof=holder.proof(token))
    assert as_bearer.status == 401
    assert as_bearer.challenge.startswith('DPoP error="invalid_token"')  # RFC 9449 7.2
    without_proof = await via.send(token)
    assert (without_proof.status, without_proof.challenge.startswith(INVALID_PROOF)) == (401, True)
    assert "DPoP proof required" in without_proof.challenge
    # The DPoP scheme promises a binding: a plain bearer token sent with it is refused.
    plain = idp.mint()
    unbound = await via.send(plain, proof=holder.proof(plain))
    assert (unbound.status, unbound.challenge.startswith('DPoP error="invalid_token"')) == (401, True)
    assert (await via.send(plain, scheme="Bearer")).status == 200  # optional: unbound tokens pass


async def test_an_opaque_token_bound_by_its_introspection_answer(idp: HostileIdentityProvider, via: Via) -> None:
    holder = Holder()
    token = idp.issue_opaque({"cnf": {"jkt": holder.jkt}})
    assert (await via.send(token, proof=holder.proof(token))).status == 200
    # The cached introspection answer keeps its binding: still no entry without a proof.
    refused = await via.send(token, proof=Holder().proof(token))
    assert (refused.status, refused.challenge.startswith(INVALID_PROOF)) == (401, True)
    assert (await via.send(token, scheme="Bearer")).status == 401
    assert (await via.send(token, proof=holder.proof(token))).status == 200


async def test_a_certificate_bound_token_needs_its_certificate(
    idp: HostileIdentityProvider, via: Via, certificates: tuple[str, str]
) -> None:
    """gRPC: Envoy's include_peer_certificate (source.certificate); HTTP: the configured header."""
    client, rogue = certificates
    token = idp.mint({"cnf": {"x5t#S256": x5t(client)}})
    assert (await via.send(token, scheme="Bearer", certificate=client)).status == 200
    for certificate, description in ((rogue, "bound to another certificate"), (None, "bound to a client certificate")):
        reply = await via.send(token, scheme="Bearer", certificate=certificate)
        assert reply.status == 401, description
        assert reply.challenge.startswith('Bearer realm="authz-service", error="invalid_token"'), reply.challenge
        assert description in reply.challenge


async def test_required_refuses_a_token_without_cnf(
    idp: HostileIdentityProvider, start_service: StartService, session: aiohttp.ClientSession
) -> None:
    harness = await start_service(config(idp, sender_constraint="required"))
    holder = Holder()
    bound = idp.mint({"cnf": {"jkt": holder.jkt}})
    for mode in ("grpc", "http"):
        via = Via(mode, harness, session)
        reply = await via.send(idp.mint(), scheme="Bearer")
        assert reply.status == 401, mode
        assert "the token must be sender-constrained" in reply.challenge, mode
        assert (await via.send(bound, proof=holder.proof(bound))).status == 200, mode


async def test_a_replay_at_another_process_sharing_redis_is_refused(
    idp: HostileIdentityProvider, spawn: Spawn, redis_url: str
) -> None:
    settings = {"introspectors": [jwks_introspector(idp)], "cache": {"backend": "redis", "url": redis_url}}
    first, second = await spawn(settings), await spawn(settings)
    holder = Holder()
    token = idp.mint({"cnf": {"jkt": holder.jkt}})
    proof = holder.proof(token)
    headers = {"authorization": f"DPoP {token}", "dpop": proof}
    answers = []
    for spawned in (first, second):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{spawned.port}") as channel:
            request = check_request(PATH + "?page=2", headers=headers, host=HOST)
            answers.append(Answer.of(await AuthorizationClient(channel).Check(request, timeout=10)))
    assert answers[0].allowed
    assert (answers[1].http_status, answers[1].response.status.message) == (401, "dpop_replayed")


def _unsigned(proof: str) -> str:
    """The proof re-headed as `alg: none`, signature dropped."""
    head, payload, _ = proof.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))) | {"alg": "none"}
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{encoded}.{payload}."


def _hs256(token: str) -> str:
    """A proof MACed with a shared secret (its `jwk` an oct key): never a proof of possession."""
    key = jwk.JWK.generate(kty="oct", size=256)
    payload = {
        "jti": str(uuid.uuid4()),
        "htm": "GET",
        "htu": URL,
        "iat": int(time.time()),
        "ath": access_token_hash(token),
    }
    protected = {"typ": "dpop+jwt", "alg": "HS256", "jwk": {"kty": "oct", "k": "AAAA"}}
    signed = jws.JWS(json.dumps(payload))
    signed.add_signature(key, alg="HS256", protected=json.dumps(protected))
    return str(signed.serialize(compact=True))


async def test_a_replay_cache_that_cannot_answer_fails_closed(
    idp: HostileIdentityProvider, start_service: StartService
) -> None:
    """Redis unreachable: the token cache misses (the IdP is asked), the replay check cannot be
    made, so a valid proof is a 503, never an allow."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    harness = await start_service({**config(idp), "cache": {"backend": "redis", "url": dead}})
    holder = Holder()
    token = idp.mint({"cnf": {"jkt": holder.jkt}})
    request = check_request(PATH, headers={"authorization": f"DPoP {token}", "dpop": holder.proof(token)}, host=HOST)
    answer = Answer.of(await harness.stub.Check(request, timeout=10))
    assert (answer.http_status, answer.response.status.message) == (503, "dpop_replay_unavailable")
    assert (await harness.check(token=idp.mint())).allowed  # plain bearer tokens never ask it


async def test_forward_auth_checks_the_proof_against_the_forwarded_request(
    idp: HostileIdentityProvider, start_service: StartService, session: aiohttp.ClientSession
) -> None:
    """nginx and Traefik: htm and htu are the X-Forwarded-* request's (scheme, host, path)."""
    harness = await start_service(config(idp))
    assert harness.service.http is not None
    holder = Holder()
    token = idp.mint({"cnf": {"jkt": holder.jkt}})
    forwarded = {
        "x-forwarded-method": "POST",
        "x-forwarded-proto": "https",
        "x-forwarded-host": HOST,
        "x-forwarded-uri": PATH + "?page=2",
        "authorization": f"DPoP {token}",
    }
    target = f"http://127.0.0.1:{harness.service.http.port}/forward_auth"

    async def status(proof: str) -> tuple[int, str]:
        async with session.get(target, headers={**forwarded, "dpop": proof}) as response:
            return response.status, response.headers.get("www-authenticate", "")

    proof = holder.proof(token, htm="POST", htu=f"https://{HOST}{PATH}")
    assert (await status(proof))[0] == 200
    assert (await status(proof))[0] == 401  # replayed
    refused, challenge = await status(holder.proof(token, htm="POST"))  # http://, the proxy said https
    assert refused == 401
    assert "htu does not match" in challenge
