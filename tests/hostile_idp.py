"""The dev IdP plus what only tests need: failure modes and hostile tokens (never in the wheel).

`python -m tests.hostile_idp --jwks-mode html` serves it in its own process, as
`python -m authz_service.devstack.idp` serves the demo's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

import jwt
from aiohttp import web

from authz_service.devstack.idp import KEY_KID, DevIdentityProvider, Kid, serve_until_stopped

__all__ = ["DISCOVERY_MODES", "INTROSPECT_MODES", "JWKS_MODES", "HostileIdentityProvider", "main"]

# Redirect targets serve plausible answers so a client that wrongly follows is detectable.
JWKS_MOVED_PATH: Final = "/moved/jwks.json"
INTROSPECT_MOVED_PATH: Final = "/moved/introspect"
DISCOVERY_MOVED_PATH: Final = "/moved/openid-configuration"

# Modes every endpoint knows: an outage, a hang, a login page, broken JSON, a redirect.
_COMMON_MODES: Final = frozenset({"ok", "down", "hang", "html", "notjson", "redirect", "huge"})
JWKS_MODES: Final = _COMMON_MODES | {"empty", "garbage_keys"}
# The OAuth errors a 400 may carry (RFC 6749 5.2, RFC 7009 2.2.1): modes that answer exactly that.
INTROSPECT_ERROR_MODES: Final = frozenset({"invalid_token", "unsupported_token_type", "invalid_request"})
INTROSPECT_MODES: Final = _COMMON_MODES | {"no_active", "active_string", "error500"} | INTROSPECT_ERROR_MODES
# Discovery failure modes beyond the shared ones: an issuer that is a prefix of ours or another
# one entirely, no jwks_uri, keys on another host name (localhost: the same server).
DISCOVERY_MODES: Final = _COMMON_MODES | {"issuer_prefix", "wrong_issuer", "no_jwks_uri", "other_host"}

_HANG_SECONDS: Final = 3600.0
_HUGE_JWKS_BYTES: Final = 2 * 1024 * 1024  # over the 1 MiB JWKS cap
_HUGE_DOCUMENT_BYTES: Final = 128 * 1024  # over the 64 KiB introspection and discovery cap
_HMAC_ALGS: Final = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def _b64url(data: bytes) -> str:
    """Base64url without padding, as JOSE wants it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_bytes(value: Any) -> bytes:
    """Compact JSON encoding."""
    return json.dumps(value, separators=(",", ":")).encode()


def _hmac_sign(header: dict[str, Any], payload: dict[str, Any], key: str | bytes, alg: str) -> str:
    """HS* compact JWS without PyJWT's key checks, so alg-confusion tokens (PEM as secret) can be made."""
    secret = key.encode() if isinstance(key, str) else key
    signing_input = f"{_b64url(_json_bytes(header))}.{_b64url(_json_bytes(payload))}"
    digest = hmac.new(secret, signing_input.encode("ascii"), _HMAC_ALGS[alg]).digest()
    return f"{signing_input}.{_b64url(digest)}"


def _unknown_mode(switch: str, mode: str) -> web.Response:
    """Loud answer for a misspelled failure switch, so the test author notices."""
    return web.json_response({"error": f"unknown {switch} {mode!r}"}, status=500)


