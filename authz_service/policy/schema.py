"""The json-schema engine: draft-07 over the request context, compiled once at config load.

Aidbox's docs write `constant` for `const`; both accept `{"$data": "#/jwt/sub"}`, a JSON pointer
into the request context (AJV's $data). A pointer that does not resolve never matches.

Regexes (`pattern`, the keys of `patternProperties`, and so `additionalProperties` next to them)
run within the rule's time budget (policy/budget.py) instead of through jsonschema's plain
`re.search`: they are compiled at load with the `regex` package in `re`'s reading, and an
evaluation that runs past the budget raises PolicyTimeout naming the schema path of the regex.
"""

from __future__ import annotations

import contextvars
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import regex
from jsonschema import Draft7Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError

from authz_service.errors import PolicyError
from authz_service.policy.budget import RegexBudget, backtracking_risk, found_within, re_literal_braces


@dataclass(frozen=True, slots=True)
class _Evaluation:
    """What keyword functions need beyond their sub-instance: the root (for $data), the rule's
    compiled regexes, where each sits in the rule, and the rule's regex budget."""

    root: Mapping[str, Any]
    regexes: Mapping[str, regex.Pattern[str]]
    paths: Mapping[str, str]
    budget: RegexBudget


# The evaluation under way: keyword functions only see the sub-instance and the schema.
_EVALUATION: contextvars.ContextVar[_Evaluation] = contextvars.ContextVar("authz_policy_evaluation")
_UNRESOLVED = object()


class SchemaProblem(PolicyError):
    """A policy's schema is not a valid draft-07 schema (or a $data pointer is malformed)."""


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: a boolean never equals a number (Python says True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) if type(a) is type(b) or (_is_number(a) and _is_number(b)) else False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_pointer(document: Any, pointer: str) -> Any:
    """Resolve `#/a/b` or `/a/b` (RFC 6901) in document; _UNRESOLVED if any step is missing."""
    text = pointer[1:] if pointer.startswith("#") else pointer
    if text == "":
        return document
    current = document
    for raw in text.split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(current, dict) and token in current:
            current = current[token]
        elif isinstance(current, list) and token.isdigit() and int(token) < len(current):
            current = current[int(token)]
        else:
            return _UNRESOLVED
    return current


def _is_data_ref(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"$data"} and isinstance(value["$data"], str)


