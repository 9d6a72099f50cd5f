"""Sender-constrained tokens: DPoP proofs (RFC 9449) and certificate-bound tokens (RFC 8705).

A token whose claims (or introspection answer) carry `cnf` is only good together with a proof that
the caller holds the key it names:
- `cnf.jkt`: a DPoP proof in the `DPoP` header, a JWS signed by the key whose RFC 7638 thumbprint
  is `jkt`, naming this request's method and URL, fresh, bound to this token (`ath`) and never
  seen before (`jti`, remembered in a `ReplayCache` for as long as the proof could be accepted);
- `cnf.x5t#S256`: the TLS client certificate (from Envoy's `include_peer_certificate`, or a header
  a proxy sets) must hash to it.

Everything here is pure but the replay caches. Errors carry a short label and a client-safe
description, never the proof, the token or a certificate.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

from cryptography import x509

from authz_service import paths
from authz_service.errors import AuthzError, TokenRejected
from authz_service.lru import Lru
from authz_service.model import Confirmation, HttpRequest, Reason
from authz_service.tokens.base import Credential
from authz_service.tokens.jws import parse_jwt
from authz_service.tokens.keys import EC_ALGS, OKP_ALGS, RSA_ALGS, SkippedKey, VerificationKey, read_jwk

if TYPE_CHECKING:
    import redis.asyncio as redis

MAX_PROOF_BYTES = 8192
MAX_JTI_LENGTH = 256
# A client certificate as a proxy passes it, URL-encoded (3 characters a byte at worst): a few KB
# in practice; the bound keeps a forged header from costing more than a parse of that size.
MAX_CERTIFICATE_CHARS = 32768
DPOP_TYP = "dpop+jwt"
# Asymmetric algorithms only (RFC 9449 4.3 point 5): never `none`, never HMAC (a proof must be
# verifiable from the public key it carries).
DPOP_ALGORITHMS = RSA_ALGS | EC_ALGS | OKP_ALGS
# What the `algs` parameter of a DPoP challenge advertises (RFC 9449 7.1), in a stable order.
DPOP_ALGS_ADVERTISED = " ".join(sorted(DPOP_ALGORITHMS))
# Defaults for the configuration: how old a proof may be, and how far in the future its `iat` may
# lie (the caller's clock running ahead), in seconds.
DEFAULT_PROOF_WINDOW = 60.0
DEFAULT_PROOF_LEEWAY = 5.0
DEFAULT_REPLAY_ENTRIES = 200_000  # ~35 MB at ~170 bytes an entry; 2,200 new proofs a second at 90 s
REPLAY_KEY_PREFIX = "authz:dpop:v1:"
# Proof keys loaded (read_jwk: ~110 µs, a third of a proof's cost), by their exact JWK: a client
# signs every proof with one key. ~1 KB an entry.
PROOF_KEY_ENTRIES = 4096
REDIS_OPERATION_TIMEOUT = 0.25  # seconds, as the token cache's (tokens/redis_cache.py)

# RFC 7638 3.2: the members of each key type that a thumbprint covers.
_THUMBPRINT_MEMBERS: Mapping[str, tuple[str, ...]] = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}
_SHA256_B64URL = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, base64url without padding
_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 6749 A.5 (error_description) and A.7 (error): what may stand inside a quoted challenge parameter.
_DESCRIPTION_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")
_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----")
_BASE64_BODY = re.compile(r"[A-Za-z0-9+/=\s]+")


# A refusal's detail (and scheme) -> the Reason Check answers with (model.SENDER_CHALLENGES gives
# each its WWW-Authenticate challenge).
_REASONS: Mapping[tuple[str, str], Reason] = {
    **{
        ("DPoP", reason.label.removeprefix("dpop_")): reason
        for reason in Reason
        if reason.label.startswith("dpop_") and reason is not Reason.DPOP_REPLAY_UNAVAILABLE
    },
    ("DPoP", "too_large"): Reason.DPOP_PROOF_TOO_LARGE,
    ("DPoP", "unbound_token"): Reason.DPOP_UNBOUND_TOKEN,
    ("DPoP", "dpop_required"): Reason.DPOP_REQUIRED,
    ("Bearer", "unbound_token"): Reason.SENDER_CONSTRAINT_REQUIRED,
    ("Bearer", "bad_cnf"): Reason.BAD_CNF,
    ("Bearer", "unsupported_cnf"): Reason.UNSUPPORTED_CNF,
    ("Bearer", "no_certificate"): Reason.NO_CLIENT_CERTIFICATE,
    ("Bearer", "bad_certificate"): Reason.BAD_CLIENT_CERTIFICATE,
    ("Bearer", "certificate_mismatch"): Reason.CERTIFICATE_MISMATCH,
}


class SenderConstraintRejected(TokenRejected):
    """A sender-constrained token came without a valid proof of possession (answered 401).

    `detail` is a short label for logs and tests (`htu_mismatch`); `description` is what the
    client reads; `scheme` and `error` make its WWW-Authenticate challenge; `reason` is what
    Check answers (a TokenRejected: decide.py answers it as any refused token).
    """

    scheme = "Bearer"
    error = "invalid_token"

    def __init__(self, detail: str, description: str, *, scheme: str | None = None) -> None:
        self.detail = detail
        self.description = description
        if scheme is not None:
            self.scheme = scheme
        self.reason = _REASONS[(self.scheme, detail)]
        AuthzError.__init__(self, f"{detail}: {description}")


class InvalidDPoPProof(SenderConstraintRejected):
    """The DPoP proof is missing, malformed, not for this request, stale or replayed."""

    scheme = "DPoP"
    error = "invalid_dpop_proof"


class CertificateBindingRejected(SenderConstraintRejected):
    """A certificate-bound token came without the client certificate it is bound to (RFC 8705 3)."""


class ReplayCacheUnavailable(AuthzError):
    """The replay cache cannot say whether a proof is new (answered 503: fail closed, never allow)."""

    reason = Reason.DPOP_REPLAY_UNAVAILABLE

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome  # a short label: "full", "timeout", "ConnectionError"
        super().__init__(f"DPoP replay cache unavailable: {outcome}")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two strings (of any characters)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url; ValueError for other keys."""
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise ValueError("unsupported key type")
    required = {name: jwk.get(name) for name in members}
    if not all(isinstance(value, str) for value in required.values()):
        raise ValueError("missing or non-string key member")
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def access_token_hash(token: str) -> str:
    """`ath` for a token: base64url of the SHA-256 of its ASCII bytes (RFC 9449 4.2)."""
    return _b64url(hashlib.sha256(token.encode("ascii")).digest())


