"""What a write through the resource API leaves behind besides the write: the audit line's digests,
and the warning a policy that allows every request earns (docs/resources.md, "Who changed what").

A digest is the first 16 hex digits of the sha256 of the resource's canonical JSON (keys sorted,
no spaces, UTF-8) *as GET shows it*, that is without its secret fields: an operator can check a
logged digest against what the API answers, and no digest of a secret ever reaches a log (a
truncated hash of a short HMAC secret could still be guessed offline). A change of a secret alone
leaves the digest as it was; the audit line says `secrets_changed` instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from authz_service.config.model import DRY_RUN
from authz_service.store.base import Resource
from authz_service.store.resources import without_secrets

DIGEST_HEX = 16

# JSON Schema keywords that constrain nothing: a schema made of these alone accepts every context.
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "default", "examples"})


def canonical_json(value: Any) -> bytes:
    """The one serialization digests are taken of: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(kind: str, resource: Resource | None) -> str | None:
    """`sha256:` and 16 hex digits of the resource as GET shows it; None for no resource."""
    if resource is None:
        return None
    return "sha256:" + hashlib.sha256(canonical_json(without_secrets(kind, resource))).hexdigest()[:DIGEST_HEX]


def secrets_changed(kind: str, before: Resource | None, after: Resource | None) -> bool:
    """Whether the fields GET leaves out differ (a rotated secret), when both versions exist."""
    if before is None or after is None:
        return False
    return canonical_json(before) != canonical_json(after) and digest(kind, before) == digest(kind, after)


def allows_everything(resource: Resource) -> str | None:
    """Why an AccessPolicy's rule matches every request it applies to (`engine: allow`, `matcho: {}`,
    a json-schema of `true` or `{}`, a complex rule made of such items), or None when it does not
    (or when that cannot be told without a request: only these plain shapes are recognized)."""
    if resource.get("resourceType", "AccessPolicy") != "AccessPolicy":
        return None
    if resource.get("mode") == DRY_RUN:
        return None  # it decides nothing: the write that makes it enforce is the one warned about
    why = _rule_allows_everything(resource)
    if why is None:
        return None
    scope = [f"{name} {resource[name]!r}"[:120] for name in ("introspectors", "roleName", "link") if resource.get(name)]
    who = f"every request it applies to ({', '.join(scope)})" if scope else "every request, even one without a token"
    return f"its rule ({why}) allows {who}"


def _rule_allows_everything(node: Mapping[str, Any], depth: int = 0) -> str | None:
    if depth > 16:
        return None
    engine = node.get("engine")
    if engine is None and ("and" in node or "or" in node):
        engine = "complex"
    if engine == "allow":
        return "engine: allow"
    if engine == "matcho":
        pattern = node.get("matcho")
        return "matcho: {}" if isinstance(pattern, Mapping) and not pattern else None
    if engine == "json-schema":
        schema = node.get("schema")
        if schema is True:
            return "schema: true"
        if isinstance(schema, Mapping) and set(schema) <= _ANNOTATIONS:
            return "schema: {}" if not schema else "a schema with no constraint"
        return None
    if engine == "complex":
        for operator in ("and", "or"):
            items = node.get(operator)
            if not isinstance(items, list) or not items or ("and" in node and "or" in node):
                continue
            reasons = [_rule_allows_everything(i, depth + 1) if isinstance(i, Mapping) else None for i in items]
            if operator == "and" and all(reasons):
                return f"complex and: every item matches everything ({reasons[0]})"
            if operator == "or" and any(reasons):
                return f"complex or: an item matches everything ({next(r for r in reasons if r)})"
    return None
