"""AccessPolicy engines by name: each compiles its rule once, at config load, into a predicate.

A new engine is one module with `compile_rule(rule) -> Predicate` and `explain_rule(rule,
context, show) -> [reasons]`, and one line in `ENGINES`. Check only ever runs the compiled
predicates; `explain_rule` is the slow walk behind test-policy and `authz-service explain`. Modules
are imported on first use, so an engine nobody configures costs nothing (json-schema pulls in
jsonschema, about 8 MB of RSS).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from authz_service.policy.evaluate import Predicate


@dataclass(frozen=True, slots=True)
class PolicyEngine:
    """One `engine:` value: which resource fields hold its rule, and where its compiler lives."""

    name: str
    fields: tuple[str, ...]  # the AccessPolicy keys that hold the rule
    module: str  # defines compile_rule(rule) -> Predicate and explain_rule(rule, context, show)
    any_field: bool = False  # True: one of `fields` is enough (complex: `and` or `or`); else all

    def rule(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """The engine's part of a resource (the keys it owns that are present)."""
        return {name: resource[name] for name in self.fields if name in resource}

    def missing(self, resource: Mapping[str, Any]) -> list[str]:
        """The rule fields the resource lacks (for any_field engines: `a or b` when it has none)."""
        absent = [name for name in self.fields if name not in resource]
        if self.any_field:
            return [" or ".join(absent)] if len(absent) == len(self.fields) else []
        return absent

    def compile(self, rule: Mapping[str, Any]) -> Predicate:
        """The predicate for a rule; raise PolicyError naming the path of what is wrong."""
        compiled: Predicate = importlib.import_module(self.module).compile_rule(rule)
        return compiled

    def lint(self, rule: Mapping[str, Any]) -> list[str]:
        """Warnings about a compiled rule that loads but may not do what its author means (check-config
        prints them; `lint_rule` in the engine's module, when it has one)."""
        lint = getattr(importlib.import_module(self.module), "lint_rule", None)
        return list(lint(rule)) if lint is not None else []

    def explain(self, rule: Mapping[str, Any], context: Mapping[str, Any], show: Callable[[Any], str]) -> list[str]:
        """Why a compiled rule does not match the context ([] when it does); values rendered by `show`."""
        reasons: list[str] = importlib.import_module(self.module).explain_rule(rule, context, show)
        return reasons


ENGINES: Mapping[str, PolicyEngine] = {
    engine.name: engine
    for engine in (
        PolicyEngine("matcho", ("matcho",), "authz_service.policy.matcho"),
        PolicyEngine("json-schema", ("schema",), "authz_service.policy.schema"),
        PolicyEngine("allow", (), "authz_service.policy.allow"),
        PolicyEngine("complex", ("and", "or"), "authz_service.policy.complex", any_field=True),
    )
}


def engine_names() -> str:
    """The known engines, for messages: `matcho, json-schema or allow`."""
    names = list(ENGINES)
    return ", ".join(names[:-1]) + " or " + names[-1]


# Aidbox engines we cannot run, and why: named in the config error instead of a bare "unknown".
_NOT_HERE = {
    "sql": "sql queries Aidbox's database, which an ext_authz service does not have; "
    "express the check over the request context with matcho or json-schema",
    "allow-rpc": "allow-rpc and matcho-rpc guard Aidbox's RPC endpoints, which are not proxied requests",
    "matcho-rpc": "allow-rpc and matcho-rpc guard Aidbox's RPC endpoints, which are not proxied requests",
}


# Every rule field an AccessPolicy may carry: ours, and those of Aidbox's engines we cannot run
# (`sql`; the rpc engines' `rpc`), so a policy naming such an engine gets one problem, not one more
# for its rule field.
RULE_FIELDS = frozenset(name for engine in ENGINES.values() for name in engine.fields) | {"sql", "rpc"}


def unknown_engine(engine: object) -> str:
    """The config error for an `engine:` value that is not in ENGINES."""
    message = f"must be {engine_names()}, got {engine!r}"
    hint = _NOT_HERE.get(engine) if isinstance(engine, str) else None
    return f"{message} ({hint})" if hint else message
