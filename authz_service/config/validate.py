"""Config validation: raw YAML in, a frozen `Config` out, or every problem listed.

`check-config`, start-up, SIGHUP and the resource API all run exactly this code. Nothing
downstream looks at raw dicts. Static keys are loaded and policies compiled here, so a key that
cannot verify or a rule that cannot compile is a config error naming the resource and field.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from authz_service.config import yamlload
from authz_service.config.fields import Fields, expand_env, header_safe_text
from authz_service.config.model import (
    UNNAMED_API_WRITER,
    ApiConfig,
    ApiToken,
    CacheConfig,
    Config,
    HeaderSource,
    IntrospectorConfig,
    JwtIntrospectorConfig,
    LoggingConfig,
    OpaqueIntrospectorConfig,
    PolicyConfig,
    PolicyLinks,
    Predicate,
    ResponseConfig,
    RoleConfig,
    ServerConfig,
    StaticKey,
    StoreConfig,
    TlsConfig,
    TracingConfig,
)
from authz_service.context import strip_empty
from authz_service.errors import ConfigError, PolicyError, Problem
from authz_service.policy import ENGINES, RULE_FIELDS, unknown_engine
from authz_service.routes import with_aidbox_references
from authz_service.tokens.keys import HMAC_MIN_BYTES, KTY_ALGORITHMS, MAX_KID_LENGTH, BadKey, load_static_key

MIN_HMAC_SECRET_BYTES = 32
MAX_LIFETIME_LIMIT = 10 * 365 * 86400  # jwt.max_lifetime: ten years is already "no limit"
MIN_API_TOKEN_CHARS = 16
ASPXAUTH_COOKIE = ".ASPXAUTH"
_SERVER = ServerConfig()
_CACHE = CacheConfig()
_RESPONSE = ResponseConfig()
_KEY_FIELDS = frozenset({"kty", "alg", "kid", "format", "pub", "k", "use"})


class _Common(NamedTuple):
    """The fields every kind of introspector has."""

    cache_ttl: int
    timeout: float
    cookie: str | None
    from_headers: tuple[HeaderSource, ...]
    from_params: tuple[str, ...]


def read_config_text(path: str | os.PathLike[str]) -> str:
    """A config file's text; ConfigError when it cannot be read or is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([Problem("config", "", f"cannot read {path}: {err.strerror}")]) from err
    except UnicodeDecodeError as err:
        raise ConfigError([Problem("config", "", f"{path} is not UTF-8 text (byte {err.start})")]) from err


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a config file; raise ConfigError listing every problem."""
    return parse_config(read_config_text(path), env)


def parse_config(text: str, env: Mapping[str, str] | None = None) -> Config:
    """Validate config text (YAML); raise ConfigError listing every problem."""
    try:
        raw = yamlload.load(text)  # strict: no duplicate keys, tags or alias bombs
    except yamlload.YamlError as err:
        raise ConfigError([Problem("config", "", err.message)]) from err
    if raw is None:
        # An empty file (or one of comments only) is never a config anyone meant: a truncated write,
        # a ConfigMap key that lost its content. Refused at start-up, on reload and by check-config.
        raise ConfigError([Problem("config", "", "is empty (no settings, no introspectors)")])
    if not isinstance(raw, dict):
        raise ConfigError([Problem("config", "", "must be a mapping at the top level")])
    return validate_config(raw, os.environ if env is None else env)


def validate_config(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """A Config from a raw mapping; `${VAR}` is expanded from env unless env is None."""
    problems: list[Problem] = []
    if env is not None:
        try:
            raw = expand_env(raw, env, "", problems)
        except RecursionError as err:
            raise ConfigError(
                [Problem("config", "", "is nested too deeply (a YAML alias that refers to itself?)")]
            ) from err
    config = _Validator(problems).config(raw)
    if problems:
        raise ConfigError(problems)
    return config


def validate_policies(raw: Any, introspector_ids: Iterable[str]) -> tuple[PolicyConfig, ...]:
    """AccessPolicy resources on their own (test-policy's "try these"), checked exactly as in a
    config with those introspectors; ConfigError listing every problem."""
    problems: list[Problem] = []
    if not isinstance(raw, list):
        raise ConfigError([Problem("policies", "", "must be a list of AccessPolicy resources")])
    policies = _Validator(problems).policies(raw, set(introspector_ids))
    if problems:
        raise ConfigError(problems)
    return policies


class _Validator:
    """Turns the raw (env-expanded) tree into a Config, recording every problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        self.warnings: list[str] = []

    def config(self, raw: Mapping[str, Any]) -> Config:
        top = Fields("config", raw, self.problems)
        server = self.server(top.section("server"))
        cache = self.cache(top.section("cache"))
        response = self.response(top.section("response"))
        introspectors = self.introspectors(top.get("introspectors", list, []))
        users = self.users(top.get("users", list, []))
        roles = self.roles(top.get("roles", list, []))
        policies = self.policies(top.get("policies", list, []), {i.id for i in introspectors})
        logs = self.logging(top.section("logging"))
        api = self.api(top.section("api"), server)
        authentication_only = bool(top.get("authentication_only", bool, False))
        tracing = self.tracing(top.section("tracing"))
        if authentication_only and policies:
            top.problem(
                "authentication_only",
                "is true, so every valid token is allowed and policies are never asked: "
                "remove the policies, or set authentication_only: false",
            )
        top.reject_unknown()
        if api.enabled and server.admin_tls is None and not _loopback(server.admin_address):
            self.warnings.append(
                f"api: the resource API on {server.admin_address} takes bearer tokens over plain HTTP; "
                "set server.admin_tls, or bind admin_address to 127.0.0.1 behind a TLS proxy (docs/security.md)"
            )
        return Config(
            server,
            cache,
            response,
            introspectors,
            policies,
            users,
            logs,
            tuple(self.warnings),
            roles,
            api=api,
            authentication_only=authentication_only,
            tracing=tracing,
        )

    def tracing(self, f: Fields | None) -> TracingConfig:
        """OpenTelemetry export: an OTLP/gRPC endpoint and the service name spans carry."""
        if f is None:
            return TracingConfig()
        endpoint = f.get("otlp_endpoint", str, None)
        f.url("otlp_endpoint", endpoint)
        name = f.get("service_name", str, TracingConfig().service_name) or TracingConfig().service_name
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            f.problem("service_name", "must be 1 to 64 letters, digits or '._-'")
        f.reject_unknown()
        return TracingConfig(endpoint, name)

    def api(self, f: Fields | None, server: ServerConfig) -> ApiConfig:
        """The resource API: a bearer token, where written resources persist, a body size cap."""
        if f is None:
            return ApiConfig()
        token = f.get("token", str, None)
        if token is not None:
            if not re.fullmatch(r"[\x21-\x7e]{1,1024}", token):
                f.problem("token", "must be 1 to 1024 visible ASCII characters (it is sent as a Bearer token)")
            elif len(token) < MIN_API_TOKEN_CHARS:
                self.warnings.append(
                    f"api: token is shorter than {MIN_API_TOKEN_CHARS} characters; use a long random token"
                )
            if server.admin_address is None:
                f.problem("token", "needs server.admin_address: the resource API is served on the admin listener")
        tokens = self._api_tokens(f, token)
        if tokens and server.admin_address is None and token is None:
            f.problem("tokens", "needs server.admin_address: the resource API is served on the admin listener")
        store = self.store(f.nested("store"))
        if (token is not None or tokens) and store is None and "store" not in f.raw:
            f.problem("store", "is required when token is set (where resources written through the API persist)")
        max_body = f.int_in("max_body_bytes", ApiConfig().max_body_bytes, 1024, 64 * 1024 * 1024)
        f.reject_unknown()
        return ApiConfig(token, store, max_body, tokens)

    def _api_tokens(self, f: Fields, unnamed: str | None) -> tuple[ApiToken, ...]:
        """`api.tokens`: [{name, token}], each writer named in the audit log."""
        result: list[ApiToken] = []
        seen_names: set[str] = {UNNAMED_API_WRITER} if unnamed is not None else set()
        seen_tokens: set[str] = {unnamed} if unnamed is not None else set()
        for i, raw in enumerate(f.get("tokens", list, []) or []):
            entry = Fields(f.where, raw, f.problems, f"tokens[{i}].") if isinstance(raw, dict) else None
            if entry is None:
                f.problem(f"tokens[{i}]", "must be a mapping {name, token}")
                continue
            name = entry.get("name", str)
            secret = entry.get("token", str)
            entry.reject_unknown()
            if name is not None and not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
                entry.problem("name", "must be 1 to 64 letters, digits or '_.@-' (it names the writer in logs)")
                name = None
            elif name is not None and name in seen_names:
                entry.problem("name", f"{name!r} is used by more than one token")
            if secret is not None and not re.fullmatch(r"[\x21-\x7e]{1,1024}", secret):
                entry.problem("token", "must be 1 to 1024 visible ASCII characters (it is sent as a Bearer token)")
                secret = None
            elif secret is not None and secret in seen_tokens:
                entry.problem("token", "is the same as another API token: each writer needs its own")
            elif secret is not None and len(secret) < MIN_API_TOKEN_CHARS:
                self.warnings.append(
                    f"api: tokens[{i}] is shorter than {MIN_API_TOKEN_CHARS} characters; use a long random token"
                )
            if name is not None and secret is not None:
                seen_names.add(name)
                seen_tokens.add(secret)
                result.append(ApiToken(name, secret))
        return tuple(result)

    def store(self, f: Fields | None) -> StoreConfig | None:
        if f is None:
            return None
        backend = f.get("backend", str, "file")
        path = f.get("path", str, None)
        url = f.get("url", str, None)
        prefix = f.get("prefix", str, StoreConfig().prefix)
        if backend == "file":
            if not path:
                f.problem("path", "is required when backend is file (the directory of resource files)")
            if url is not None:
                f.problem("url", "is for backend redis; backend file takes path")
        elif backend == "redis":
            if url is None:
                f.problem("url", "is required when backend is redis")
            elif not re.match(r"^rediss?://", url):
                f.problem("url", "must be a redis:// or rediss:// URL")
            if path is not None:
                f.problem("path", "is for backend file; backend redis takes url")
        elif backend is not None:
            f.problem("backend", f"must be file or redis, got {backend!r}")
        if prefix is not None and not re.fullmatch(r"[A-Za-z0-9:_.-]{1,64}", prefix):
            f.problem("prefix", "must be 1 to 64 letters, digits or ':_.-'")
        f.reject_unknown()
        return StoreConfig(backend or "file", path, url, prefix or StoreConfig().prefix)

    def logging(self, f: Fields | None) -> LoggingConfig:
        if f is None:
            return LoggingConfig()
        levels = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
        level = f.get("level", str, "info")
        if level not in levels:
            f.problem("level", f"must be one of {', '.join(levels)}, got {level!r}")
            level = "info"
        decisions = f.get("decisions", str, "info")
        if decisions not in (*levels, "off"):
            f.problem("decisions", f"must be one of {', '.join(levels)} or off, got {decisions!r}")
            decisions = "info"
        f.reject_unknown()
        return LoggingConfig(level, levels.get(decisions))

    def server(self, f: Fields | None) -> ServerConfig:
        if f is None:
            return ServerConfig()
        grpc_address = f.get("grpc_address", str, _SERVER.grpc_address)
        f.address("grpc_address", grpc_address)
        admin_address = f.get("admin_address", str, None) if "admin_address" in f.raw else _SERVER.admin_address
        f.address("admin_address", admin_address)
        http_address = f.get("http_address", str, None)
        f.address("http_address", http_address)
        workers = f.int_in("workers", 1, 1, 64)
        base_port = f.get("worker_base_port", int, None)
        if base_port is not None and not 1 <= base_port <= 65535 - workers:
            f.problem("worker_base_port", f"must leave room for {workers} ports below 65536, got {base_port}")
        drain = f.get("drain_delay", float, _SERVER.drain_delay)
        if drain is not None and not 0 <= drain <= 600:
            f.problem("drain_delay", f"must be between 0 and 600, got {drain}")
        grace = f.number_in("shutdown_grace", _SERVER.shutdown_grace, 0, 600)
        max_concurrent = f.int_in("max_concurrent_checks", _SERVER.max_concurrent_checks, 1, 100_000)
        tls = self.tls(f.nested("tls"))
        admin_tls = self.tls(f.nested("admin_tls"))
        if admin_tls is not None and admin_tls.client_ca is not None:
            f.problem("admin_tls.client_ca", "is not supported on the admin listener (its API uses bearer tokens)")
        f.reject_unknown()
        return ServerConfig(
            grpc_address or _SERVER.grpc_address,
            admin_address,
            workers,
            base_port,
            float(drain if drain is not None else _SERVER.drain_delay),
            grace,
            tls,
            http_address,
            max_concurrent,
            admin_tls,
        )

    def tls(self, f: Fields | None) -> TlsConfig | None:
        if f is None:
            return None
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        def read(name: str, required: bool) -> bytes | None:
            path = f.get(name, str) if required else f.get(name, str, None)
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as err:
                f.problem(name, f"cannot be read ({err.strerror})")
                return None

        cert, key, client_ca = read("cert", True), read("key", True), read("client_ca", False)
        f.reject_unknown()
        for name, data in (("cert", cert), ("client_ca", client_ca)):
            if data is not None:
                try:
                    x509.load_pem_x509_certificates(data)
                except ValueError:
                    f.problem(name, "is not a PEM certificate")
        if key is not None:
            try:
                load_pem_private_key(key, password=None)
            except (ValueError, TypeError):
                f.problem("key", "is not an unencrypted PEM private key")
        if cert is None or key is None:
            return None
        return TlsConfig(
            cert, key, client_ca, tuple(str(f.raw.get(n)) for n in ("cert", "key", "client_ca") if f.raw.get(n))
        )

    def cache(self, f: Fields | None) -> CacheConfig:
        if f is None:
            return CacheConfig()
        backend = f.get("backend", str, "memory")
        if backend not in ("memory", "redis"):
            f.problem("backend", f"must be memory or redis, got {backend!r}")
        url = f.get("url", str, None)
        if backend == "redis" and url is None:
            f.problem("url", "is required when backend is redis")
        if url is not None and not re.match(r"^rediss?://", url):
            f.problem("url", "must be a redis:// or rediss:// URL")
        max_entries = f.int_in("max_entries", _CACHE.max_entries, 1, 10_000_000)
        f.reject_unknown()
        return CacheConfig(backend, url, max_entries)

    def response(self, f: Fields | None) -> ResponseConfig:
        if f is None:
            return ResponseConfig()
        user_id = f.header_name("user_id_header", f.get("user_id_header", str, _RESPONSE.user_id_header))
        claims = f.header_name("claims_header", f.get("claims_header", str, _RESPONSE.claims_header))
        mapping = f.get("claim_headers", dict, {}) or {}
        claim_headers: list[tuple[str, str]] = []
        for claim, header in mapping.items():
            if not isinstance(claim, str) or not isinstance(header, str):
                f.problem(f"claim_headers.{claim}", "must map a claim name to a header name")
                continue
            name = f.header_name(f"claim_headers.{claim}", header)
            if name is not None:
                claim_headers.append((claim, name))
        f.reject_unknown()
        result = ResponseConfig(
            user_id or _RESPONSE.user_id_header,
            claims or _RESPONSE.claims_header,
            tuple(claim_headers),
        )
        names = result.identity_headers
        if len(set(names)) != len(names):
            f.problem("", "user_id_header, claims_header and claim_headers must all be different headers")
        return result

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
        return _Common(cache_ttl, timeout, cookie, self._from_headers(f), self._from_params(f))

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
            (f"jwt.keys[{i}].k", k.get("k"), HMAC_MIN_BYTES.get(str(k.get("alg")), MIN_HMAC_SECRET_BYTES))
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
                spec = static_key(raw_key)
                load_static_key(spec)  # the same loading the introspector does: a key that fails is an error now
            except BadKey as err:
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
        )

    def policies(self, raw_list: list[Any], introspector_ids: set[str]) -> tuple[PolicyConfig, ...]:
        result: list[PolicyConfig] = []
        ids: set[str] = set()
        for index, raw in enumerate(raw_list):
            if not isinstance(raw, dict):
                self.problems.append(Problem(f"policies[{index}]", "", "must be a mapping"))
                continue
            ident = raw.get("id")
            where = f"policy {ident!r}" if isinstance(ident, str) and ident else f"policies[{index}]"
            f = Fields(where, raw, self.problems)
            if f.get("id", str, None) is None:
                f.problem("id", "is required and must be a non-empty string")
            elif ident in ids:
                f.problem("id", "is used by more than one policy")
            ids.add(str(ident))
            f.resource_type("AccessPolicy")
            f.get("description", str, None)
            engine = f.get("engine", str)
            scope = f.get("introspectors", list, None)
            introspectors: frozenset[str] | None = None
            if scope is not None:
                unknown = [name for name in scope if name not in introspector_ids]
                if not scope or unknown:
                    f.problem(
                        "introspectors", f"must list configured introspector ids, unknown: {unknown or '(empty)'}"
                    )
                introspectors = frozenset(str(name) for name in scope)
            role_name = f.get("roleName", str, None)
            if role_name == "":
                f.problem(
                    "roleName", "must be a non-empty role name (leave it out for a policy that applies to everyone)"
                )
            links = self._links(f)
            rule: dict[str, Any] = {}
            predicate: Predicate | None = None
            kind = ENGINES.get(engine) if engine is not None else None
            if kind is None:
                if engine is not None:
                    f.problem("engine", unknown_engine(engine))
                    f.seen.update(RULE_FIELDS)  # one problem (the engine), not one more per rule field
            else:
                f.seen.update(kind.fields)
                rule = kind.rule(raw)
                for name in kind.missing(raw):
                    f.problem(name, f"is required for engine {engine}")
                if not kind.missing(raw):
                    try:
                        predicate = kind.compile(rule)
                        self.warnings.extend(f"{where}: {warning}" for warning in kind.lint(rule))
                    except PolicyError as err:
                        f.problem("", str(err))
                    except RecursionError:
                        f.problem(kind.fields[0] if kind.fields else "engine", "is nested too deeply")
            f.reject_unknown()
            if predicate is not None and isinstance(ident, str):
                result.append(PolicyConfig(ident, str(engine), rule, predicate, introspectors, role_name, links))
        return tuple(result)

    @staticmethod
    def _links(f: Fields) -> PolicyLinks | None:
        """`link`: [{reference: User/u}], or Aidbox's other form [{resourceType: User, id: u}]."""
        raw = f.get("link", list, None)
        if raw is None:
            return None
        found: dict[str, set[str]] = {"User": set(), "Client": set(), "Operation": set()}
        for i, item in enumerate(raw):
            kind, ident = _reference(item) if isinstance(item, dict) else (None, None)
            if kind not in found or ident is None:
                f.problem(
                    f"link[{i}]",
                    "must be {reference: User/ID}, {reference: Client/ID} or {reference: Operation/ID} "
                    "(or {resourceType, id})",
                )
                continue
            found[kind].add(ident)
        if not raw:
            f.problem("link", "must not be empty (leave it out for a policy that applies to everyone)")
        return PolicyLinks(frozenset(found["User"]), frozenset(found["Client"]), frozenset(found["Operation"]))

    def roles(self, raw_list: list[Any]) -> tuple[RoleConfig, ...]:
        result: list[RoleConfig] = []
        ids: set[str] = set()
        for index, raw in enumerate(raw_list):
            if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
                self.problems.append(Problem(f"roles[{index}]", "id", "is required and must be a non-empty string"))
                continue
            ident = raw["id"]
            f = Fields(f"role {ident!r}", raw, self.problems)
            f.resource_type("Role")
            if ident in ids:
                f.problem("id", "is used by more than one role")
            ids.add(ident)
            name = f.get("name", str)
            if name == "":
                f.problem("name", "must be a non-empty string (the role name policies' roleName refers to)")
            user = f.get("user", dict)
            user_id = _user_reference(user) if isinstance(user, dict) else None
            if isinstance(user, dict) and user_id is None:
                f.problem("user", "must be {id: USER_ID} or {reference: User/USER_ID}")
            # Role is an open resource (links, context, ...): no unknown-field check.
            if name and user_id:
                # As Aidbox stores it: references also as {resourceType, id} (`.role.0.links.practitioner.id`).
                result.append(RoleConfig(ident, name, user_id, with_aidbox_references(strip_empty(raw))))
        return tuple(result)

    def users(self, raw_list: list[Any]) -> Mapping[str, Mapping[str, Any]]:
        users: dict[str, Mapping[str, Any]] = {}
        for index, raw in enumerate(raw_list):
            if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
                self.problems.append(Problem(f"users[{index}]", "id", "is required and must be a non-empty string"))
                continue
            f = Fields(f"user {raw['id']!r}", raw, self.problems)
            f.resource_type("User")
            if raw["id"] in users:
                f.problem("id", "is used by more than one user")
            # Stored as policies see it: empty values removed once, here. A plain dict on purpose:
            # jsonschema only treats dicts as objects, so a read-only proxy would skip `properties`.
            users[raw["id"]] = with_aidbox_references(strip_empty(raw))
        return MappingProxyType(users)


