"""The validated config: frozen values, built once by `config.validate` (through `registries`), read everywhere else.

This module imports nothing else of the product, so every other part (tokens, policies, the
servers) can depend on it without a cycle. Values are checked when they are built, never here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any
from urllib.parse import urlsplit

# HTTP mode's server (`server.http_engine`): granian where it is installed, else aiohttp.
HTTP_ENGINES = ("granian", "aiohttp")
DEFAULT_HTTP_ENGINE = "granian" if find_spec("granian") is not None else "aiohttp"

CompiledRule = Callable[[Mapping[str, Any]], bool]
"""An AccessPolicy rule as its engine compiled it at load (policy/ evaluates it; config only holds it)."""


@dataclass(frozen=True, slots=True)
class Listen:
    """A `HOST:PORT` listen address, parsed once: the host without IPv6 brackets, the port (0: any)."""

    host: str
    port: int

    @classmethod
    def parse(cls, address: str) -> Listen | None:
        """The address's host and port, or None when it is not HOST:PORT with a port up to 65535."""
        host, sep, port = address.rpartition(":")
        host = host.strip("[]")  # [::1]:9001 as well as ::1:9001
        if not sep or not host or not port.isdigit() or len(port) > 5 or not 0 <= int(port) <= 65535:
            return None
        return cls(host, int(port))


def _listen(address: str | None) -> Listen | None:
    """The parsed form of an address the validator has checked (a model built in code: checked here)."""
    if address is None:
        return None
    parsed = Listen.parse(address)
    if parsed is None:
        raise ValueError(f"not a HOST:PORT listen address: {address!r}")
    return parsed


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
    http_address: str | None = None  # HTTP mode (Envoy's http_service, nginx, Traefik); off by default
    # Checks in flight per listener and process; more are shed at once with a 503, so a check
    # admitted under overload waits behind at most this many (bounded queueing, bounded p99).
    max_concurrent_checks: int = 2048
    admin_tls: TlsConfig | None = None  # TLS for the admin listener (resource API, metrics); off by default
    http_engine: str = DEFAULT_HTTP_ENGINE  # HTTP mode's server: granian (Rust, embedded) or aiohttp
    # The addresses above, parsed once here so that the shells never split HOST:PORT themselves.
    grpc_listen: Listen = field(init=False, compare=False, repr=False)
    admin_listen: Listen | None = field(init=False, compare=False, repr=False)
    http_listen: Listen | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grpc_listen", _listen(self.grpc_address))
        object.__setattr__(self, "admin_listen", _listen(self.admin_address))
        object.__setattr__(self, "http_listen", _listen(self.http_address))


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log levels: the service's own and the one decision lines are written at."""

    level: str = "info"
    decisions: int | None = logging.INFO  # logging level number; None: no decision lines


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry spans (`tracing`): exported to an OTLP/gRPC collector when an endpoint is set."""

    otlp_endpoint: str | None = None  # http://collector:4317 (https:// for TLS); None: no spans
    service_name: str = "authz-service"
    sample_ratio: float = 1.0  # of traces that start here; a caller's traceparent decides for its own


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Which cache backend holds introspection results."""

    backend: str = "memory"
    url: str | None = None
    max_entries: int = 100_000


@dataclass(frozen=True, slots=True)
class SenderConstraintsConfig:
    """`sender_constraints`: how DPoP proofs (RFC 9449) and certificate bindings (RFC 8705) are checked."""

    proof_window: int = 60  # seconds a DPoP proof stays acceptable after its iat
    proof_leeway: int = 5  # seconds a proof's iat may lie in the future (the client's clock ahead)
    # The proof algorithms accepted (asymmetric only); empty: every one tokens/dpop.py supports.
    algorithms: tuple[str, ...] = ()
    # The header a proxy in front sets to the client's TLS certificate (nginx's
    # $ssl_client_escaped_cert, Envoy's x-forwarded-client-cert); None: Envoy's
    # include_peer_certificate only. The shipped proxy configs strip a client's own copy.
    client_certificate_header: str | None = None
    replay_max_entries: int = 200_000  # the memory replay cache's bound (cache.backend memory)


