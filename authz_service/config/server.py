"""Validation of the process's own settings: server (listeners, TLS), cache, response, logging,
tracing and the resource API with its store."""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from authz_service.config.fields import Fields, Sections
from authz_service.config.model import (
    DEFAULT_HTTP_ENGINE,
    HTTP_ENGINES,
    UNNAMED_API_WRITER,
    ApiConfig,
    ApiToken,
    CacheConfig,
    LoggingConfig,
    ResponseConfig,
    SenderConstraintsConfig,
    ServerConfig,
    StoreConfig,
    TlsConfig,
    TracingConfig,
)
from authz_service.errors import ConfigError, Problem

MIN_API_TOKEN_CHARS = 16
_SERVER = ServerConfig()
_CACHE = CacheConfig()
_RESPONSE = ResponseConfig()


def _otel_installed() -> bool:
    """Whether the [otel] extra's SDK and OTLP/gRPC exporter can be imported (without importing them)."""
    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
        )
    except ImportError:  # a parent package is missing (or blocked)
        return False


class ServerSections(Sections):
    """The sections about this process: where it listens, what it caches, logs and exports."""

    def sender_constraints(self, f: Fields | None) -> SenderConstraintsConfig:
        """How sender-constrained tokens are checked (tokens/dpop.py): the DPoP proof window, its
        algorithms, and the header a proxy passes the client certificate in."""
        if f is None:
            return SenderConstraintsConfig()
        default = SenderConstraintsConfig()
        window = f.int_in("proof_window", default.proof_window, 1, 3600)
        leeway = f.int_in("proof_leeway", default.proof_leeway, 0, 300)
        algorithms: list[str] = []
        for i, alg in enumerate(f.get("algorithms", list, []) or []):
            if alg not in self.registries.dpop_algorithms:
                known = " ".join(sorted(self.registries.dpop_algorithms))
                f.problem(f"algorithms[{i}]", f"must be an asymmetric JWS algorithm ({known}), got {alg!r}")
            else:
                algorithms.append(alg)
        header = f.header_name("client_certificate_header", f.get("client_certificate_header", str, None))
        if header is not None and header in ("authorization", "cookie", "host", "dpop"):
            f.problem("client_certificate_header", f"must not be {header!r}")
            header = None
        entries = f.int_in("replay_max_entries", default.replay_max_entries, 1, 10_000_000)
        f.reject_unknown()
        return SenderConstraintsConfig(window, leeway, tuple(dict.fromkeys(algorithms)), header, entries)

    def tracing(self, f: Fields | None) -> TracingConfig:
        """OpenTelemetry export: an OTLP/gRPC endpoint and the service name spans carry."""
        if f is None:
            return TracingConfig()
        endpoint = f.get("otlp_endpoint", str, None)
        f.url("otlp_endpoint", endpoint)
        if endpoint is not None and not _otel_installed():
            f.problem(
                "otlp_endpoint",
                "needs OpenTelemetry, which is not installed: pip install 'authz-service[otel]' (the otel extra)",
            )
        name = f.get("service_name", str, TracingConfig().service_name) or TracingConfig().service_name
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            f.problem("service_name", "must be 1 to 64 letters, digits or '._-'")
        ratio = float(f.get("sample_ratio", float, TracingConfig().sample_ratio))
        if not 0.0 <= ratio <= 1.0:
            f.problem("sample_ratio", f"must be between 0 and 1, got {ratio:g}")
        f.reject_unknown()
        return TracingConfig(endpoint, name, ratio)

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
        # A bad address is a problem here; the default stands in for it so the rest is still checked.
        grpc_address = f.get("grpc_address", str, _SERVER.grpc_address)
        if f.address("grpc_address", grpc_address) is None:
            grpc_address = _SERVER.grpc_address
        admin_address = f.get("admin_address", str, None) if "admin_address" in f.raw else _SERVER.admin_address
        if admin_address is not None and f.address("admin_address", admin_address) is None:
            admin_address = _SERVER.admin_address
        http_address = f.get("http_address", str, None)
        if http_address is not None and f.address("http_address", http_address) is None:
            http_address = None
        http_engine = f.get("http_engine", str, _SERVER.http_engine) or _SERVER.http_engine
        if http_engine not in HTTP_ENGINES:
            f.problem("http_engine", f"must be one of {', '.join(HTTP_ENGINES)}, got {http_engine!r}")
            http_engine = _SERVER.http_engine
        elif http_engine == "granian" and DEFAULT_HTTP_ENGINE != "granian":
            f.problem("http_engine", "granian is not installed (pip install granian), or set aiohttp")
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
            grpc_address,
            admin_address,
            workers,
            base_port,
            float(drain if drain is not None else _SERVER.drain_delay),
            grace,
            tls,
            http_address,
            max_concurrent,
            admin_tls,
            http_engine,
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
        token_header, token = self._identity_token(f, f.get("identity_token", dict, None))
        f.reject_unknown()
        result = ResponseConfig(
            user_id or _RESPONSE.user_id_header,
            claims or _RESPONSE.claims_header,
            tuple(claim_headers),
            identity_token_header=token_header,
            identity_token=token,
        )
        names = result.identity_headers
        if len(set(names)) != len(names):
            f.problem(
                "",
                "user_id_header, claims_header, claim_headers and identity_token.header must all be different headers",
            )
        return result

    def _identity_token(self, f: Fields, raw: Mapping[str, Any] | None) -> tuple[str | None, object]:
        """`response.identity_token`, validated by the registry (identity_token.py signs above config)."""
        if raw is None:
            return None, None
        parse = self.registries.identity_token
        if parse is None:
            f.problem("identity_token", "is not supported by this build")
            return None, None
        try:
            return parse(raw)
        except ConfigError as err:
            self.problems.extend(err.problems)
            return None, None

    def responses(self, raw: Mapping[str, Any] | None, token_params: Collection[str]) -> object:
        """The top-level `responses` block compiled by the registry (denials.py, above config); None
        when absent or empty, so that denials keep their precomputed answers."""
        if raw is None:
            return None
        parse = self.registries.responses
        if parse is None:
            self.problems.append(Problem("responses", "", "is not supported by this build"))
            return None
        try:
            compiled = parse(raw, token_params)
        except ConfigError as err:
            self.problems.extend(err.problems)
            return None
        return compiled if compiled else None


def loopback(address: str | None) -> bool:
    """Whether a listen address is on the loopback interface only."""
    if address is None:
        return True
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")