def replay_key(jkt: str, jti: str) -> str:
    """The replay cache key of a proof: scoped to its key, so one client cannot burn another's `jti`."""
    digest = hashlib.sha256(f"{len(jkt)}:{jkt}:{jti}".encode("utf-8", "surrogatepass")).digest()
    return _b64url(digest)


def normal_url(url: str) -> str | None:
    """An absolute http(s) URL without query and fragment, normalized as RFC 3986 6.2.2 and 6.2.3
    say (scheme and host in lower case, no default port, the path as `paths.normalized` gives it),
    so that equivalent spellings compare equal; None when it is no such URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or parts.username is not None or parts.password is not None:
        return None
    if ":" in host:
        host = f"[{host}]"
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = paths.normalized(parts.path or "/")
    if path is None:
        return None
    return f"{scheme}://{authority}{path}"


@dataclass(frozen=True, slots=True)
class ProofClaims:
    """What a verified DPoP proof says, as far as anything after verification needs it."""

    jkt: str  # the thumbprint of the proof's key (equal to the token's cnf.jkt)
    jti: str
    iat: float
    htm: str
    htu: str

    @property
    def replay_key(self) -> str:
        return replay_key(self.jkt, self.jti)


def proof_header(headers: Mapping[str, str]) -> str | None:
    """The request's one DPoP proof (header names lower case), None without one; raise
    InvalidDPoPProof for two (Envoy joins repeated headers with `,`, which no JWS contains)."""
    value = headers.get("dpop")
    if value is None:
        return None
    if "," in value:
        raise InvalidDPoPProof("multiple_proofs", "more than one DPoP proof")
    return value.strip()


def verify_dpop_proof(
    proof: str,
    *,
    token: str,
    jkt: str,
    method: str,
    url: str,
    now: float,
    window: float,
    leeway: float,
    algorithms: frozenset[str] = DPOP_ALGORITHMS,
    keys: Lru[str, VerificationKey] | None = None,
) -> ProofClaims:
    """Verify a DPoP proof for one request per RFC 9449 4.3; raise InvalidDPoPProof otherwise.

    `jkt` is the token's `cnf.jkt`, `method` and `url` the request's (the URL's query is ignored),
    `now` epoch seconds. The proof's `jti` is not checked against a replay cache here: call
    `ReplayCache.seen` with `ProofClaims.replay_key` once this returns.
    """
    if len(proof) > MAX_PROOF_BYTES:
        raise InvalidDPoPProof("too_large", "DPoP proof too large")
    try:
        parsed = parse_jwt(proof)
    except TokenRejected as err:
        raise InvalidDPoPProof("malformed", "malformed DPoP proof") from err
    header, claims = parsed.header, parsed.claims
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() != DPOP_TYP:
        raise InvalidDPoPProof("bad_typ", "DPoP proof typ must be dpop+jwt")
    alg = parsed.alg
    if alg not in algorithms or alg not in DPOP_ALGORITHMS:
        raise InvalidDPoPProof("bad_alg", "DPoP proof algorithm not allowed")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise InvalidDPoPProof("bad_jwk", "DPoP proof has no public key")
    # The cheap checks come before the signature, so a proof that is not for this token and this
    # request costs no public-key operation. They can only refuse: nothing is accepted until the
    # signature below verifies.
    try:
        proof_jkt = thumbprint(jwk)
    except ValueError as err:
        raise InvalidDPoPProof("bad_jwk", "DPoP proof key not usable") from err
    if not _same(proof_jkt, jkt):
        raise InvalidDPoPProof("jkt_mismatch", "DPoP proof key does not match the token")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
        raise InvalidDPoPProof("bad_jti", "DPoP proof jti missing or invalid")
    htm = claims.get("htm")
    if not isinstance(htm, str) or htm != method:  # methods are case-sensitive (RFC 9110 9.1)
        raise InvalidDPoPProof("htm_mismatch", "DPoP proof htm does not match the request")
    htu = claims.get("htu")
    if not isinstance(htu, str):
        raise InvalidDPoPProof("htu_mismatch", "DPoP proof htu does not match the request")
    proof_url = normal_url(htu)
    if proof_url is None or proof_url != normal_url(url):
        raise InvalidDPoPProof("htu_mismatch", "DPoP proof htu does not match the request")
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
        raise InvalidDPoPProof("bad_iat", "DPoP proof iat missing or invalid")
    if iat < now - window:
        raise InvalidDPoPProof("stale", "DPoP proof is too old")
    if iat > now + leeway:
        raise InvalidDPoPProof("issued_in_future", "DPoP proof issued in the future")
    ath = claims.get("ath")
    if not isinstance(ath, str) or not _same(ath, access_token_hash(token)):
        raise InvalidDPoPProof("ath_mismatch", "DPoP proof is not bound to this token")
    key = _proof_key(jwk, keys)
    if alg not in key.algorithms:
        raise InvalidDPoPProof("bad_alg", "DPoP proof algorithm does not match its key")
    if not key.verify(alg, parsed.signing_input, parsed.signature):
        raise InvalidDPoPProof("bad_signature", "DPoP proof signature verification failed")
    return ProofClaims(proof_jkt, jti, float(iat), htm, htu)


def _proof_key(jwk: Mapping[str, Any], keys: Lru[str, VerificationKey] | None) -> VerificationKey:
    """The proof's public key (read_jwk: private members, weak RSA, off-curve points refused),
    from `keys` when the very same JWK (every member, canonical JSON) was loaded before."""
    exact = json.dumps(jwk, sort_keys=True, separators=(",", ":")) if keys is not None else ""
    key = keys.get(exact) if keys is not None else None
    if key is None:
        loaded = read_jwk(jwk)
        if isinstance(loaded, SkippedKey):
            raise InvalidDPoPProof("bad_jwk", "DPoP proof key not usable")
        key = loaded
        if keys is not None:
            keys.put(exact, key)
    return key


class ReplayCache(Protocol):
    """Remembers DPoP proofs (by `replay_key`) for as long as they could be accepted."""

    async def seen(self, jti_key: str, ttl: float) -> bool:
        """Remember `jti_key` for `ttl` seconds unless it is remembered already (atomically);
        True means it was: a replay. Raise ReplayCacheUnavailable when it cannot tell."""
        ...


def replay_ttl(window: float, leeway: float) -> float:
    """How long a proof must be remembered: one accepted at `now` has `iat <= now + leeway` and
    stays acceptable until `iat + window`. Computed once, from the config."""
    return window + leeway


class MemoryReplayCache:
    """A process's replay cache: at most `max_entries` proofs, each until its deadline (monotonic).

    Full of proofs that are all still live, it refuses to remember another (ReplayCacheUnavailable,
    503) rather than evict one: forgetting a live `jti` would let that proof be replayed. Only a
    caller holding a valid bound token and its key can add entries, so filling it takes a client
    that can authenticate; size the bound for the proof rate times `replay_ttl`.
    """

    def __init__(self, max_entries: int = DEFAULT_REPLAY_ENTRIES, clock: Callable[[], float] = time.monotonic) -> None:
        # Entries are inserted in time order with the same ttl (from the config), so the oldest
        # first is also the first to expire: expired ones are dropped from the front.
        self._entries: Lru[str, float] = Lru(max_entries)
        self._max = max_entries
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    async def seen(self, jti_key: str, ttl: float) -> bool:
        now = self._clock()
        entries = self._entries
        deadline = entries.peek(jti_key)
        if deadline is not None and deadline > now:
            return True
        # A couple of expired entries go on every insert, so memory follows the live proofs.
        self._drop_expired(now, 2)
        if deadline is None and len(entries) >= self._max:
            self._drop_expired(now, None)
            if len(entries) >= self._max:
                raise ReplayCacheUnavailable("full")
        entries.put(jti_key, now + ttl)  # never past the bound: Lru.put never evicts here
        return False

    def _drop_expired(self, now: float, limit: int | None) -> None:
        """Forget the expired entries at the front (the oldest), at most `limit` of them."""
        entries = self._entries
        expired: list[str] = []
        for key in itertools.islice(entries, limit):
            deadline = entries.peek(key)
            if deadline is None or deadline > now:
                break
            expired.append(key)
        for key in expired:
            entries.discard(key)


class RedisReplayCache:
    """The replay cache on a Redis shared by every worker and replica: `SET key 1 NX PX ttl`.

    A Redis that cannot answer is ReplayCacheUnavailable (503): unlike the token cache, where a
    failing Redis is a miss, a replay check that cannot be made must not pass.
    """

    def __init__(
        self, client: redis.Redis, prefix: str = REPLAY_KEY_PREFIX, timeout: float = REDIS_OPERATION_TIMEOUT
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._timeout = timeout

    async def seen(self, jti_key: str, ttl: float) -> bool:
        key, ttl_ms = self._prefix + jti_key, max(1, math.ceil(ttl * 1000))
        try:
            async with asyncio.timeout(self._timeout):
                created = await self._client.set(key, b"1", nx=True, px=ttl_ms)
        except TimeoutError as err:
            raise ReplayCacheUnavailable("timeout") from err
        except Exception as err:  # any client or connection error: fail closed
            raise ReplayCacheUnavailable(type(err).__name__) from err
        return not created


def www_authenticate_dpop(error: str | None = None, description: str | None = None, *, realm: str | None = None) -> str:
    """A `DPoP` challenge (RFC 9449 7.1): `DPoP error="invalid_dpop_proof", algs="ES256 ..."`.

    `error` must be an RFC 6749 error code; characters a quoted parameter cannot hold are dropped
    from `description`."""
    params: list[str] = []
    if realm is not None:
        params.append(f'realm="{_DESCRIPTION_UNSAFE.sub("", realm)}"')
    if error is not None:
        if not _ERROR_CODE.fullmatch(error):
            raise ValueError("not an OAuth error code")
        params.append(f'error="{error}"')
        if description:
            params.append(f'error_description="{_DESCRIPTION_UNSAFE.sub("", description)}"')
    params.append(f'algs="{DPOP_ALGS_ADVERTISED}"')
    return "DPoP " + ", ".join(params)


def certificate_der(certificate: str | bytes) -> bytes:
    """The DER bytes of one client certificate: PEM (URL-encoded, as Envoy's `source.certificate`
    and nginx's `$ssl_client_escaped_cert` send it, or plain), bare base64 DER (Traefik), or DER.

    ValueError unless it holds exactly one certificate."""
    if len(certificate) > MAX_CERTIFICATE_CHARS:
        raise ValueError("certificate too large")
    if isinstance(certificate, bytes):
        if certificate[:1] == b"\x30":  # a DER SEQUENCE
            return _parsed_certificate(certificate)
        certificate = certificate.decode("ascii")
    # Percent-decoding only (never `+` to space): `+` is a base64 character of the PEM body.
    text = unquote(certificate, errors="strict")
    blocks = _PEM_CERTIFICATE.findall(text)
    if len(blocks) > 1:
        raise ValueError("more than one certificate")
    if blocks:
        body = blocks[0]
    elif "-----" not in text and _BASE64_BODY.fullmatch(text):
        body = text
    else:
        raise ValueError("not a PEM certificate")
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except ValueError as err:
        raise ValueError("not a PEM certificate") from err
    return _parsed_certificate(der)


def _parsed_certificate(der: bytes) -> bytes:
    x509.load_der_x509_certificate(der)  # ValueError unless it is one well-formed certificate
    return der


def x5t_s256(certificate: str | bytes) -> str:
    """`x5t#S256` of a certificate (RFC 8705 3.1): base64url of the SHA-256 of its DER."""
    return _b64url(hashlib.sha256(certificate_der(certificate)).digest())


def verify_certificate_binding(cnf_x5t: str, certificate: str | bytes | None) -> None:
    """Raise CertificateBindingRejected unless `certificate` (see `certificate_der`) is the one
    the token's `cnf.x5t#S256` names."""
    if not certificate:
        raise CertificateBindingRejected("no_certificate", "the token is bound to a client certificate")
    try:
        presented = x5t_s256(certificate)
    except (ValueError, UnicodeError) as err:
        raise CertificateBindingRejected("bad_certificate", "the client certificate is unreadable") from err
    if not _same(presented, cnf_x5t):
        raise CertificateBindingRejected("certificate_mismatch", "the token is bound to another certificate")


def read_confirmation(claims: Mapping[str, Any]) -> Confirmation | None:
    """The token's confirmation, None when it has no `cnf`; raise SenderConstraintRejected for a
    `cnf` we cannot verify (a `jwk`, `kid`, ... or a malformed one): an unchecked binding is no binding."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    if not isinstance(cnf, dict) or not cnf:
        raise SenderConstraintRejected("bad_cnf", "the token's confirmation is malformed")
    jkt, x5t = cnf.get("jkt"), cnf.get("x5t#S256")
    if any(name not in ("jkt", "x5t#S256") for name in cnf):
        raise SenderConstraintRejected("unsupported_cnf", "the token's confirmation method is not supported")
    for value in (jkt, x5t):
        if value is not None and not (isinstance(value, str) and _SHA256_B64URL.fullmatch(value)):
            raise SenderConstraintRejected("bad_cnf", "the token's confirmation is malformed")
    return Confirmation(jkt, x5t)


def confirmation_of(claims: Mapping[str, Any], *, required: bool) -> Confirmation | None:
    """`read_confirmation`, and for an introspector with `sender_constraint: required` a refusal
    (401 `sender_constraint_required`) of a token without `cnf`. Depends only on the token and the
    config: the introspectors call it, so an identity the verified-token cache keeps has passed it."""
    confirmation = read_confirmation(claims)
    if confirmation is None and required:
        raise SenderConstraintRejected("unbound_token", "the token must be sender-constrained")
    return confirmation


class SenderConstraints:
    """Checks a verified token's binding against one request; built once per config.

    Which proof a token needs follows from its `cnf` and the Authorization scheme it came with:
    - `cnf.jkt`: the `DPoP` scheme and a valid, fresh, unreplayed DPoP proof (a bound token sent
      as `Bearer` is refused, RFC 9449 7.2);
    - `cnf.x5t#S256`: the client certificate it names, under either scheme (RFC 8705 3);
    - no `cnf`: refused under the `DPoP` scheme (it promises a binding, RFC 9449 7.1) and when the
      introspector says `sender_constraint: required`, else accepted as a plain bearer token.
    """

    def __init__(
        self,
        replay: ReplayCache,
        *,
        window: float = DEFAULT_PROOF_WINDOW,
        leeway: float = DEFAULT_PROOF_LEEWAY,
        algorithms: frozenset[str] = DPOP_ALGORITHMS,
        certificate_header: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._replay = replay
        self._certificate_header = certificate_header
        self._window = window
        self._leeway = leeway
        self._algorithms = algorithms
        self._keys: Lru[str, VerificationKey] = Lru(PROOF_KEY_ENTRIES)
        self._ttl = replay_ttl(window, leeway)
        self._clock = clock

    async def verify(
        self,
        confirmation: Confirmation | None,
        *,
        required: bool,
        scheme: str,
        token: str,
        proof: str | None,
        method: str,
        url: str,
        certificate: str | None,
    ) -> None:
        """Return when the request proves possession as the token demands; raise
        SenderConstraintRejected (401) or ReplayCacheUnavailable (503) otherwise.

        `scheme` is the Authorization scheme in lower case (`bearer`, `dpop`), `proof` the DPoP
        header (`proof_header`), `certificate` the client certificate as the proxy passed it."""
        dpop = scheme == "dpop"
        if confirmation is None or (dpop and confirmation.jkt is None):
            if dpop:
                raise SenderConstraintRejected("unbound_token", "the token is not bound to a DPoP key", scheme="DPoP")
            if required:
                raise SenderConstraintRejected("unbound_token", "the token must be sender-constrained")
            return
        if confirmation.x5t_s256 is not None:
            # First: it costs no state, so a failed certificate check never spends the proof's jti.
            verify_certificate_binding(confirmation.x5t_s256, certificate)
        if confirmation.jkt is None:
            return
        if not dpop:
            raise SenderConstraintRejected(
                "dpop_required", "the token is bound to a key and needs a DPoP proof", scheme="DPoP"
            )
        if proof is None:
            raise InvalidDPoPProof("missing_proof", "DPoP proof required")
        claims = verify_dpop_proof(
            proof,
            token=token,
            jkt=confirmation.jkt,
            method=method,
            url=url,
            now=self._clock(),
            window=self._window,
            leeway=self._leeway,
            algorithms=self._algorithms,
            keys=self._keys,
        )
        if await self._replay.seen(claims.replay_key, self._ttl):
            raise InvalidDPoPProof("replayed", "DPoP proof already used")

    async def check(self, confirmation: Confirmation | None, credential: Credential, request: HttpRequest) -> None:
        """`verify` for one Check: the proof, method and URL (RFC 9449 4.3: scheme, host and path,
        without query and fragment) and the client certificate of `request` (Envoy's peer
        certificate, else the configured header a proxy sets)."""
        await self.verify(
            confirmation,
            required=False,  # enforced when the token was verified (confirmation_of)
            scheme=credential.scheme,
            token=credential.token,
            proof=credential.proof,
            method=request.method,
            url=f"{request.scheme or 'http'}://{request.host}{request.path}",
            certificate=request.certificate or self._header_certificate(request.headers),
        )

    def _header_certificate(self, headers: Mapping[str, str]) -> str | None:
        name = self._certificate_header
        if name is None:
            return None
        value = headers.get(name)
        if value is None or name != XFCC:
            return value
        return xfcc_certificate(value)


XFCC = "x-forwarded-client-cert"
_XFCC_CERT = re.compile(r'(?:^|[;,])\s*Cert="([^"]*)"', re.IGNORECASE)


def xfcc_certificate(value: str) -> str:
    """The `Cert` of an x-forwarded-client-cert value Envoy set (`forward_client_cert_details`
    with `set_current_client_cert_details: {cert: true}`): URL-encoded PEM. A value with no Cert,
    or with more than one (elements of several proxies), gives "", which no binding accepts:
    which one is the client's cannot be told for certain."""
    found = _XFCC_CERT.findall(value)
    return found[0] if len(found) == 1 else ""