@dataclass(frozen=True, slots=True)
class ResponseConfig:
    """Which headers carry the identity upstream."""

    user_id_header: str = "x-user-id"
    claims_header: str = "x-auth-claims"
    claim_headers: tuple[tuple[str, str], ...] = ()  # (claim, header)
    # `identity_token`: its header, and the validated block (identity_token.IdentityTokenConfig,
    # opaque here: config sits below the module that signs); None when not configured.
    identity_token_header: str | None = None
    identity_token: Any = field(default=None, repr=False)

    @property
    def identity_headers(self) -> tuple[str, ...]:
        """Every header this service owns: set on allow, removed when not set."""
        token = (self.identity_token_header,) if self.identity_token_header is not None else ()
        return (self.user_id_header, self.claims_header, *(h for _, h in self.claim_headers), *token)


@dataclass(frozen=True, slots=True)
class StaticKey:
    """One entry of `jwt.keys`, checked field by field (tokens/keys.py turns it into a verifier)."""

    kty: str  # RSA | EC | OKP | OCT (upper case)
    alg: str
    kid: str | None = None
    pem: str | None = None  # kty RSA, EC, OKP: a PEM public key or certificate
    secret: bytes | None = field(default=None, repr=False)  # kty OCT


@dataclass(frozen=True, slots=True)
class HeaderSource:
    """`from_headers` entry: the token is this header's value after `prefix` (case-insensitive)."""

    name: str  # lower case
    prefix: str = ""


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
    secret: bytes | None = field(default=None, repr=False)
    jwks_uri: str | None = None
    keys: tuple[StaticKey, ...] = ()
    discovery: bool = False  # keys from <iss>/.well-known/openid-configuration's jwks_uri
    from_headers: tuple[HeaderSource, ...] = ()
    from_params: tuple[str, ...] = ()
    # Seconds a token may live (exp - iat, or exp - now without iat), as Envoy jwt_authn's
    # max_lifetime; None: no limit (the issuer decides), as jwt_authn and Aidbox.
    max_lifetime: int | None = None
    optional: bool = False  # true: readiness does not wait for this introspector (its keys, its IdP)
    # optional: a token with `cnf` is verified (DPoP, mTLS), one without passes; required: one
    # without `cnf` is refused.
    sender_constraint: str = "optional"

    kind = "jwt"


@dataclass(frozen=True, slots=True)
class OpaqueIntrospectorConfig:
    """A `type: opaque` TokenIntrospector (RFC 7662)."""

    id: str
    url: str
    authorization: str | None = field(repr=False)
    cache_ttl: int
    timeout: float
    cookie: str | None
    from_headers: tuple[HeaderSource, ...] = ()
    from_params: tuple[str, ...] = ()
    type: str = "opaque"  # or "aspxauth": the same, reading the .ASPXAUTH cookie unless `cookie` says otherwise
    audiences: frozenset[str] | None = None  # `aud`: the answer's aud must share one (as jwt.aud)
    # A JWT-shaped token is sent here only when this says so; otherwise an unknown `iss` is a 401
    # with no network call (a JWT the jwt introspectors do not claim is not an opaque token).
    accepts_jwt: bool = False
    # RFC 7662 client authentication (RFC 6749 2.3.1), instead of a hand-written `authorization`.
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    client_auth: str = "client_secret_basic"  # or client_secret_post
    optional: bool = False  # true: readiness does not wait for this introspector (its IdP)
    sender_constraint: str = "optional"  # as JwtIntrospectorConfig's

    @property
    def kind(self) -> str:
        return self.type


IntrospectorConfig = JwtIntrospectorConfig | OpaqueIntrospectorConfig


@dataclass(frozen=True, slots=True)
class RoleConfig:
    """A Role (as in Aidbox): gives the user `user_id` the role `name`. An open resource: the rest of
    it (links, context, ...) is kept, empty values removed, as policies see it under `role`."""

    id: str
    name: str
    user_id: str
    resource: Mapping[str, Any] = field(compare=True, repr=False)


@dataclass(frozen=True, slots=True)
class PolicyLinks:
    """`AccessPolicy.link`: the users, clients and operations a policy is for (Aidbox's semantics:
    a policy with links applies to a request associated with any one of them; policy/evaluate.py decides)."""

    users: frozenset[str] = frozenset()
    clients: frozenset[str] = frozenset()
    operations: frozenset[str] = frozenset()


