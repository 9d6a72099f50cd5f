"""Config validation: raw YAML in, a frozen `Config` out, or every problem listed.

`check-config`, start-up, SIGHUP and the resource API all run exactly this code (through
`authz_service.registries`, which hands it the policy engines and key loaders it asks). Nothing
downstream looks at raw dicts. Static keys are loaded and policies compiled here, so a key that
cannot verify or a rule that cannot compile is a config error naming the resource and field. Each
kind of resource has its module: server.py, introspectors.py, policies.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from authz_service.config import yamlload
from authz_service.config.fields import Fields, expand_env
from authz_service.config.introspectors import IntrospectorSections
from authz_service.config.model import Config, PolicyConfig
from authz_service.config.policies import PolicySections
from authz_service.config.registry import Registries
from authz_service.config.server import ServerSections, loopback
from authz_service.errors import ConfigError, Problem


def read_config_text(path: str | os.PathLike[str]) -> str:
    """A config file's text; ConfigError when it cannot be read or is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([Problem("config", "", f"cannot read {path}: {err.strerror}")]) from err
    except UnicodeDecodeError as err:
        raise ConfigError([Problem("config", "", f"{path} is not UTF-8 text (byte {err.start})")]) from err


def load_config(path: str | os.PathLike[str], registries: Registries, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a config file; raise ConfigError listing every problem."""
    return parse_config(read_config_text(path), registries, env)


def parse_config(text: str, registries: Registries, env: Mapping[str, str] | None = None) -> Config:
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
    return validate_config(raw, registries, os.environ if env is None else env)


def validate_config(raw: Mapping[str, Any], registries: Registries, env: Mapping[str, str] | None = None) -> Config:
    """A Config from a raw mapping; `${VAR}` is expanded from env unless env is None."""
    problems: list[Problem] = []
    if env is not None:
        try:
            raw = expand_env(raw, env, "", problems)
        except RecursionError as err:
            raise ConfigError(
                [Problem("config", "", "is nested too deeply (a YAML alias that refers to itself?)")]
            ) from err
    config = _Validator(problems, registries).config(raw)
    if problems:
        raise ConfigError(problems)
    return config


def validate_policies(raw: Any, introspector_ids: Iterable[str], registries: Registries) -> tuple[PolicyConfig, ...]:
    """AccessPolicy resources on their own (test-policy's "try these"), checked exactly as in a
    config with those introspectors; ConfigError listing every problem."""
    problems: list[Problem] = []
    if not isinstance(raw, list):
        raise ConfigError([Problem("policies", "", "must be a list of AccessPolicy resources")])
    policies = _Validator(problems, registries).policies(raw, set(introspector_ids))
    if problems:
        raise ConfigError(problems)
    return policies


class _Validator(ServerSections, IntrospectorSections, PolicySections):
    """Turns the raw (env-expanded) tree into a Config, recording every problem."""

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
        token_params = dict.fromkeys(p for i in introspectors for p in i.from_params)
        responses = self.responses(top.get("responses", dict, None), token_params)
        enforcing = [p.id for p in policies if not p.dry_run]  # dry-run ones decide nothing: they may stay
        sender_constraints = self.sender_constraints(top.section("sender_constraints"))
        if authentication_only and enforcing:
            top.problem(
                "authentication_only",
                "is true, so every valid token is allowed and policies are never asked: "
                "remove the policies (or make them mode: dry-run), or set authentication_only: false",
            )
        if policies and not enforcing and not authentication_only:
            self.warnings.append(
                "policies: every policy is mode: dry-run, so none decides and no request is allowed (403 "
                "no_policies, as with no policies); set authentication_only: true to allow every valid token "
                "while they are watched"
            )
        top.reject_unknown()
        if server.workers > 1 and cache.backend == "memory":
            self.warnings.append(
                f"cache: with server.workers {server.workers} and cache.backend memory, each worker keeps its own "
                "DPoP replay cache, so a proof replayed to another worker within its window is not caught; "
                "set cache.backend: redis if clients send DPoP-bound tokens (docs/security.md)"
            )
        if api.enabled and server.admin_tls is None and not loopback(server.admin_address):
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
            responses=responses,
            sender_constraints=sender_constraints,
        )
