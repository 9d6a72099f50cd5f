"""Fakes for the unit tests of the core: a clock, an introspector, an IdP client, signers, a canned IdP.

Each fake implements one seam the design offers (`clock=`, the Introspector and IdpClient
protocols); the canned IdP is a real HTTP server on 127.0.0.1, for code that speaks HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from authz_service.devstack.localhttp import LocalHttpServer
from authz_service.errors import TokenRejected, UpstreamUnavailable
from authz_service.model import Confirmation, Identity, Reason
from authz_service.tokens.base import Credential

EPOCH = 1_800_000_000.0  # a fixed "now" for fake clocks (2027-01-15)


class FakeClock:
    """A clock that moves only when told to; pass it as `clock=`."""

    def __init__(self, now: float = EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Gate:
    """Holds callers until opened: a hanging IdP, without any sleep."""

    def __init__(self) -> None:
        self._opened = asyncio.Event()
        self._arrivals = asyncio.Condition()
        self.waiting = 0

    async def wait(self) -> None:
        async with self._arrivals:
            self.waiting += 1
            self._arrivals.notify_all()
        try:
            await self._opened.wait()
        finally:
            self.waiting -= 1

    async def reached(self, count: int, timeout: float = 2.0) -> None:
        """Return once `count` callers are held (bounded, in case they never arrive)."""
        async with asyncio.timeout(timeout), self._arrivals:
            await self._arrivals.wait_for(lambda: self.waiting >= count)

    def open(self) -> None:
        self._opened.set()


async def settle() -> None:
    """Let every ready task run until none is left (a few loop iterations, no wall-clock wait)."""
    for _ in range(10):
        await asyncio.sleep(0)


class FakeIntrospector:
    """An Introspector with scripted answers per token; counts the credentials it is asked about."""

    def __init__(self, ident: str, *, issuer: str | None = None) -> None:
        self.id = ident
        self.issuer = issuer
        self.key_generation = 0
        self.calls: list[Credential] = []
        self.gate: Gate | None = None
        # Until when a verification may be reused; None: the identity's expires_at (or forever).
        self.deadline: float | None = None
        self._answers: dict[str, Identity | Exception] = {}

    def vouch(
        self,
        token: str,
        user_id: str | None = "user-1",
        claims: Mapping[str, Any] | None = None,
        *,
        kind: str = "opaque",
        expires_at: float | None = None,
        confirmation: Confirmation | None = None,
    ) -> Identity:
        identity = Identity(
            user_id, dict(claims or {"sub": user_id}), self.id, kind, expires_at, confirmation=confirmation
        )
        self._answers[token] = identity
        return identity

    def reject(self, token: str, reason: Reason = Reason.INACTIVE) -> None:
        self._answers[token] = TokenRejected(reason)

    def fail(self, token: str, outcome: str = "connect_error") -> None:
        self._answers[token] = UpstreamUnavailable("introspection", outcome)

    def explode(self, token: str, error: Exception) -> None:
        self._answers[token] = error

    def rotate(self) -> None:
        """A key rotation: identities verified before must not be reused."""
        self.key_generation += 1

    @property
    def tokens_asked(self) -> list[str]:
        return [c.token for c in self.calls]

    async def introspect(self, credential: Credential) -> Identity:
        self.calls.append(credential)
        if self.gate is not None:
            await self.gate.wait()
        answer = self._answers.get(credential.token, TokenRejected(Reason.INACTIVE))
        if isinstance(answer, Exception):
            raise answer
        return answer

    def trusted_until(self, identity: Identity) -> float:
        if self.deadline is not None:
            return self.deadline
        return identity.expires_at if identity.expires_at is not None else math.inf


class FakeIdpClient:
    """An IdpClient answering a fixed document; can fail or hang on demand, counts its calls."""

    def __init__(self, document: Any = None) -> None:
        self.document = document  # the answer for every URL not in by_url
        self.by_url: dict[str, Any] = {}
        self.failure: str | None = None  # an UpstreamUnavailable outcome label
        self.gate: Gate | None = None
        self.calls: list[tuple[str, str]] = []  # (endpoint, url), counted when the call starts
        self.forms: list[Mapping[str, str]] = []

    def hang(self) -> Gate:
        self.gate = Gate()
        return self.gate

    async def _answer(self, endpoint: str, url: str) -> Any:
        gate = self.gate
        if gate is not None:
            await gate.wait()
        if self.failure is not None:
            raise UpstreamUnavailable(endpoint, self.failure)
        return self.by_url.get(url, self.document)

    async def get_json(self, endpoint: str, url: str, *, timeout: float, max_bytes: int = 1024 * 1024) -> Any:
        self.calls.append((endpoint, url))
        return await self._answer(endpoint, url)

    async def post_form(
        self, endpoint: str, url: str, form: Mapping[str, str], *, headers: Mapping[str, str], timeout: float
    ) -> Any:
        self.calls.append((endpoint, url))
        self.forms.append(dict(form))
        return await self._answer(endpoint, url)


# --------------------------------------------------------------------------- tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(header: str | Mapping[str, Any], payload: str | Mapping[str, Any], signature: bytes = b"sig") -> str:
    """A JWS compact token from raw JSON texts (so tests can write duplicates, NaN, ...) or mappings."""
    head = header if isinstance(header, str) else json.dumps(header)
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return f"{b64url(head.encode())}.{b64url(body.encode())}.{b64url(signature)}"


def hs_token(claims: Mapping[str, Any] | str, secret: bytes, *, alg: str = "HS256", **header: Any) -> str:
    """An HMAC-signed JWT with exactly the header given (no PyJWT checks: alg confusion needs that).

    Claims given as text are signed as written (duplicates, escapes), a mapping as its JSON.
    """
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    full_header = {"alg": alg, "typ": "JWT", **header}
    head = b64url(json.dumps(full_header).encode())
    body = b64url((claims if isinstance(claims, str) else json.dumps(dict(claims))).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode("ascii"), digest).digest()
    return f"{head}.{body}.{b64url(signature)}"


@dataclass
class EcSigner:
    """An ES256 key pair that signs tokens and publishes itself as a JWK."""

    kid: str | None
    private: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = dict(ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True))
        jwk.update({"use": "sig", "alg": "ES256"})
        if self.kid is not None:
            jwk["kid"] = self.kid
        return jwk

    def public_pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
        )

    def sign(self, claims: Mapping[str, Any], **header: Any) -> str:
        headers = {"kid": self.kid, **header} if self.kid is not None else header
        return jwt.encode(dict(claims), self.private, algorithm="ES256", headers=headers or None)


def jwks(*signers: EcSigner) -> dict[str, Any]:
    return {"keys": [s.jwk() for s in signers]}


# --------------------------------------------------------------------------- a canned IdP over real HTTP


@dataclass(frozen=True)
class Seen:
    """One request the canned IdP received."""

    method: str
    path: str
    headers: Mapping[str, str]
    form: Mapping[str, str]


class CannedIdp(LocalHttpServer):
    """A real HTTP server on 127.0.0.1 that answers what the test sets (Authorino's pkg/httptest).

    `answer` is served for every path; `by_token` overrides it for a POSTed form's `token`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.body: bytes = b"{}"
        self.content_type = "application/json"
        self.extra_headers: dict[str, str] = {}
        self.chunked = False  # stream the body without a Content-Length
        self.gate: Gate | None = None
        self.by_token: dict[str, Any] = {}
        self.seen: list[Seen] = []

    def answer(self, value: Any, status: int = 200) -> None:
        self.body = json.dumps(value).encode()
        self.status = status

    def hang(self) -> Gate:
        self.gate = Gate()
        return self.gate

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        form = {name: str(value) for name, value in (await request.post()).items()}
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), form))
        if self.gate is not None:
            await self.gate.wait()
        body = self.body
        token = form.get("token")
        if token is not None and token in self.by_token:
            body = json.dumps(self.by_token[token]).encode()
        if self.chunked:
            response = web.StreamResponse(status=self.status, headers=self.extra_headers)
            response.content_type = self.content_type
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, len(body), 4096):
                await response.write(body[start : start + 4096])
            await response.write_eof()
            return response
        return web.Response(status=self.status, body=body, content_type=self.content_type, headers=self.extra_headers)
