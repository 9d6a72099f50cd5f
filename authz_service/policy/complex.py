"""`engine: complex`: Aidbox's `and` / `or` over other engines' rules, compiled once at config load.

    engine: complex
    and:                                   # or `or:`; never both at one level
      - {engine: matcho, matcho: {...}}
      - {engine: json-schema, schema: {...}}
      - or:                                # a nested complex item; `engine: complex` may be omitted
          - {engine: allow}

`and` asks its items in order and stops at the first that fails; `or` stops at the first that
matches. Each item compiles with its own engine's compiler, so a complex policy evaluates through
the same closures a plain one does, plus one `all`/`any` per level. Each item is a rule of its own
for the regex time budget (policy/budget.py); a PolicyTimeout from one names its path
(`and[1].matcho.uri`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from authz_service.errors import PolicyError, PolicyTimeout
from authz_service.policy import ENGINES, PolicyEngine, engine_names, unknown_engine
from authz_service.policy.evaluate import Predicate

MAX_DEPTH = 16  # nested and/or levels: far beyond any policy a person writes
_OPERATORS = ("and", "or")
_ITEM_EXTRA = frozenset({"engine", "description", "id"})  # keys an item may carry besides its rule


def compile_rule(rule: Mapping[str, Any]) -> Predicate:
    """A complex policy's `and` or `or`, compiled into one predicate over the request context."""
    return _compile_node(rule, "", 1)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def operator_of(node: Mapping[str, Any], path: str) -> tuple[str, list[Any]]:
    """The node's operator (`and` or `or`) and its items; PolicyError when it has neither, both, or
    an empty or non-list value."""
    present = [name for name in _OPERATORS if name in node]
    if len(present) == 2:
        raise PolicyError(_join(path, "or"), "cannot sit next to `and` at one level: nest one inside the other")
    if not present:
        raise PolicyError(_join(path, "and"), "is required (or `or`): a complex rule combines items with and/or")
    operator = present[0]
    items = node[operator]
    if not isinstance(items, list) or not items:
        raise PolicyError(_join(path, operator), "must be a non-empty list of rules")
    return operator, items


def _compile_node(node: Mapping[str, Any], path: str, depth: int) -> Predicate:
    if depth > MAX_DEPTH:
        raise PolicyError(path, f"nests and/or deeper than {MAX_DEPTH} levels")
    operator, items = operator_of(node, path)
    predicates = tuple(compile_item(item, f"{_join(path, operator)}[{i}]", depth) for i, item in enumerate(items))
    if len(predicates) == 1:
        return predicates[0]
    if operator == "and":

        def all_match(context: Mapping[str, Any]) -> bool:
            return all(predicate(context) for predicate in predicates)

        return all_match

    def any_matches(context: Mapping[str, Any]) -> bool:
        return any(predicate(context) for predicate in predicates)

    return any_matches


def item_engine(item: Any, path: str) -> tuple[str, PolicyEngine | None]:
    """An item's engine name, and its registry entry (None for a nested complex); PolicyError for a
    malformed item, naming its path."""
    if not isinstance(item, Mapping):
        raise PolicyError(path, "must be a mapping such as {engine: matcho, matcho: {...}}")
    engine = item.get("engine")
    if engine is None and any(name in item for name in _OPERATORS):
        engine = "complex"  # Aidbox's examples leave `engine: complex` out of nested items
    if engine == "complex":
        unknown = sorted(str(key) for key in item if key not in _ITEM_EXTRA and key not in _OPERATORS)
        if unknown:
            raise PolicyError(_join(path, unknown[0]), "is not a field of a complex rule (and, or)")
        return "complex", None
    kind = ENGINES.get(engine) if isinstance(engine, str) else None
    if kind is None:
        if engine is None:
            raise PolicyError(_join(path, "engine"), f"is required: {engine_names()}")
        raise PolicyError(_join(path, "engine"), unknown_engine(engine))
    unknown = sorted(str(key) for key in item if key not in _ITEM_EXTRA and key not in kind.fields)
    if unknown:
        raise PolicyError(_join(path, unknown[0]), f"is not a field of engine {engine}")
    missing = kind.missing(item)
    if missing:
        raise PolicyError(_join(path, missing[0]), f"is required for engine {engine}")
    return kind.name, kind


def compile_item(item: Any, path: str, depth: int) -> Predicate:
    """One item of an and/or list: a nested complex rule or another engine's rule."""
    _, kind = item_engine(item, path)
    if kind is None:
        return _compile_node(item, path, depth + 1)
    try:
        predicate = kind.compile(kind.rule(item))
    except PolicyError as err:
        raise PolicyError(_join(path, err.path), err.message) from None

    def item_matches(context: Mapping[str, Any]) -> bool:
        try:
            return predicate(context)
        except PolicyTimeout as err:
            raise PolicyTimeout(err.policy, _join(path, err.what)) from None

    return item_matches


def lint_rule(rule: Mapping[str, Any]) -> list[str]:
    """check-config's warnings for a (compiled) complex rule: each item's own engine's warnings,
    led by the item's path (`and[0].matcho.uri: ...`)."""
    return _lint_node(rule, "")


def _lint_node(node: Mapping[str, Any], path: str) -> list[str]:
    operator, items = operator_of(node, path)
    found: list[str] = []
    for i, item in enumerate(items):
        where = f"{_join(path, operator)}[{i}]"
        _, kind = item_engine(item, where)
        if kind is None:
            found.extend(_lint_node(item, where))
        else:
            found.extend(f"{where}.{warning}" for warning in kind.lint(kind.rule(item)))
    return found


def explain_rule(rule: Mapping[str, Any], context: Mapping[str, Any], show: Callable[[Any], str]) -> list[str]:
    """Why a (valid) complex rule does not match: the failing branch of an `and`, every branch of an
    `or`, each reason prefixed with its branch's path; [] when it matches."""
    return _explain_node(rule, "", context, show)


def _explain_node(
    node: Mapping[str, Any], path: str, context: Mapping[str, Any], show: Callable[[Any], str]
) -> list[str]:
    operator, items = operator_of(node, path)
    reasons: list[str] = []
    for i, item in enumerate(items):
        where = f"{_join(path, operator)}[{i}]"
        engine, kind = item_engine(item, where)
        if compile_item(item, where, 1)(context):
            if operator == "or":
                return []
            continue
        if kind is None:
            found = _explain_node(item, where, context, show)
        else:
            found = [f"{where} ({engine}): {reason}" for reason in kind.explain(kind.rule(item), context, show)]
        reasons.extend(found or [f"{where} ({engine}): does not match"])
        if operator == "and":
            return reasons
    return reasons if operator == "or" else []