DRY_RUN = "dry-run"
POLICY_MODES = ("enforce", DRY_RUN)
"""AccessPolicy `mode` (not an Aidbox field): enforce (the default) decides; dry-run is evaluated
after the enforcing policies and only reported (decision log `dry_run`, authz_policy_dry_run_total)."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """An AccessPolicy: its rule as written (for explanations) and compiled (for Check), and whom it
    applies to (introspectors, roleName, link). policy/evaluate.py asks it; this only holds it."""

    id: str
    engine: str
    rule: Any = field(compare=True, repr=False)  # the engine's part of the resource, as written
    predicate: CompiledRule = field(compare=False, repr=False)
    introspectors: frozenset[str] | None = None  # None: applies to every request
    role_name: str | None = None  # only for users holding a Role of this name
    links: PolicyLinks | None = None  # only for requests of these users, clients or operations
    mode: str = "enforce"  # one of POLICY_MODES; dry-run: evaluated and reported, never deciding

    @property
    def dry_run(self) -> bool:
        """Whether the policy is only watched (`mode: dry-run`): decide.py never lets it decide."""
        return self.mode == DRY_RUN


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where resources written through the resource API live (`api.store`)."""

    backend: str = "file"  # file (one YAML file per resource in `path`) | redis (`url`)
    path: str | None = None
    url: str | None = field(default=None, repr=False)  # may carry a password
    prefix: str = "authz:resources"  # redis: key and channel prefix, so deployments can share a Redis


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One writer of the resource API: its name (logged with every write) and its bearer token."""

    name: str
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The resource API on the admin listener (`api`): on only when `token` or `tokens` is set."""

    token: str | None = field(default=None, repr=False)  # one unnamed writer (`api.token`)
    store: StoreConfig | None = None  # also read (and watched) when token is None: resources then are read-only
    max_body_bytes: int = 1_048_576
    tokens: tuple[ApiToken, ...] = ()  # named writers (`api.tokens: [{name, token}]`)

    @property
    def enabled(self) -> bool:
        """Whether the resource API is served (some token is configured)."""
        return self.token is not None or bool(self.tokens)

    @property
    def writers(self) -> tuple[ApiToken, ...]:
        """Every accepted token with the name writes are logged under (`api.token` is "api-token")."""
        unnamed = (ApiToken(UNNAMED_API_WRITER, self.token),) if self.token is not None else ()
        return (*unnamed, *self.tokens)


UNNAMED_API_WRITER = "api-token"


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
    roles: tuple[RoleConfig, ...] = ()
    api: ApiConfig = field(default_factory=ApiConfig)
    # Authentication-only (every valid token allowed, as Envoy's jwt_authn) is a declared mode.
    # Without it, no policies means nothing is allowed: a policy set that becomes empty at run time
    # (a half-written file, the last API policy deleted, a store that restarted empty) denies more,
    # never allows more.
    authentication_only: bool = False
    tracing: TracingConfig = field(default_factory=TracingConfig)
    # The `responses` block as compiled at load (denials.Responses, opaque here); None when absent
    # or empty, so that every denial keeps its precomputed answer.
    responses: Any = field(default=None, compare=False, repr=False)
    sender_constraints: SenderConstraintsConfig = field(default_factory=SenderConstraintsConfig)

    def summary(self) -> str:
        """One line for check-config and the start-up log."""
        kinds = ", ".join(f"{i.id} ({i.kind})" for i in self.introspectors)
        return (
            f"config OK: {len(self.introspectors)} introspector(s) [{kinds}], "
            f"{len(self.policies)} policy(ies), {len(self.users)} user(s), {len(self.roles)} role(s), "
            f"cache {self.cache.backend}, grpc {self.server.grpc_address}"
            + (", authentication-only" if self.authentication_only else "")
            + (f", spans to {_host_of(self.tracing.otlp_endpoint)}" if self.tracing.otlp_endpoint else "")
        )


def _host_of(url: str) -> str:
    """scheme://host[:port] of a URL: what a log line may show of an endpoint (no userinfo, path or query)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
