"""A small, real development identity provider (JWKS + RFC 7662 introspection) over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import enum
import hashlib
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

__all__ = ["DISCOVERY_PATH", "INTROSPECT_PATH", "JWKS_PATH", "DevIdentityProvider", "main"]

TOKEN_PATH: Final = "/token"
DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
JWKS_PATH: Final = "/.well-known/jwks.json"
INTROSPECT_PATH: Final = "/introspect"
# Redirect targets serve plausible answers so a client that wrongly follows is detectable.
_JWKS_MOVED_PATH: Final = "/moved/jwks.json"
_INTROSPECT_MOVED_PATH: Final = "/moved/introspect"
_DISCOVERY_MOVED_PATH: Final = "/moved/openid-configuration"

_JWKS_MODES: Final = frozenset({"ok", "down", "hang", "html", "notjson", "redirect", "huge", "empty", "garbage_keys"})
# The OAuth errors a 400 may carry (RFC 6749 5.2, RFC 7009 2.2.1): modes that answer exactly that.
_INTROSPECT_ERROR_MODES: Final = frozenset({"invalid_token", "unsupported_token_type", "invalid_request"})
_INTROSPECT_MODES: Final = (
    frozenset({"ok", "down", "hang", "html", "notjson", "redirect", "huge", "no_active", "active_string", "error500"})
    | _INTROSPECT_ERROR_MODES
)
# RFC 6749 2.3.1: how a client may authenticate to the introspection endpoint (RFC 7662 2.1).
CLIENT_AUTH_METHODS: Final = frozenset({"client_secret_basic", "client_secret_post"})
_HANG_SECONDS: Final = 3600.0
_HUGE_JWKS_BYTES: Final = 2 * 1024 * 1024
_HUGE_INTROSPECT_BYTES: Final = 128 * 1024
# Discovery failure modes beyond the shared ones: an issuer that is a prefix of ours or another
# one entirely, no jwks_uri, keys on another host name (localhost: the same server), a >64 KiB document.
_DISCOVERY_MODES: Final = frozenset(
    {
        "ok",
        "down",
        "hang",
        "html",
        "notjson",
        "redirect",
        "huge",
        "issuer_prefix",
        "wrong_issuer",
        "no_jwks_uri",
        "other_host",
    }
)

_HMAC_ALGS: Final = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
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
    "none": "none",
}
_JWK_ALG_BY_FAMILY: Final = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class _Default(enum.Enum):
    """Sentinel type for "use the key's own kid"."""

    KEY_KID = enum.auto()


KEY_KID: Final = _Default.KEY_KID


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


def _json_bytes(value: Any) -> bytes:
    """Compact JSON encoding."""
    return json.dumps(value, separators=(",", ":")).encode()


def _hmac_sign(header: dict[str, Any], payload: dict[str, Any], key: str | bytes, alg: str) -> str:
    """HS* compact JWS without PyJWT's key checks, so alg-confusion tokens (PEM as secret) can be made."""
    secret = key.encode() if isinstance(key, str) else key
    signing_input = f"{_b64url(_json_bytes(header))}.{_b64url(_json_bytes(payload))}"
    digest = hmac.new(secret, signing_input.encode("ascii"), _HMAC_ALGS[alg]).digest()
    return f"{signing_input}.{_b64url(digest)}"


