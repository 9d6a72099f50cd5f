"""Validation of AccessPolicy, User and Role resources: rules compiled through the registries' engines."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from authz_service.config.fields import Fields, Sections
from authz_service.config.model import POLICY_MODES, CompiledRule, PolicyConfig, PolicyLinks, RoleConfig
from authz_service.errors import PolicyError, Problem


class PolicySections(Sections):
    """The `policies`, `users` and `roles` lists."""

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
            mode = f.get("mode", str, "enforce")
            if mode is not None and mode not in POLICY_MODES:
                f.problem("mode", f"must be one of {', '.join(POLICY_MODES)}, got {mode!r}")
            rule: dict[str, Any] = {}
            predicate: CompiledRule | None = None
            kind = self.registries.engines.get(engine) if engine is not None else None
            if kind is None:
                if engine is not None:
                    f.problem("engine", self.registries.unknown_engine(engine))
                    f.seen.update(self.registries.rule_fields)  # one problem (the engine), not one more per rule field
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
                result.append(
                    PolicyConfig(ident, str(engine), rule, predicate, introspectors, role_name, links, str(mode))
                )
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
                result.append(RoleConfig(ident, name, user_id, self.registries.stored_resource(raw)))
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
            users[raw["id"]] = self.registries.stored_resource(raw)
        return MappingProxyType(users)


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
