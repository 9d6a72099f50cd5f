"""The config file: YAML in, validated frozen objects out, or every problem listed.

`check-config` and service start-up run exactly this code. Nothing downstream looks at raw dicts.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from authz_service.context import strip_empty
from authz_service.errors import AuthzError, ConfigError, Problem
from authz_service.policy.matcho import compile_pattern
from authz_service.tokens.keys import BadKey, VerificationKey, load_static_key

T = TypeVar("T")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# Headers an identity header must never overwrite: routing, framing and credentials.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "authorization",
        "cookie",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "keep-alive",
        "proxy-authorization",
    }
)
MIN_HMAC_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS for the gRPC listener; with client_ca, clients must present a certificate it signed (mTLS)."""

    cert: bytes
    key: bytes = field(repr=False)
    client_ca: bytes | None = None
    files: tuple[str, ...] = ()  # where they were read from, for messages


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the service listens and how many processes serve."""

    grpc_address: str = "0.0.0.0:9001"
    admin_address: str | None = "0.0.0.0:9002"
    workers: int = 1
    worker_base_port: int | None = None  # workers > 1: worker i also listens on this port + i
    drain_delay: float = 5.0  # seconds NOT_SERVING is reported before the listener closes
    shutdown_grace: float = 10.0  # seconds in-flight checks get to finish after that
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log levels: the service's own and the one decision lines are written at."""

    level: str = "info"
    decisions: int | None = logging.INFO  # logging level number; None: no decision lines


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Which cache backend holds introspection results."""

    backend: str = "memory"
    url: str | None = None
    max_entries: int = 100_000


@dataclass(frozen=True, slots=True)
class ResponseConfig:
    """Which headers carry the identity upstream."""

    user_id_header: str = "x-user-id"
    claims_header: str = "x-auth-claims"
    claim_headers: tuple[tuple[str, str], ...] = ()  # (claim, header)

    @property
    def identity_headers(self) -> tuple[str, ...]:
        """Every header this service owns: set on allow, removed when not set."""
        return (self.user_id_header, self.claims_header, *(h for _, h in self.claim_headers))


@dataclass(frozen=True, slots=True)
class JwtIntrospectorConfig:
    """A `type: jwt` TokenIntrospector with exactly one key source."""

    id: str
    iss: str
    audiences: frozenset[str] | None
    leeway: int
    cache_ttl: int
    max_stale: int
    timeout: float
    cookie: str | None
    secret: bytes | None = None
    jwks_uri: str | None = None
    keys: tuple[VerificationKey, ...] = ()


@dataclass(frozen=True, slots=True)
class OpaqueIntrospectorConfig:
    """A `type: opaque` TokenIntrospector (RFC 7662)."""

    id: str
    url: str
    authorization: str | None
    cache_ttl: int
    timeout: float
    cookie: str | None


IntrospectorConfig = JwtIntrospectorConfig | OpaqueIntrospectorConfig


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """An AccessPolicy, compiled: `evaluate(context)` says whether it allows the request."""

    id: str
    engine: str
    evaluate: Callable[[Mapping[str, Any]], bool] = field(compare=False, repr=False)
    introspectors: frozenset[str] | None = None  # None: applies to every request

    def allows(self, context: Mapping[str, Any], introspector: str | None) -> bool:
        if self.introspectors is not None and introspector not in self.introspectors:
            return False
        return self.evaluate(context)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated config."""

    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    response: ResponseConfig = field(default_factory=ResponseConfig)
    introspectors: tuple[IntrospectorConfig, ...] = ()
    policies: tuple[PolicyConfig, ...] = ()
    users: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for check-config and the start-up log."""
        kinds = ", ".join(
            f"{i.id} ({'jwt' if isinstance(i, JwtIntrospectorConfig) else 'opaque'})" for i in self.introspectors
        )
        return (
            f"config OK: {len(self.introspectors)} introspector(s) [{kinds}], "
            f"{len(self.policies)} policy(ies), {len(self.users)} user(s), "
            f"cache {self.cache.backend}, grpc {self.server.grpc_address}"
        )


_DEFAULT_ServerConfig = ServerConfig()
_DEFAULT_CacheConfig = CacheConfig()
_DEFAULT_ResponseConfig = ResponseConfig()

# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a config file; raise ConfigError listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([Problem("config", "", f"cannot read {path}: {err.strerror}")]) from err
    except UnicodeDecodeError as err:
        raise ConfigError([Problem("config", "", f"{path} is not UTF-8 text (byte {err.start})")]) from err
    return parse_config(text, env)


def parse_config(text: str, env: Mapping[str, str] | None = None) -> Config:
    """Validate config text (YAML); raise ConfigError listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([Problem("config", "", f"is not valid YAML{where}")]) from err
    if raw is None:
        raw = {}
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        raise ConfigError([Problem("config", "", "must be a mapping at the top level")])
    try:
        raw = _expand_env(raw, os.environ if env is None else env, "", problems)
    except RecursionError as err:
        raise ConfigError(
            [Problem("config", "", "is nested too deeply (a YAML alias that refers to itself?)")]
        ) from err
    config = _Validator(problems).config(raw)
    if problems:
        raise ConfigError(problems)
    return config