def _audiences(f: Fields, raw: Any) -> frozenset[str] | None:
    """`aud`: a string or a non-empty list of strings; the token must share one."""
    if isinstance(raw, str):
        return frozenset([raw])
    if isinstance(raw, list):
        if raw and all(isinstance(a, str) and a for a in raw):
            return frozenset(raw)
        f.problem("aud", "must be a string or a non-empty list of strings")
    return None


def _loopback(address: str | None) -> bool:
    """Whether a listen address is on the loopback interface only."""
    if address is None:
        return True
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def static_key(raw: Mapping[str, Any]) -> StaticKey:
    """One `jwt.keys` entry, field by field: {kty, alg, format: PEM|plain, pub | k, kid?}."""
    kty = raw.get("kty")
    if not isinstance(kty, str) or kty.upper() not in KTY_ALGORITHMS:
        raise BadKey("kty", f"must be one of RSA, EC, OKP, OCT, got {kty!r}")
    kty = kty.upper()
    alg = raw.get("alg")
    if not isinstance(alg, str) or alg not in KTY_ALGORITHMS[kty]:
        allowed = ", ".join(sorted(KTY_ALGORITHMS[kty]))
        raise BadKey("alg", f"must be one of {allowed} for kty {kty}, got {alg!r}")
    kid = raw.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH):
        raise BadKey("kid", f"must be a string of 1 to {MAX_KID_LENGTH} characters")
    fmt = raw.get("format", "plain" if kty == "OCT" else "PEM")
    extras = sorted(str(name) for name in raw if name not in _KEY_FIELDS)
    if extras:
        raise BadKey(extras[0], "is not a known key field")
    if kty == "OCT":
        if fmt != "plain":
            raise BadKey("format", f"must be plain for kty OCT, got {fmt!r}")
        secret = raw.get("k")
        if not isinstance(secret, str) or not secret:
            raise BadKey("k", "is required for kty OCT (the shared secret)")
        return StaticKey(kty, alg, kid, secret=secret.encode())
    if fmt != "PEM":
        raise BadKey("format", f"must be PEM for kty {kty}, got {fmt!r}")
    pem = raw.get("pub")
    if not isinstance(pem, str) or "-----BEGIN" not in pem:
        raise BadKey("pub", "is required: a PEM public key or certificate")
    return StaticKey(kty, alg, kid, pem=pem)


def _reference(value: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(resource type, id) of `{reference: Type/id}` or `{resourceType: Type, id: id}`."""
    reference = value.get("reference")
    if isinstance(reference, str):
        kind, _, ident = reference.partition("/")
        return (kind, ident) if kind and ident and "/" not in ident else (None, None)
    resource_type, plain = value.get("resourceType"), value.get("id")
    if isinstance(resource_type, str) and isinstance(plain, str) and resource_type and plain:
        return resource_type, plain
    return None, None


def _user_reference(value: Mapping[str, Any]) -> str | None:
    """The user id of a reference: `{id: u}` (with resourceType User, if any) or `{reference: User/u}`."""
    kind, ident = _reference(
        value if "resourceType" in value or "reference" in value else {**value, "resourceType": "User"}
    )
    return ident if kind == "User" else None