class HostileIdentityProvider(DevIdentityProvider):
    """The dev IdP with switchable failure modes per endpoint and a mint() that signs anything."""

    # Every mode "ok": the dev IdP's answers until a test switches one (an assignment sets it on
    # the instance; the defaults are immutable, so instances share nothing through them).
    jwks_mode: str = "ok"
    discovery_mode: str = "ok"
    introspect_mode: str = "ok"
    # The Content-Type of introspection answers (RFC 7662 says application/json; tests try others).
    introspect_content_type: str = "application/json"
    last_introspection: dict[str, Any] | None = None  # the last introspection request's form and headers

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        alg: str = "RS256",
        kid: Kid = KEY_KID,
        ttl: float = 300,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """As the dev IdP's, plus `alg: none`, extra header fields and HS* under any key, a PEM
        public key included (alg confusion)."""
        if alg != "none" and headers is None and not (alg in _HMAC_ALGS and key is not None):
            return super().mint(claims, alg=alg, kid=kid, ttl=ttl, key=key)
        payload = self.payload(claims, ttl)
        if alg == "none":
            header: dict[str, Any] = {"kid": kid} if isinstance(kid, str) else {}
        else:
            header = self._header(alg, kid)
        header.update(headers or {})
        if alg in _HMAC_ALGS and key is not None:
            # PyJWT refuses PEM-looking HMAC secrets; tests need exactly that for alg confusion.
            full_header = {"alg": alg, "typ": "JWT", **header}
            full_header = {name: value for name, value in full_header.items() if value is not None}
            return _hmac_sign(full_header, payload, key, alg)
        signing_key: Any = None if alg == "none" else self._signing_key(alg, key)
        return jwt.encode(payload, signing_key, algorithm=alg, headers=header or None)

    # -- HTTP --------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The dev IdP's routes plus the redirect targets."""
        app = super().make_app()
        app.router.add_get(DISCOVERY_MOVED_PATH, self._handle_discovery_moved)
        app.router.add_get(JWKS_MOVED_PATH, self._handle_jwks_moved)
        app.router.add_route("*", INTROSPECT_MOVED_PATH, self._handle_introspect_moved)
        return app

    async def _handle_jwks(self, request: web.Request) -> web.StreamResponse:
        """GET /.well-known/jwks.json, shaped by jwks_mode."""
        self.hits["jwks"] += 1
        mode = self.jwks_mode
        await self._wait()
        failure = await self._common_failure(mode, JWKS_MOVED_PATH)
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

    async def _handle_discovery(self, request: web.Request) -> web.StreamResponse:
        """GET /.well-known/openid-configuration, shaped by discovery_mode."""
        self.hits["discovery"] += 1
        mode = self.discovery_mode
        await self._wait()
        failure = await self._common_failure(mode, DISCOVERY_MOVED_PATH)
        if failure is not None:
            return failure
        if mode not in DISCOVERY_MODES:
            return _unknown_mode("discovery_mode", mode)
        body = self.discovery()
        if mode == "huge":
            body["padding"] = "x" * _HUGE_DOCUMENT_BYTES  # over the 64 KiB cap, valid otherwise
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
        failure = await self._common_failure(mode, INTROSPECT_MOVED_PATH)
        if failure is not None:
            return failure
        if mode == "error500":
            return web.json_response({"error": "server_error"}, status=500)
        if mode not in INTROSPECT_MODES:
            return _unknown_mode("introspect_mode", mode)
        refusal = self.refuse_client(request.headers, form)
        if refusal is not None:
            return refusal
        if mode in INTROSPECT_ERROR_MODES:
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
            result = {**self._plausible_active(), "padding": "x" * _HUGE_DOCUMENT_BYTES}
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

    async def _common_failure(self, mode: str, moved_path: str) -> web.StreamResponse | None:
        """Answers shared by every endpoint's failure modes; None means "not a shared mode"."""
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


async def _serve(args: argparse.Namespace) -> None:
    """Run until SIGINT or SIGTERM."""
    idp = HostileIdentityProvider(issuer=args.issuer, host=args.host, port=args.port)
    idp.jwks_mode = args.jwks_mode
    idp.discovery_mode = args.discovery_mode
    idp.introspect_mode = args.introspect_mode
    await serve_until_stopped(idp)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: serve a hostile IdP in the modes given."""
    parser = argparse.ArgumentParser(prog="python -m tests.hostile_idp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--issuer", default=None)
    parser.add_argument("--jwks-mode", choices=sorted(JWKS_MODES), default="ok")
    parser.add_argument("--discovery-mode", choices=sorted(DISCOVERY_MODES), default="ok")
    parser.add_argument("--introspect-mode", choices=sorted(INTROSPECT_MODES), default="ok")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