def _expand_env(value: Any, env: Mapping[str, str], path: str, problems: list[Problem]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string, reporting unset variables by path."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = env.get(name)
            # As in the shell and docker compose: ":-" applies when unset *or* empty.
            if default is not None and not value:
                return default
            if value is not None:
                return value
            problems.append(Problem("config", path or "(top)", f"uses ${{{name}}}, which is not set"))
            return ""

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, env, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


class _Missing:
    pass


_MISSING = _Missing()


class _Fields:
    """Typed access to one mapping of the raw config that records problems instead of raising."""

    def __init__(self, where: str, raw: Mapping[str, Any], problems: list[Problem], prefix: str = "") -> None:
        self.where, self.raw, self.problems, self.prefix = where, raw, problems, prefix
        self.seen: set[str] = set()

    def problem(self, name: str, message: str) -> None:
        self.problems.append(Problem(self.where, self.prefix + name, message))

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: Any = _MISSING) -> Any:
        """The value of `name` if it has the right type; the default (or None, recorded) if not."""
        self.seen.add(name)
        value = self.raw.get(name, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                self.problem(name, "is required")
                return None
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, str) and str not in kinds and (int in kinds or float in kinds):
            value = _number_from_text(value, float in kinds)  # e.g. `cache_ttl: ${TTL}`
        # YAML booleans are ints to Python; a bool is never a number here.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int):
            ok = True
        else:
            ok = isinstance(value, kinds)
        if not ok:
            self.problem(name, f"must be {_kind_name(kinds)}, got {_describe(value)}")
            return None if default is _MISSING else default
        return value

    def int_in(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get(name, int, default)
        if value is None:
            return default
        if not low <= value <= high:
            self.problem(name, f"must be between {low} and {high}, got {value}")
        return int(value)

    def number_in(self, name: str, default: float, low: float, high: float) -> float:
        value = self.get(name, float, default)
        if value is None:
            return default
        if not low < value <= high:
            self.problem(name, f"must be more than {low:g} and at most {high:g}, got {value}")
        return float(value)

    def nested(self, name: str) -> _Fields | None:
        value = self.get(name, dict, None)
        return None if value is None else _Fields(self.where, value, self.problems, f"{self.prefix}{name}.")

    def required_nested(self, name: str, why: str) -> _Fields | None:
        """A required nested mapping; its absence is reported with `why`, a wrong type as usual."""
        if name not in self.raw:
            self.seen.add(name)
            self.problem(name, f"is required {why}")
            return None
        return self.nested(name)

    def section(self, name: str) -> _Fields | None:
        """A top-level section, whose problems are reported under its own name."""
        value = self.get(name, dict, None)
        return None if value is None else _Fields(name, value, self.problems)

    def reject_unknown(self, allowed_extra: frozenset[str] = frozenset()) -> None:
        for key in self.raw:
            if key not in self.seen and key not in allowed_extra:
                self.problem(str(key), "is not a known field")


def _number_from_text(text: str, allow_float: bool) -> Any:
    """A number written as text (what ${VAR} expansion yields), or the text unchanged."""
    try:
        return int(text.strip())
    except ValueError:
        pass
    if allow_float:
        try:
            return float(text.strip())
        except ValueError:
            pass
    return text


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _describe(value: Any) -> str:
    return {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        dict: "a mapping",
        list: "a list",
    }.get(type(value), type(value).__name__)


def _check_address(fields: _Fields, name: str, value: str | None) -> None:
    if value is None:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        fields.problem(name, f"must be HOST:PORT, got {value!r}")


def _check_url(fields: _Fields, name: str, value: str | None) -> None:
    if value is not None and not re.match(r"^https?://[^/\s]+", value):
        fields.problem(name, "must be an http:// or https:// URL")


def _header_name(fields: _Fields, name: str, value: str | None) -> str | None:
    if value is None:
        return None
    lowered = value.lower()
    if not _HEADER_NAME.match(lowered) or len(lowered) > 128:
        fields.problem(name, f"must be an HTTP header name (letters, digits, '-'), got {value!r}")
        return None
    if lowered in _RESERVED_HEADERS:
        fields.problem(name, f"must not be the reserved header {lowered!r}")
        return None
    return lowered


class _Validator:
    """Turns the raw (env-expanded) tree into a Config, recording every problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        self.warnings: list[str] = []

    def config(self, raw: Mapping[str, Any]) -> Config:
        top = _Fields("config", raw, self.problems)
        server = self.server(top.section("server"))
        cache = self.cache(top.section("cache"))
        response = self.response(top.section("response"))
        introspectors = self.introspectors(top.get("introspectors", list, []))
        users = self.users(top.get("users", list, []))
        policies = self.policies(top.get("policies", list, []), {i.id for i in introspectors})
        logs = self.logging(top.section("logging"))
        top.reject_unknown()
        return Config(server, cache, response, introspectors, policies, users, logs, tuple(self.warnings))

    def logging(self, f: _Fields | None) -> LoggingConfig:
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

    def server(self, f: _Fields | None) -> ServerConfig:
        if f is None:
            return ServerConfig()
        grpc_address = f.get("grpc_address", str, _DEFAULT_ServerConfig.grpc_address)
        _check_address(f, "grpc_address", grpc_address)
        admin_address = (
            f.get("admin_address", str, None) if "admin_address" in f.raw else _DEFAULT_ServerConfig.admin_address
        )
        _check_address(f, "admin_address", admin_address)
        workers = f.int_in("workers", 1, 1, 64)
        base_port = f.get("worker_base_port", int, None)
        if base_port is not None and not 1 <= base_port <= 65535 - workers:
            f.problem("worker_base_port", f"must leave room for {workers} ports below 65536, got {base_port}")
        drain = f.get("drain_delay", float, _DEFAULT_ServerConfig.drain_delay)
        if drain is not None and not 0 <= drain <= 600:
            f.problem("drain_delay", f"must be between 0 and 600, got {drain}")
        grace = f.number_in("shutdown_grace", _DEFAULT_ServerConfig.shutdown_grace, 0, 600)
        tls = self.tls(f.nested("tls"))
        f.reject_unknown()
        return ServerConfig(
            grpc_address or _DEFAULT_ServerConfig.grpc_address,
            admin_address,
            workers,
            base_port,
            float(drain if drain is not None else _DEFAULT_ServerConfig.drain_delay),
            grace,
            tls,
        )

    def tls(self, f: _Fields | None) -> TlsConfig | None:
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

    def cache(self, f: _Fields | None) -> CacheConfig:
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
        max_entries = f.int_in("max_entries", _DEFAULT_CacheConfig.max_entries, 1, 10_000_000)
        f.reject_unknown()
        return CacheConfig(backend, url, max_entries)

    def response(self, f: _Fields | None) -> ResponseConfig:
        if f is None:
            return ResponseConfig()
        user_id = _header_name(
            f, "user_id_header", f.get("user_id_header", str, _DEFAULT_ResponseConfig.user_id_header)
        )
        claims = _header_name(f, "claims_header", f.get("claims_header", str, _DEFAULT_ResponseConfig.claims_header))
        mapping = f.get("claim_headers", dict, {}) or {}
        claim_headers: list[tuple[str, str]] = []
        for claim, header in mapping.items():
            if not isinstance(claim, str) or not isinstance(header, str):
                f.problem(f"claim_headers.{claim}", "must map a claim name to a header name")
                continue
            name = _header_name(f, f"claim_headers.{claim}", header)
            if name is not None:
                claim_headers.append((claim, name))
        f.reject_unknown()
        result = ResponseConfig(
            user_id or _DEFAULT_ResponseConfig.user_id_header,
            claims or _DEFAULT_ResponseConfig.claims_header,
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
            f = _Fields(where, raw, self.problems)
            f.get("id", str, None)
            _resource_type(f, "TokenIntrospector")
            kind = f.get("type", str)
            built: IntrospectorConfig | None = None
            if kind == "jwt":
                built = self.jwt_introspector(f, str(ident))
                if built is not None:
                    if built.iss in issuers:
                        f.problem("jwt.iss", f"is already claimed by introspector {issuers[built.iss]!r}")
                    issuers[built.iss] = built.id
            elif kind == "opaque":
                built = self.opaque_introspector(f, str(ident))
            elif kind is not None:
                f.problem("type", f"must be jwt or opaque, got {kind!r}")
            f.reject_unknown()
            if built is not None and not any(p.where == where for p in self.problems):
                result.append(built)
        return tuple(result)

    def _common(self, f: _Fields) -> tuple[int, float, str | None]:
        cache_ttl = f.int_in("cache_ttl", 300, 1, 86400)
        timeout = f.number_in("timeout", 2.0, 0, 30)
        cookie = f.get("cookie", str, None)
        if cookie is not None and not re.match(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$", cookie):
            f.problem("cookie", f"must be a cookie name, got {cookie!r}")
        return cache_ttl, timeout, cookie

    def jwt_introspector(self, f: _Fields, ident: str) -> JwtIntrospectorConfig | None:
        cache_ttl, timeout, cookie = self._common(f)
        max_stale = f.int_in("max_stale", 0, 0, 86400)
        top_jwks = f.get("jwks_uri", str, None)
        jwt = f.required_nested("jwt", "for type jwt (it holds iss and the key source)")
        if jwt is None:
            return None
        iss = jwt.get("iss", str)
        aud_raw = jwt.get("aud", (str, list), None)
        audiences: frozenset[str] | None = None
        if isinstance(aud_raw, str):
            audiences = frozenset([aud_raw])
        elif isinstance(aud_raw, list):
            if not aud_raw or not all(isinstance(a, str) and a for a in aud_raw):
                jwt.problem("aud", "must be a string or a non-empty list of strings")
            else:
                audiences = frozenset(aud_raw)
        leeway = jwt.int_in("leeway", 30, 0, 3600)
        secret = jwt.get("secret", str, None)
        nested_jwks = jwt.get("jwks_uri", str, None)
        keys_raw = jwt.get("keys", list, None)
        jwks_uri = top_jwks or nested_jwks
        if top_jwks and nested_jwks:
            jwt.problem("jwks_uri", "is given both at the top level and under jwt; keep one")
        sources = [n for n, v in (("jwt.secret", secret), ("jwks_uri", jwks_uri), ("jwt.keys", keys_raw)) if v]
        if len(sources) != 1:
            f.problem(
                "jwt",
                "needs exactly one key source: jwt.secret, jwks_uri or jwt.keys"
                + (f" (found {', '.join(sources)})" if sources else " (found none)"),
            )
        _check_url(f, "jwks_uri", jwks_uri)
        short = [("jwt.secret", secret)] + [
            (f"jwt.keys[{i}].k", k.get("k")) for i, k in enumerate(keys_raw or []) if isinstance(k, dict)
        ]
        for field_name, value in short:
            if isinstance(value, str) and len(value.encode()) < MIN_HMAC_SECRET_BYTES:
                self.warnings.append(
                    f"introspector {ident!r}: {field_name} is shorter than {MIN_HMAC_SECRET_BYTES} bytes; "
                    "use a longer random secret in production"
                )
        keys: list[VerificationKey] = []
        for i, raw_key in enumerate(keys_raw or []):
            field_name = f"keys[{i}]"
            if not isinstance(raw_key, dict):
                jwt.problem(field_name, "must be a mapping")
                continue
            try:
                keys.append(load_static_key(raw_key))
            except BadKey as err:
                jwt.problem(f"{field_name}.{err.field}", err.message)
        jwt.reject_unknown()
        if iss is None:
            return None
        return JwtIntrospectorConfig(
            id=ident,
            iss=iss,
            audiences=audiences,
            leeway=leeway,
            cache_ttl=cache_ttl,
            max_stale=max_stale,
            timeout=timeout,
            cookie=cookie,
            secret=secret.encode() if secret else None,
            jwks_uri=jwks_uri,
            keys=tuple(keys),
        )

    def opaque_introspector(self, f: _Fields, ident: str) -> OpaqueIntrospectorConfig | None:
        cache_ttl, timeout, cookie = self._common(f)
        endpoint = f.required_nested("introspection_endpoint", "for type opaque ({url, authorization})")
        if endpoint is None:
            return None
        url = endpoint.get("url", str)
        _check_url(endpoint, "url", url)
        authorization = endpoint.get("authorization", str, None)
        if authorization is not None and not header_safe_text(authorization):
            endpoint.problem("authorization", "must be a single-line header value")
        endpoint.reject_unknown()
        if url is None:
            return None
        return OpaqueIntrospectorConfig(ident, url, authorization, cache_ttl, timeout, cookie)

    def policies(self, raw_list: list[Any], introspector_ids: set[str]) -> tuple[PolicyConfig, ...]:
        result: list[PolicyConfig] = []
        ids: set[str] = set()
        for index, raw in enumerate(raw_list):
            if not isinstance(raw, dict):
                self.problems.append(Problem(f"policies[{index}]", "", "must be a mapping"))
                continue
            ident = raw.get("id")
            where = f"policy {ident!r}" if isinstance(ident, str) and ident else f"policies[{index}]"
            f = _Fields(where, raw, self.problems)
            if f.get("id", str, None) is None:
                f.problem("id", "is required and must be a non-empty string")
            elif ident in ids:
                f.problem("id", "is used by more than one policy")
            ids.add(str(ident))
            _resource_type(f, "AccessPolicy")
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
            evaluate: Callable[[Mapping[str, Any]], bool] | None = None
            try:
                if engine == "matcho":
                    f.seen.add("matcho")
                    if "matcho" not in raw:
                        f.problem("matcho", "is required for engine matcho")
                    else:
                        matcher = compile_pattern(raw["matcho"], "matcho")
                        evaluate = lambda context, m=matcher: m(context, context)  # noqa: E731
                elif engine == "json-schema":
                    # Imported here: jsonschema costs ~8 MB of RSS, paid only by configs that use it.
                    from authz_service.policy.schema import compile_schema

                    f.seen.add("schema")
                    if "schema" not in raw:
                        f.problem("schema", "is required for engine json-schema")
                    else:
                        evaluate = compile_schema(raw["schema"], "schema")
                elif engine == "allow":
                    evaluate = lambda context: True  # noqa: E731
                elif engine is not None:
                    f.problem("engine", f"must be matcho, json-schema or allow, got {engine!r}")
            except AuthzError as err:  # PatternError, SchemaProblem
                f.problem("", str(err))
            except RecursionError:
                f.problem("matcho" if engine == "matcho" else "schema", "is nested too deeply")
            f.reject_unknown()
            if evaluate is not None and isinstance(ident, str):
                result.append(PolicyConfig(ident, str(engine), evaluate, introspectors))
        return tuple(result)

    def users(self, raw_list: list[Any]) -> Mapping[str, Mapping[str, Any]]:
        users: dict[str, Mapping[str, Any]] = {}
        for index, raw in enumerate(raw_list):
            if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
                self.problems.append(Problem(f"users[{index}]", "id", "is required and must be a non-empty string"))
                continue
            f = _Fields(f"user {raw['id']!r}", raw, self.problems)
            _resource_type(f, "User")
            if raw["id"] in users:
                f.problem("id", "is used by more than one user")
            # Stored as policies see it: empty values removed once, here. A plain dict on purpose:
            # jsonschema only treats dicts as objects, so a read-only proxy would skip `properties`.
            users[raw["id"]] = strip_empty(raw)
        return MappingProxyType(users)


def header_safe_text(value: str) -> bool:
    """No control characters: the value can go into an HTTP header as it is."""
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)


def _resource_type(f: _Fields, expected: str) -> None:
    value = f.get("resourceType", str, None)
    if value is not None and value != expected:
        f.problem("resourceType", f"must be {expected}, got {value!r}")
