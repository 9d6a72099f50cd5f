"""Whether a policy allows a request: its scope (introspectors, roleName, link), then its compiled rule.

The config only holds policies (frozen, compiled once at load); deciding with them happens here, for
Check (decide.py), explanations (policy/explain.py) and test-policy alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from authz_service.config.model import PolicyConfig, PolicyLinks

Predicate = Callable[[Mapping[str, Any]], bool]
"""A compiled AccessPolicy rule: does it match this request context? (config holds it as CompiledRule)"""


def admits(links: PolicyLinks, context: Mapping[str, Any]) -> bool:
    """Whether the request is associated with one of the links (a user, a client or an operation)."""
    user = context.get("user")
    if user is not None and user.get("id") in links.users:
        return True
    client = context.get("client")
    if client is not None and client.get("id") in links.clients:
        return True
    operation = context.get("operation")
    return operation is not None and operation.get("id") in links.operations


def applies(policy: PolicyConfig, context: Mapping[str, Any], introspector: str | None) -> bool:
    """Whether the policy is for this request at all (its rule not yet asked)."""
    if policy.introspectors is not None and introspector not in policy.introspectors:
        return False
    if policy.role_name is not None and policy.role_name not in context.get("roles", ()):
        return False
    return policy.links is None or admits(policy.links, context)


def allows(policy: PolicyConfig, context: Mapping[str, Any], introspector: str | None) -> bool:
    """Whether the policy applies to the request and its rule matches the context."""
    return applies(policy, context, introspector) and policy.predicate(context)
