"""`engine: allow`: a policy that matches every request it applies to (scope it with `introspectors`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from authz_service.policy.evaluate import Predicate


def _always(context: Mapping[str, Any]) -> bool:
    return True


def compile_rule(rule: Mapping[str, Any]) -> Predicate:
    """The predicate that always matches."""
    return _always


def explain_rule(rule: Mapping[str, Any], context: Mapping[str, Any], show: Callable[[Any], str]) -> list[str]:
    """Nothing to explain: the rule always matches."""
    return []
