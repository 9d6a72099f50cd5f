"""Validation of TokenIntrospector resources: jwt (one key source), opaque and aspxauth (RFC 7662)."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from authz_service.config.fields import Fields, Sections, header_safe_text
from authz_service.config.model import (
    HeaderSource,
    IntrospectorConfig,
    JwtIntrospectorConfig,
    OpaqueIntrospectorConfig,
    StaticKey,
)
from authz_service.config.registry import Rejected
from authz_service.errors import Problem

MIN_HMAC_SECRET_BYTES = 32
MAX_LIFETIME_LIMIT = 10 * 365 * 86400  # jwt.max_lifetime: ten years is already "no limit"
ASPXAUTH_COOKIE = ".ASPXAUTH"


class _Common(NamedTuple):
    """The fields every kind of introspector has."""

    cache_ttl: int
    timeout: float
    cookie: str | None
    from_headers: tuple[HeaderSource, ...]
    from_params: tuple[str, ...]
    optional: bool  # readiness does not wait for it (issue #22: an optional IdP never holds /readyz)
    sender_constraint: str  # optional | required (tokens/dpop.py)


class IntrospectorSections(Sections):
    """The `introspectors` list: ids, issuers and token sources unique across it."""

    def introspectors(self, raw_list: list[Any]) -> tuple[IntrospectorConfig, ...]:
        result: list[IntrospectorConfig] = []
        ids: set[str] = set()
        issuers: dict[str, str] = {}
        bound: dict[str, str] = {}  # "header x-api-token" -> the introspector that reads it
        for index, raw in enumerate(raw_list):
            if not isinstance(raw, dict):
                self.problems.append(Problem(f"introspectors[{index}]", "", "must be a mapping"))
                continue
            ident = raw.get("id")
            if not isinstance(ident, str) or not ident:
                where = f"introspectors[{index}]"
                self.problems.append(Problem(where, "id", "is required and must be a non-empty string"))
            else:
                where = f"introspector {ident!r}"
                if ident in ids:
                    self.problems.append(Problem(where, "id", "is used by more than one introspector"))
                ids.add(ident)
            f = Fields(where, raw, self.problems)
            f.get("id", str, None)
            f.resource_type("TokenIntrospector")
            kind = f.get("type", str)
            built: IntrospectorConfig | None = None
            if kind == "jwt":
                built = self.jwt_introspector(f, str(ident))
                if built is not None:
                    if built.iss in issuers:
                        f.problem("jwt.iss", f"is already claimed by introspector {issuers[built.iss]!r}")
                    issuers[built.iss] = built.id
            elif kind in ("opaque", "aspxauth"):
                built = self.opaque_introspector(f, str(ident), kind)
            elif kind is not None:
                f.problem("type", f"must be jwt, opaque or aspxauth, got {kind!r}")
            if built is not None:
                # A token source belongs to one introspector: two reading it would make the binding ambiguous.
                names = [("cookie", built.cookie)] if built.cookie is not None else []
                names += [("from_headers", h.name) for h in built.from_headers]
                names += [("from_params", p) for p in built.from_params]
                for what, name in names:
                    other = bound.setdefault(f"{what} {name}", built.id)
                    if other != built.id:
                        f.problem(what, f"{name!r} is already read by introspector {other!r}")
            f.reject_unknown()
            if built is not None and not any(p.where == where for p in self.problems):
                result.append(built)
        return tuple(result)

    def _common(self, f: Fields, default_cookie: str | None = None) -> _Common:
        cache_ttl = f.int_in("cache_ttl", 300, 1, 86400)
        timeout = f.number_in("timeout", 2.0, 0, 30)
        cookie = f.cookie_name("cookie", f.get("cookie", str, default_cookie))
        optional = bool(f.get("optional", bool, False))
        sender_constraint = f.get("sender_constraint", str, "optional")
        if sender_constraint not in ("optional", "required"):
            f.problem("sender_constraint", f"must be optional or required, got {sender_constraint!r}")
            sender_constraint = "optional"
        return _Common(
            cache_ttl, timeout, cookie, self._from_headers(f), self._from_params(f), optional, sender_constraint
        )

    @staticmethod
    def _from_headers(f: Fields) -> tuple[HeaderSource, ...]:
        sources: list[HeaderSource] = []
        for i, raw in enumerate(f.get("from_headers", list, [])):
            entry = Fields(f.where, raw, f.problems, f"from_headers[{i}].") if isinstance(raw, dict) else None
            if entry is None:
                f.problem(f"from_headers[{i}]", "must be a mapping {name, prefix}")
                continue
            name = entry.get("name", str)
            prefix = entry.get("prefix", str, "")
            entry.reject_unknown()
            if name is None:
                continue
            lowered = name.lower()
            if lowered in ("cookie", "authorization") or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,127}", lowered):
                why = "use cookie: for cookies" if lowered == "cookie" else "Authorization: Bearer is always read"
                detail = why if lowered in ("cookie", "authorization") else "letters, digits and '-'"
                entry.problem("name", f"must be an HTTP header name ({detail}), got {name!r}")
            elif not header_safe_text(prefix):
                entry.problem("prefix", "must be a single-line header value")
            else:
                sources.append(HeaderSource(lowered, prefix))
        return tuple(sources)

    @staticmethod
    def _from_params(f: Fields) -> tuple[str, ...]:
        params: list[str] = []
        for i, name in enumerate(f.get("from_params", list, [])):
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.~-]{1,128}", name):
                f.problem(f"from_params[{i}]", f"must be a query parameter name (letters, digits, _.~-), got {name!r}")
            else:
                params.append(name)
        return tuple(params)

    def jwt_introspector(self, f: Fields, ident: str) -> JwtIntrospectorConfig | None:
        common = self._common(f)
        max_stale = f.int_in("max_stale", 0, 0, 86400)
        top_jwks = f.get("jwks_uri", str, None)
        discovery = f.get("discovery", bool, False)
        jwt = f.required_nested("jwt", "for type jwt (it holds iss and the key source)")
        if jwt is None:
            return None
        iss = jwt.get("iss", str)
        audiences = _audiences(jwt, jwt.get("aud", (str, list), None))
        leeway = jwt.int_in("leeway", 30, 0, 3600)
        max_lifetime = jwt.get("max_lifetime", int, None)
        if max_lifetime is not None and not 1 <= max_lifetime <= MAX_LIFETIME_LIMIT:
            jwt.problem("max_lifetime", f"must be between 1 and {MAX_LIFETIME_LIMIT}, got {max_lifetime}")
        secret = jwt.get("secret", str, None)
        nested_jwks = jwt.get("jwks_uri", str, None)
        keys_raw = jwt.get("keys", list, None)
        jwks_uri = top_jwks or nested_jwks
        if top_jwks and nested_jwks:
            jwt.problem("jwks_uri", "is given both at the top level and under jwt; keep one")
        given = (("jwt.secret", secret), ("jwks_uri", jwks_uri), ("jwt.keys", keys_raw), ("discovery", discovery))
        sources = [n for n, v in given if v]
        if len(sources) != 1:
            f.problem(
                "jwt",
                "needs exactly one key source: jwt.secret, jwks_uri, jwt.keys or discovery: true"
                + (f" (found {', '.join(sources)})" if sources else " (found none)"),
            )
        f.url("jwks_uri", jwks_uri)
        if discovery and iss is not None and not re.match(r"^https?://[^/\s]+", iss):
            jwt.problem("iss", "must be an http:// or https:// URL when discovery is true (the document is under it)")
        # RFC 7518 3.2: an HMAC key as long as the hash at least. An OCT key has one alg, so its own
        # hash decides (HS512: 64 bytes); jwt.secret verifies all three, and keeps the SPEC's 32.
        short = [("jwt.secret", secret, MIN_HMAC_SECRET_BYTES)] + [
            (
                f"jwt.keys[{i}].k",
                k.get("k"),
                self.registries.hmac_min_bytes.get(str(k.get("alg")), MIN_HMAC_SECRET_BYTES),
            )
            for i, k in enumerate(keys_raw or [])
            if isinstance(k, dict)
        ]
        for field_name, value, minimum in short:
            if isinstance(value, str) and len(value.encode()) < minimum:
                self.warnings.append(
                    f"introspector {ident!r}: {field_name} is shorter than {minimum} bytes; "
                    "use a longer random secret in production"
                )
        keys: list[StaticKey] = []
        for i, raw_key in enumerate(keys_raw or []):
            field_name = f"keys[{i}]"
            if not isinstance(raw_key, dict):
                jwt.problem(field_name, "must be a mapping")
                continue
            try:
                # Loaded as the introspector loads it: a key that cannot verify is an error now.
                spec = self.registries.static_key(raw_key)
            except Rejected as err:
                jwt.problem(f"{field_name}.{err.field}", err.message)
            else:
                keys.append(spec)
        jwt.reject_unknown()
        if iss is None:
            return None
        return JwtIntrospectorConfig(
            id=ident,
            iss=iss,
            audiences=audiences,
            leeway=leeway,
            cache_ttl=common.cache_ttl,
            max_stale=max_stale,
            timeout=common.timeout,
            cookie=common.cookie,
            secret=secret.encode() if secret else None,
            jwks_uri=jwks_uri,
            keys=tuple(keys),
            discovery=bool(discovery),
            from_headers=common.from_headers,
            from_params=common.from_params,
            max_lifetime=max_lifetime if max_lifetime is not None and max_lifetime >= 1 else None,
            optional=common.optional,
            sender_constraint=common.sender_constraint,
        )

    def opaque_introspector(self, f: Fields, ident: str, kind: str) -> OpaqueIntrospectorConfig | None:
        # Aidbox's `type: aspxauth`: an opaque token from ASP.NET's forms-authentication cookie.
        common = self._common(f, ASPXAUTH_COOKIE if kind == "aspxauth" else None)
        endpoint = f.required_nested("introspection_endpoint", f"for type {kind} ({{url, authorization}})")
        if endpoint is None:
            return None
        url = endpoint.get("url", str)
        endpoint.url("url", url)
        authorization = endpoint.get("authorization", str, None)
        if authorization is not None and not header_safe_text(authorization):
            endpoint.problem("authorization", "must be a single-line header value")
        client_id = endpoint.get("client_id", str, None)
        client_secret = endpoint.get("client_secret", str, None)
        client_auth = endpoint.get("auth_method", str, "client_secret_basic") or "client_secret_basic"
        if client_auth not in ("client_secret_basic", "client_secret_post"):
            endpoint.problem("auth_method", f"must be client_secret_basic or client_secret_post, got {client_auth!r}")
        if client_secret is not None and not client_id:
            endpoint.problem("client_secret", "needs client_id (RFC 6749 2.3.1: the client authenticates as itself)")
        if client_id is not None and authorization is not None:
            endpoint.problem("authorization", "and client_id are two ways to authenticate to the endpoint: keep one")
        if client_id is not None and (not client_id or not header_safe_text(client_id)):
            endpoint.problem("client_id", "must be a non-empty single-line string")
        endpoint.reject_unknown()
        audiences = _audiences(f, f.get("aud", (str, list), None))
        accepts_jwt = bool(f.get("accepts_jwt", bool, False))
        if url is None:
            return None
        return OpaqueIntrospectorConfig(
            ident,
            url,
            authorization,
            common.cache_ttl,
            common.timeout,
            common.cookie,
            common.from_headers,
            common.from_params,
            kind,
            audiences=audiences,
            accepts_jwt=accepts_jwt,
            client_id=client_id,
            client_secret=client_secret,
            client_auth=client_auth,
            optional=common.optional,
            sender_constraint=common.sender_constraint,
        )


def _audiences(f: Fields, raw: Any) -> frozenset[str] | None:
    """`aud`: a string or a non-empty list of strings; the token must share one."""
    if isinstance(raw, str):
        return frozenset([raw])
    if isinstance(raw, list):
        if raw and all(isinstance(a, str) and a for a in raw):
            return frozenset(raw)
        f.problem("aud", "must be a string or a non-empty list of strings")
    return None
