"""A small, real development identity provider (JWKS + RFC 7662 introspection) over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import enum
import hmac
import json
import secrets
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from urllib.parse import quote_plus, unquote_plus

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authz_service.devstack.localhttp import LocalHttpServer

__all__ = [
    "CLIENT_AUTH_METHODS",
    "DISCOVERY_PATH",
    "INTROSPECT_PATH",
    "JWKS_PATH",
    "KEY_KID",
    "TOKEN_PATH",
    "DevIdentityProvider",
    "Kid",
    "main",
]

TOKEN_PATH: Final = "/token"
DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
JWKS_PATH: Final = "/.well-known/jwks.json"
INTROSPECT_PATH: Final = "/introspect"

# RFC 6749 2.3.1: how a client may authenticate to the introspection endpoint (RFC 7662 2.1).
CLIENT_AUTH_METHODS: Final = frozenset({"client_secret_basic", "client_secret_post"})

_FAMILY_BY_ALG: Final = {
    "HS256": "HS",
    "HS384": "HS",
    "HS512": "HS",
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "EdDSA": "OKP",
}
_JWK_ALG_BY_FAMILY: Final = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class _Default(enum.Enum):
    """Sentinel type for "use the key's own kid"."""

    KEY_KID = enum.auto()


KEY_KID: Final = _Default.KEY_KID
Kid: TypeAlias = str | _Default | None  # a kid header value, KEY_KID for the key's own, None for none


@dataclass(frozen=True)
class _SigningKey:
    """One asymmetric signing key and its identifier."""

    family: str
    kid: str
    private: PrivateKey


def _b64url(data: bytes) -> str:
    """Base64url without padding, as JOSE wants it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_b64url(value: int, length: int | None = None) -> str:
    """Big-endian base64url of an integer (fixed length when given, minimal otherwise)."""
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return _b64url(value.to_bytes(size, "big"))


def _family(alg: str) -> str:
    """Key family for a JWS alg, or ValueError."""
    try:
        return _FAMILY_BY_ALG[alg]
    except KeyError:
        raise ValueError(f"unsupported alg {alg!r}") from None


def _new_key(family: str) -> _SigningKey:
    """Generate a fresh key of an asymmetric family."""
    private: PrivateKey
    if family == "RSA":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif family == "EC":
        private = ec.generate_private_key(ec.SECP256R1())
    elif family == "OKP":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"no key pairs for family {family!r}")
    return _SigningKey(family=family, kid=secrets.token_urlsafe(8), private=private)


def _public_jwk(key: _SigningKey) -> dict[str, Any]:
    """Public JWK for a signing key."""
    jwk: dict[str, Any] = {"kid": key.kid, "use": "sig", "alg": _JWK_ALG_BY_FAMILY[key.family]}
    private = key.private
    if isinstance(private, rsa.RSAPrivateKey):
        numbers = private.public_key().public_numbers()
        jwk.update(kty="RSA", n=_int_b64url(numbers.n), e=_int_b64url(numbers.e))
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        point = private.public_key().public_numbers()
        jwk.update(kty="EC", crv="P-256", x=_int_b64url(point.x, 32), y=_int_b64url(point.y, 32))
    else:
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk.update(kty="OKP", crv="Ed25519", x=_b64url(raw))
    return jwk