class DevIdentityProvider(LocalHttpServer):
    """JWKS endpoint, token minting and RFC 7662 introspection, with switchable failure modes."""

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
        self.jwks_mode: str = "ok"
        self.discovery_mode: str = "ok"
        self.introspect_mode: str = "ok"
        self.delay: float = 0.0
        # The Content-Type of introspection answers (RFC 7662 says application/json; tests try others).
        self.introspect_content_type: str = "application/json"
        self.last_introspection: dict[str, Any] | None = None
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
        kid: str | _Default | None = KEY_KID,
        ttl: float = 300,
        headers: Mapping[str, Any] | None = None,
        key: Any = None,
    ) -> str:
        """Sign a JWT that lives exactly `ttl` seconds from now; claims override the defaults and a
        None claim removes it."""
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
        payload = {name: value for name, value in payload.items() if value is not None}

        family = _family(alg)
        header: dict[str, Any] = {}
        if family in self._current:
            if kid is KEY_KID:
                header["kid"] = self._current[family].kid
            signing_key: Any = self._current[family].private if key is None else key
        else:
            signing_key = (self.hmac_secret if family == "HS" else None) if key is None else key
        if isinstance(kid, str):
            header["kid"] = kid
        header.update(headers or {})

        if family == "HS" and key is not None:
            # PyJWT refuses PEM-looking HMAC secrets; tests need exactly that for alg confusion.
            full_header = {"alg": alg, "typ": "JWT", **header}
            full_header = {name: value for name, value in full_header.items() if value is not None}
            return _hmac_sign(full_header, payload, key, alg)
        return jwt.encode(payload, signing_key, algorithm=alg, headers=header or None)

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
        app.router.add_get(_DISCOVERY_MOVED_PATH, self._handle_discovery_moved)
        app.router.add_post(INTROSPECT_PATH, self._handle_introspect)
        app.router.add_post(TOKEN_PATH, self._handle_token)
        app.router.add_get(_JWKS_MOVED_PATH, self._handle_jwks_moved)
        app.router.add_route("*", _INTROSPECT_MOVED_PATH, self._handle_introspect_moved)
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
        """GET /.well-known/jwks.json, shaped by jwks_mode."""
        self.hits["jwks"] += 1
        mode = self.jwks_mode
        await self._wait()
        failure = await self._common_failure(mode, _JWKS_MOVED_PATH)
        if failure is not None:
            return failure
        body: dict[str, Any]
        if mode == "ok":
            body = self.jwks()
        elif mode == "huge":
            # Valid keys plus padding: only a response size limit can reject it.
            body = {**self.jwks(), "padding": "x" * _HUGE_JWKS_BYTES}
        elif mode == "empty":
            body = {"keys": []}
        elif mode == "garbage_keys":
            body = {"keys": [{"kty": "RSA"}]}
        else:
            return _unknown_mode("jwks_mode", mode)
        return web.json_response(body, headers={"Cache-Control": "max-age=300"})

    def discovery(self) -> dict[str, Any]:
        """The OpenID Provider metadata the "ok" mode serves."""
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
        """GET /.well-known/openid-configuration, shaped by discovery_mode."""
        self.hits["discovery"] += 1
        mode = self.discovery_mode
        await self._wait()
        failure = await self._common_failure(mode, _DISCOVERY_MOVED_PATH)
        if failure is not None:
            return failure
        if mode not in _DISCOVERY_MODES:
            return _unknown_mode("discovery_mode", mode)
        body = self.discovery()
        if mode == "huge":
            body["padding"] = "x" * _HUGE_INTROSPECT_BYTES  # over the 64 KiB cap, valid otherwise
        elif mode == "issuer_prefix":
            body["issuer"] = self.issuer[:-1]
        elif mode == "wrong_issuer":
            body["issuer"] = "https://attacker.example"
        elif mode == "no_jwks_uri":
            del body["jwks_uri"]
        elif mode == "other_host":
            body["jwks_uri"] = self.jwks_uri.replace("://127.0.0.1:", "://localhost:", 1)
        return web.json_response(body)

    async def _handle_discovery_moved(self, request: web.Request) -> web.StreamResponse:
        """Redirect target that serves valid metadata (clients must not get here)."""
        self.hits["discovery_redirected"] += 1
        return web.json_response(self.discovery())

    async def _handle_jwks_moved(self, request: web.Request) -> web.StreamResponse:
        """Redirect target that serves a valid JWKS (clients must not get here)."""
        self.hits["jwks_redirected"] += 1
        return web.json_response(self.jwks(), headers={"Cache-Control": "max-age=300"})

    async def _handle_introspect(self, request: web.Request) -> web.StreamResponse:
        """POST /introspect (RFC 7662), shaped by introspect_mode."""
        self.hits["introspect"] += 1
        mode = self.introspect_mode
        form = await request.post()
        self.last_introspection = {
            "form": {name: str(value) for name, value in form.items()},
            "headers": dict(request.headers),
        }
        await self._wait()
        failure = await self._common_failure(mode, _INTROSPECT_MOVED_PATH)
        if failure is not None:
            return failure
        if mode == "error500":
            return web.json_response({"error": "server_error"}, status=500)
        if mode not in _INTROSPECT_MODES:
            return _unknown_mode("introspect_mode", mode)

        self.last_client_auth = self._client_auth(request.headers, form)
        if self.last_client_auth is None:
            self.hits["introspect_client_refused"] += 1
            return web.json_response(
                {"error": "invalid_client"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="introspection"'},
            )
        if mode in _INTROSPECT_ERROR_MODES:
            # What some servers answer instead of `active: false` (a JWT to an opaque-only
            # endpoint, an unknown token type), or for a request they do not understand.
            return web.json_response({"error": mode}, status=400)
        token = form.get("token")
        if not isinstance(token, str) or not token:
            return web.json_response({"error": "invalid_request"}, status=400)

        result = self.introspect(token)
        if mode == "no_active":
            result.pop("active", None)
        elif mode == "active_string":
            result["active"] = "true" if result.get("active") else "false"
        elif mode == "huge":
            # Active and well-formed apart from its size, so only a size limit rejects it.
            result = {**self._plausible_active(), "padding": "x" * _HUGE_INTROSPECT_BYTES}
        return web.json_response(
            result, content_type=self.introspect_content_type, headers={"Cache-Control": "no-store"}
        )

    async def _handle_introspect_moved(self, request: web.Request) -> web.StreamResponse:
        """Redirect target that says "active" to anyone (a client following it is broken)."""
        self.hits["introspect_redirected"] += 1
        return web.json_response(self._plausible_active())

    def _plausible_active(self) -> dict[str, Any]:
        """An active introspection result not tied to any issued token."""
        now = int(time.time())
        return {
            "active": True,
            "sub": "user-1",
            "client_id": self.client_id,
            "scope": "openid",
            "iss": self.issuer,
            "exp": now + 300,
            "iat": now,
            "token_type": "Bearer",
        }

    async def _wait(self) -> None:
        """Apply the configured slow-IdP delay."""
        if self.delay > 0:
            await asyncio.sleep(self.delay)

    async def _common_failure(self, mode: str, moved_path: str) -> web.StreamResponse | None:
        """Answers shared by both endpoints' failure modes; None means "not a shared mode"."""
        if mode == "down":
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        if mode == "hang":
            # stop() and client disconnects cancel this; nothing else ends it in time.
            await asyncio.sleep(_HANG_SECONDS)
            return web.json_response({"error": "timeout"}, status=504)
        if mode == "html":
            return web.Response(
                text="<!doctype html><html><body><h1>Sign in</h1></body></html>",
                content_type="text/html",
            )
        if mode == "notjson":
            return web.Response(text="keys: not json {", content_type="application/json")
        if mode == "redirect":
            return web.Response(status=302, headers={"Location": moved_path})
        return None


def _unknown_mode(switch: str, mode: str) -> web.Response:
    """Loud answer for a misspelled failure switch, so the test author notices."""
    return web.json_response({"error": f"unknown {switch} {mode!r}"}, status=500)


async def _serve(args: argparse.Namespace) -> None:
    """Run until SIGINT or SIGTERM."""
    idp = DevIdentityProvider(
        issuer=args.issuer,
        host=args.host,
        port=args.port,
        client_id=args.client_id,
        client_secret=args.client_secret,
    )
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
