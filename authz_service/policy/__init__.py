"""AccessPolicy engines by name: each compiles its rule once, at config load, into a predicate.

A new engine is one module with `compile_rule(rule) -> Predicate` and one line in `ENGINES`.
Modules are imported on first use, so an engine nobody configures costs nothing (json-schema
pulls in jsonschema, about 8 MB of RSS).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from authz_service.config.model import Predicate


@dataclass(frozen=True, slots=True)
class PolicyEngine:
    """One `engine:` value: which resource fields hold its rule, and where its compiler lives."""

    name: str
    fields: tuple[str, ...]  # the AccessPolicy keys that hold the rule (all required)
    module: str  # defines compile_rule(rule: Mapping[str, Any]) -> Predicate

    def rule(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """The engine's part of a resource (the keys it owns that are present)."""
        return {name: resource[name] for name in self.fields if name in resource}

    def missing(self, resource: Mapping[str, Any]) -> list[str]:
        """The rule fields the resource lacks."""
        return [name for name in self.fields if name not in resource]

    def compile(self, rule: Mapping[str, Any]) -> Predicate:
        """The predicate for a rule; raise PolicyError naming the path of what is wrong."""
        compiled: Predicate = importlib.import_module(self.module).compile_rule(rule)
        return compiled


ENGINES: Mapping[str, PolicyEngine] = {
    engine.name: engine
    for engine in (
        PolicyEngine("matcho", ("matcho",), "authz_service.policy.matcho"),
        PolicyEngine("json-schema", ("schema",), "authz_service.policy.schema"),
        PolicyEngine("allow", (), "authz_service.policy.allow"),
    )
}


def engine_names() -> str:
    """The known engines, for messages: `matcho, json-schema or allow`."""
    names = list(ENGINES)
    return ", ".join(names[:-1]) + " or " + names[-1]