class DevIdentityProvider(LocalHttpServer):
    """JWKS, discovery, token minting and RFC 7662 introspection with client authentication.

    Only well-formed answers and well-formed tokens: the hostile modes (broken documents, `alg:
    none`, forged headers) live in the tests (tests/hostile_idp.py), not in the wheel.
    """

    def __init__(
        self,
        issuer: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        client_id: str = "authz-service",
        client_secret: str = "demo-secret",
    ) -> None:
        """Generate keys and secrets; nothing listens until start()."""
        self._issuer = issuer
        super().__init__(host, port)
        self.client_id = client_id
        self.client_secret = client_secret
        self.hmac_secret: str = secrets.token_urlsafe(48)
        self.hits: collections.Counter[str] = collections.Counter()
        self.delay: float = 0.0  # seconds every answer waits: a slow IdP
        # The client authentication methods the introspection endpoint accepts (RFC 6749 2.3.1);
        # a request using another one, two at once, or none is refused with 401 invalid_client.
        self.client_auth_methods: frozenset[str] = CLIENT_AUTH_METHODS
        self.last_client_auth: str | None = None  # the method the last introspection request used
        self.publish_kids = True  # False: the JWKS publishes its keys without `kid`
        self._current: dict[str, _SigningKey] = {family: _new_key(family) for family in ("RSA", "EC", "OKP")}
        self._retired: list[_SigningKey] = []
        self._opaque: dict[str, dict[str, Any]] = {}

    # -- lifecycle -----------------------------------------------------------------

    async def go_offline(self) -> None:
        """Simulate an outage: the port refuses connections until go_online()."""
        await self.stop()

    async def go_online(self) -> None:
        """End a simulated outage, serving again on the same port."""
        if self._bound_port is None:
            raise RuntimeError("identity provider was never started")
        if self._runner is None:
            await self.start()

    @property
    def issuer(self) -> str:
        """The iss value; defaults to url."""
        return self._issuer if self._issuer is not None else self.url

    @property
    def discovery_url(self) -> str:
        """OpenID Provider metadata URL (OIDC Discovery 1.0): the issuer plus the well-known path."""
        return self.issuer.rstrip("/") + DISCOVERY_PATH

    @property
    def jwks_uri(self) -> str:
        """JWKS endpoint URL."""
        return self.url + JWKS_PATH

    @property
    def introspection_url(self) -> str:
        """RFC 7662 introspection endpoint URL."""
        return self.url + INTROSPECT_PATH

    @property
    def introspection_authorization(self) -> str:
        """The Authorization header of client_secret_basic (RFC 6749 2.3.1: id and secret
        form-urlencoded, then joined with ':' and base64-encoded)."""
        raw = f"{quote_plus(self.client_id, safe='')}:{quote_plus(self.client_secret, safe='')}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _client_auth(self, headers: Mapping[str, str], form: Mapping[str, Any]) -> str | None:
        """The method by which the request authenticated as our client (RFC 6749 2.3.1), or None
        when it did not: wrong credentials, an unaccepted method, none, or more than one (2.3)."""
        methods: list[tuple[str, str, str]] = []
        authorization = headers.get("Authorization")
        if authorization is not None:
            scheme, _, encoded = authorization.partition(" ")
            if scheme.lower() != "basic":
                return None
            try:
                pair = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return None
            client_id, colon, secret = pair.partition(":")
            if not colon:
                return None
            methods.append(("client_secret_basic", unquote_plus(client_id), unquote_plus(secret)))
        if "client_id" in form or "client_secret" in form:
            methods.append(("client_secret_post", str(form.get("client_id", "")), str(form.get("client_secret", ""))))
        if len(methods) != 1:
            return None
        [(method, client_id, secret)] = methods
        if method not in self.client_auth_methods:
            return None
        matches = hmac.compare_digest(client_id.encode(), self.client_id.encode())
        matches &= hmac.compare_digest(secret.encode(), self.client_secret.encode())
        return method if matches else None

    # -- keys and tokens -------------------------------------------------------------

    def _key_for(self, alg: str) -> _SigningKey:
        """Current key of the asymmetric family that signs alg."""
        family = _family(alg)
        if family not in self._current:
            raise ValueError(f"alg {alg!r} has no key pair")
        return self._current[family]

    def kid(self, alg: str = "RS256") -> str:
        """kid of the current key that signs alg."""
        return self._key_for(alg).kid

    def public_pem(self, alg: str) -> str:
        """SubjectPublicKeyInfo PEM of the current key that signs alg."""
        public = self._key_for(alg).private.public_key()
        return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(
            "ascii"
        )

    def rotate(self, alg: str = "RS256", keep_old: bool = False) -> str:
        """Replace the current key of alg's family; return the new kid."""
        old = self._key_for(alg)
        if keep_old:
            self._retired.append(old)
        else:
            # Also forget earlier kept keys of this family: rotation without keep_old is a clean cut.
            self._retired = [key for key in self._retired if key.family != old.family]
        new = _new_key(old.family)
        self._current[old.family] = new
        return new.kid

    def jwks(self) -> dict[str, Any]:
        """Public JWK set: current keys plus keys kept by rotate(keep_old=True); without their
        `kid` when `publish_kids` is off (tokens still name one, as some providers' do)."""
        keys = [_public_jwk(key) for key in [*self._current.values(), *self._retired]]
        if not self.publish_kids:
            for jwk in keys:
                del jwk["kid"]
        return {"keys": keys}

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        alg: str = "RS256",
        kid: Kid = KEY_KID,
        ttl: float = 300,
        key: Any = None,
    ) -> str:
        """Sign a JWT that lives exactly `ttl` seconds from now; claims override the defaults and a
        None claim removes it. `key` signs instead of the published key (a forgery the demo shows)."""
        payload = self.payload(claims, ttl)
        return jwt.encode(payload, self._signing_key(alg, key), algorithm=alg, headers=self._header(alg, kid) or None)

    def payload(self, claims: Mapping[str, Any] | None, ttl: float) -> dict[str, Any]:
        """The payload mint() signs: defaults for this issuer, overridden by `claims` (None removes)."""
        # Not truncated to whole seconds: int(time.time()) + ttl would expire up to a second early
        # (a ttl=1 token issued at x.99 s lived 0.01 s). NumericDate allows fractions (RFC 7519 §2).
        now = time.time()
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "user-1",
            "aud": "authz-service",
            "iat": now,
            "exp": now + ttl,
            "jti": secrets.token_urlsafe(12),
        }
        payload.update(claims or {})
        return {name: value for name, value in payload.items() if value is not None}

    def _header(self, alg: str, kid: Kid) -> dict[str, Any]:
        """The JOSE header fields beyond `alg` and `typ`: the kid asked for (KEY_KID: the key's own)."""
        family = _family(alg)
        if kid is KEY_KID:
            return {"kid": self._current[family].kid} if family in self._current else {}
        return {} if kid is None else {"kid": kid}

    def _signing_key(self, alg: str, key: Any) -> Any:
        """The key that signs alg: `key` when given, else the current key pair or the HMAC secret."""
        if key is not None:
            return key
        family = _family(alg)
        return self.hmac_secret if family == "HS" else self._current[family].private

    def issue_opaque(
        self, claims: Mapping[str, Any] | None = None, *, ttl: float = 300, token: str | None = None
    ) -> str:
        """Create an opaque token that introspects as active for exactly `ttl` seconds, or until revoked
        (`token`: introspect this string as active instead, e.g. a JWT the endpoint also knows)."""
        now = time.time()  # not truncated, as in mint()
        token = secrets.token_urlsafe(32) if token is None else token
        result: dict[str, Any] = {
            "active": True,
            "sub": "user-1",
            "client_id": self.client_id,
            "scope": "openid",
            "iss": self.issuer,
            "exp": now + ttl,
            "iat": now,
            "token_type": "Bearer",
        }
        result.update(claims or {})
        self._opaque[token] = {name: value for name, value in result.items() if value is not None}
        return token

    def revoke(self, token: str) -> None:
        """Make an opaque token introspect as inactive."""
        self._opaque.pop(token, None)

    def introspect(self, token: str) -> dict[str, Any]:
        """The RFC 7662 answer for a token, as the "ok" mode serves it."""
        result = self._opaque.get(token)
        if result is None:
            return {"active": False}
        exp = result.get("exp")
        if isinstance(exp, (int, float)) and exp <= time.time():
            return {"active": False}
        return dict(result)

    # -- HTTP --------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """A fresh application (an AppRunner's app cannot be reused after cleanup)."""
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._handle_jwks)
        app.router.add_get(DISCOVERY_PATH, self._handle_discovery)
        app.router.add_post(INTROSPECT_PATH, self._handle_introspect)
        app.router.add_post(TOKEN_PATH, self._handle_token)
        return app

    async def _handle_token(self, request: web.Request) -> web.StreamResponse:
        """POST /token: a development token endpoint (client credentials, Basic auth).

        Form: `sub` (default user-1), `roles` (comma-separated), `email`, `type` (jwt or opaque),
        `ttl` seconds (default 3600). It mints whatever it is asked for: a demo tool, never an IdP.
        """
        self.hits["token"] += 1
        form = await request.post()
        if self._client_auth(request.headers, form) is None:
            return web.json_response({"error": "invalid_client"}, status=401)
        try:
            ttl = max(1, min(int(str(form.get("ttl", "3600"))), 86400))
        except ValueError:
            return web.json_response({"error": "invalid_request", "error_description": "ttl"}, status=400)
        claims: dict[str, Any] = {"sub": str(form.get("sub", "user-1"))}
        if form.get("roles"):
            claims["roles"] = [r for r in str(form["roles"]).split(",") if r]
        if form.get("email"):
            claims["email"] = str(form["email"])
        if form.get("type", "jwt") == "opaque":
            token = self.issue_opaque(claims, ttl=ttl)
        else:
            token = self.mint(claims, alg="ES256", ttl=ttl)
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": ttl})

    async def _handle_jwks(self, request: web.Request) -> web.StreamResponse:
        """GET /.well-known/jwks.json."""
        self.hits["jwks"] += 1
        await self._wait()
        return web.json_response(self.jwks(), headers={"Cache-Control": "max-age=300"})

    def discovery(self) -> dict[str, Any]:
        """The OpenID Provider metadata (OIDC Discovery 1.0 section 3)."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "token_endpoint": self.url + TOKEN_PATH,
            "introspection_endpoint": self.introspection_url,
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        }

    async def _handle_discovery(self, request: web.Request) -> web.StreamResponse:
        """GET /.well-known/openid-configuration."""
        self.hits["discovery"] += 1
        await self._wait()
        return web.json_response(self.discovery())

    async def _handle_introspect(self, request: web.Request) -> web.StreamResponse:
        """POST /introspect (RFC 7662): our client only, then the token's answer."""
        self.hits["introspect"] += 1
        form = await request.post()
        await self._wait()
        refusal = self.refuse_client(request.headers, form)
        if refusal is not None:
            return refusal
        token = form.get("token")
        if not isinstance(token, str) or not token:
            return web.json_response({"error": "invalid_request"}, status=400)
        return web.json_response(self.introspect(token), headers={"Cache-Control": "no-store"})

    def refuse_client(self, headers: Mapping[str, str], form: Mapping[str, Any]) -> web.Response | None:
        """The 401 invalid_client (RFC 6749 5.2) for a request that is not our client, else None;
        remembers the method that authenticated in `last_client_auth`."""
        self.last_client_auth = self._client_auth(headers, form)
        if self.last_client_auth is not None:
            return None
        self.hits["introspect_client_refused"] += 1
        return web.json_response(
            {"error": "invalid_client"},
            status=401,
            headers={"WWW-Authenticate": 'Basic realm="introspection"'},
        )

    async def _wait(self) -> None:
        """Apply the configured slow-IdP delay."""
        if self.delay > 0:
            await asyncio.sleep(self.delay)


async def _serve(args: argparse.Namespace) -> None:
    """Run until SIGINT or SIGTERM."""
    idp = DevIdentityProvider(
        issuer=args.issuer,
        host=args.host,
        port=args.port,
        client_id=args.client_id,
        client_secret=args.client_secret,
    )
    await serve_until_stopped(idp)


async def serve_until_stopped(idp: DevIdentityProvider) -> None:
    """Serve `idp` until SIGINT or SIGTERM, once started printing where (one JSON line on stdout)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    async with idp:
        ready = {
            "url": idp.url,
            "issuer": idp.issuer,
            "jwks_uri": idp.jwks_uri,
            "introspection_url": idp.introspection_url,
        }
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await stopping.wait()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: serve a development IdP."""
    parser = argparse.ArgumentParser(prog="python -m authz_service.devstack.idp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--issuer", default=None)
    parser.add_argument("--client-id", default="authz-service")
    parser.add_argument("--client-secret", default="demo-secret")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
