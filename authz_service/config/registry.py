"""What validation asks of the layers above config: policy engines, key loading, resource shaping.

Validation checks a rule by compiling it and a static key by loading it, but the compilers and key
loaders live above config (policy/, tokens/). They are handed down as one `Registries` value, built
in `authz_service/registries.py`, so that config imports nothing above it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from authz_service.config.model import CompiledRule, StaticKey


class Rejected(Exception):
    """A registry refusing one value of a resource: the (relative) field and why."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field} {message}")


class RuleEngine(Protocol):
    """One `engine:` value: which fields hold its rule, and how it compiles (policy.PolicyEngine)."""

    @property
    def fields(self) -> tuple[str, ...]:
        """The AccessPolicy keys that hold the rule."""
        ...

    def rule(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """The engine's part of a resource."""
        ...

    def missing(self, resource: Mapping[str, Any]) -> list[str]:
        """The rule fields the resource lacks."""
        ...

    def compile(self, rule: Mapping[str, Any]) -> CompiledRule:
        """The compiled rule; raise errors.PolicyError naming the path of what is wrong."""
        ...

    def lint(self, rule: Mapping[str, Any]) -> list[str]:
        """Warnings about a rule that compiles but may not do what its author means."""
        ...


@dataclass(frozen=True, slots=True)
class Registries:
    """Everything validation needs from above config, as values and callables."""

    engines: Mapping[str, RuleEngine]  # by `engine:` name
    rule_fields: frozenset[str]  # every rule field an AccessPolicy may carry, of any engine
    unknown_engine: Callable[[object], str]  # the problem for an `engine:` value not in engines
    # One `jwt.keys` entry checked and loaded as the introspector will load it; raises Rejected.
    static_key: Callable[[Mapping[str, Any]], StaticKey]
    hmac_min_bytes: Mapping[str, int]  # an OCT key's minimum secret length by alg
    # A User or Role as policies see it (empty values removed, references also as {resourceType, id}).
    stored_resource: Callable[[Mapping[str, Any]], dict[str, Any]]
    # The `responses` block compiled (denials.parse_responses) with the query parameters that may
    # carry a token; raises errors.ConfigError naming each field. Config holds the value opaque.
    responses: Callable[[Mapping[str, Any], Collection[str]], object] | None = None
    # `response.identity_token` validated (identity_token.parse_identity_token): its header name
    # and the opaque value; raises errors.ConfigError naming each field.
    identity_token: Callable[[Mapping[str, Any]], tuple[str, object]] | None = None
    # The DPoP proof algorithms `sender_constraints.algorithms` may name (tokens/dpop.py: asymmetric only).
    dpop_algorithms: frozenset[str] = frozenset()