def _const(validator: Any, expected: Any, instance: Any, schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if _is_data_ref(expected):
        expected = resolve_pointer(_EVALUATION.get().root, expected["$data"])
        if expected is _UNRESOLVED:
            yield ValidationError("$data pointer does not resolve")
            return
    if not json_equal(instance, expected):
        yield ValidationError("value is not the expected constant")


def _found(pattern: str, value: str) -> bool:
    """Whether `pattern` is found in `value`, within the evaluation's regex budget."""
    evaluation = _EVALUATION.get()
    compiled = evaluation.regexes.get(pattern)
    if compiled is None:  # not met at load (cannot happen for a compiled schema): compile it now
        compiled = _compile_regex(pattern, "schema")
    return found_within(compiled, value, evaluation.budget, evaluation.paths.get(pattern, "schema"))


def _pattern(validator: Any, pattern: str, instance: Any, schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    # jsonschema's `pattern`, budgeted.
    if validator.is_type(instance, "string") and not _found(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: Mapping[str, Any], instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    # jsonschema's `patternProperties`, budgeted: the keys it searches are the request's (header
    # names, query parameters), so they are as hostile as any value.
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _found(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    # jsonschema's `additionalProperties`, whose search of `patternProperties` is budgeted.
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extras = [key for key in instance if key not in properties and not any(_found(p, key) for p in patterns)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        joined = ", ".join(repr(extra) for extra in sorted(extras))
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            listed = ", ".join(repr(pattern) for pattern in sorted(patterns))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {listed}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(f"Additional properties are not allowed ({joined} {verb} unexpected)")


_Validator = validators.extend(  # type: ignore[no-untyped-call]
    Draft7Validator,
    {
        "const": _const,
        "constant": _const,
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    },
)

# Keywords whose values are data, not subschemas: a `pattern` key inside them is no regex.
_DATA_KEYWORDS = frozenset({"const", "constant", "enum", "default", "examples"})
# Keywords whose values map names to subschemas: their keys are names, not keywords.
_NAMED_SUBSCHEMAS = frozenset({"properties", "definitions", "dependencies"})


def schema_regexes(schema: Any, path: str = "schema") -> Iterator[tuple[str, str]]:
    """(path, regex) for every `pattern` and `patternProperties` key of a draft-07 schema."""
    if isinstance(schema, list):
        for index, item in enumerate(schema):
            yield from schema_regexes(item, f"{path}[{index}]")
        return
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        where = f"{path}.{key}"
        if key in _DATA_KEYWORDS:
            continue
        if key == "pattern" and isinstance(value, str):
            yield where, value
        elif key == "patternProperties" and isinstance(value, dict):
            for pattern, subschema in value.items():
                yield f"{where}[{pattern!r}]", pattern
                yield from schema_regexes(subschema, f"{where}[{pattern!r}]")
        elif key in _NAMED_SUBSCHEMAS and isinstance(value, dict):
            for name, subschema in value.items():
                yield from schema_regexes(subschema, f"{where}.{name}")
        else:
            yield from schema_regexes(value, where)


# `(?a)`/`(?a:...)`: `regex` scopes ASCII classes but folds case by the global flag alone, so the
# two engines would disagree under `(?i)`; ECMA-262 (what JSON Schema means) has no inline flags.
_ASCII_FLAG = re.compile(r"\(\?[a-zA-Z]*[aL][a-zA-Z]*(?:-[a-zA-Z]*)?[:)]")


def _compile_regex(pattern: str, where: str) -> regex.Pattern[str]:
    """A schema regex as jsonschema (Python's re, Unicode) reads it, compiled for budgeted
    matching; SchemaProblem for one `re` refuses, warns about, or would read differently."""
    if _ASCII_FLAG.search(pattern):
        raise SchemaProblem(where, f"regular expression {pattern!r}: the a and L flags are not supported here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        re.purge()  # re warns on a pattern's first compile only
        try:
            re.compile(pattern)
            compiled = regex.compile(re_literal_braces(pattern), regex.VERSION0)
        except (re.error, regex.error, OverflowError, RecursionError, ValueError) as err:
            raise SchemaProblem(where, f"invalid regular expression {pattern!r}: {err}") from None
    if caught:
        # e.g. "Possible nested set" for `[[:alpha:]]`, which regex would read as a POSIX class.
        raise SchemaProblem(where, f"ambiguous regular expression {pattern!r}: {caught[0].message}")
    return compiled


def _check_data_refs(schema: Any, path: str) -> None:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("const", "constant") and isinstance(value, dict) and "$data" in value:
                ref = value["$data"]
                if not _is_data_ref(value) or not (ref.startswith("#/") or ref.startswith("/") or ref == "#"):
                    raise SchemaProblem(f"{path}.{key}", "$data must be a JSON pointer such as '#/jwt/sub'")
            _check_data_refs(value, f"{path}.{key}")
    elif isinstance(schema, list):
        for index, item in enumerate(schema):
            _check_data_refs(item, f"{path}[{index}]")


def compile_schema(schema: Any, path: str = "schema") -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over the request context; raise SchemaProblem for an invalid schema."""
    if not isinstance(schema, (dict, bool)):
        raise SchemaProblem(path, "must be a JSON Schema object")
    try:
        with warnings.catch_warnings():
            # check_schema compiles each regex with re, which may warn; _regexes refuses those.
            warnings.simplefilter("ignore", FutureWarning)
            Draft7Validator.check_schema(schema)
    except SchemaError as err:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        raise SchemaProblem(f"{path}{where}", err.message) from None
    _check_data_refs(schema, path)
    regexes, paths = _regexes(schema, path)
    validator = _Validator(schema)
    budget = RegexBudget()

    def evaluate(context: Mapping[str, Any]) -> bool:
        budget.start()
        token = _EVALUATION.set(_Evaluation(context, regexes, paths, budget))
        try:
            return bool(validator.is_valid(context))
        finally:
            _EVALUATION.reset(token)

    return evaluate


def _regexes(schema: Any, path: str) -> tuple[dict[str, regex.Pattern[str]], dict[str, str]]:
    """Every regex of the schema compiled, and the path of each (its first place, for PolicyTimeout)."""
    compiled: dict[str, regex.Pattern[str]] = {}
    paths: dict[str, str] = {}
    for where, pattern in schema_regexes(schema, path):
        if pattern not in compiled:
            compiled[pattern] = _compile_regex(pattern, where)
            paths[pattern] = where
    return compiled, paths


def compile_rule(rule: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    """An AccessPolicy's `schema`, compiled into a predicate over the request context."""
    return compile_schema(rule["schema"], "schema")


def lint_rule(rule: Mapping[str, Any]) -> list[str]:
    """check-config's warnings for a (compiled) schema: each regex whose shape can backtrack
    exponentially, e.g. `schema.properties.uri.pattern: '^(a+)+$' has a nested quantifier, ...`."""
    found = []
    for where, pattern in schema_regexes(rule["schema"]):
        risk = backtracking_risk(pattern)
        if risk is not None:
            found.append(f"{where}: {pattern!r} {risk}, which can take exponential time on some inputs")
    return found


MAX_REASONS = 5


def explain_rule(rule: Mapping[str, Any], context: Mapping[str, Any], show: Callable[[Any], str]) -> list[str]:
    """The validator's messages for a (valid) schema that rejects the context, each led by the JSON
    path it concerns (`params.resource/type: ...`), at most MAX_REASONS, shallowest first."""
    schema = rule["schema"]
    validator = _Validator(schema)
    regexes, paths = _regexes(schema, "schema")
    budget = RegexBudget()
    budget.start()
    token = _EVALUATION.set(_Evaluation(context, regexes, paths, budget))
    try:
        found = sorted((len(e.absolute_path), _reason(e, context, show)) for e in validator.iter_errors(context))
        return [reason for _, reason in found[:MAX_REASONS]]
    finally:
        _EVALUATION.reset(token)


def _reason(error: ValidationError, context: Mapping[str, Any], show: Callable[[Any], str]) -> str:
    where = ".".join(str(part) for part in error.absolute_path) or "the request context"
    if error.validator in ("const", "constant"):
        expected: Any = error.validator_value
        if _is_data_ref(expected):
            pointer = expected["$data"]
            resolved = resolve_pointer(context, pointer)
            if resolved is _UNRESOLVED:
                return f"{where}: {pointer} resolves to nothing in the context, so nothing equals it"
            return f"{where}: {show(error.instance)} is not {pointer} ({show(resolved)})"
        return f"{where}: {show(error.instance)} is not {show(expected)}"
    if error.validator == "required":
        return f"{where}: {error.message}"
    # jsonschema's messages quote the instance: keep them, but render a long one through show.
    if len(error.message) <= 200:
        return f"{where}: {error.message}"
    return f"{where}: {show(error.instance)} fails {error.validator}"
