"""The json-schema engine: draft-07 over the request context, compiled once at config load.

Aidbox's docs write `constant` for `const`; both accept `{"$data": "#/jwt/sub"}`, a JSON pointer
into the request context (AJV's $data). A pointer that does not resolve never matches.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from jsonschema import Draft7Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError

from authz_service.errors import PolicyError

# The context being validated: keyword functions only see the sub-instance, $data needs the root.
_ROOT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("authz_policy_root")
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
        expected = resolve_pointer(_ROOT.get(), expected["$data"])
        if expected is _UNRESOLVED:
            yield ValidationError("$data pointer does not resolve")
            return
    if not json_equal(instance, expected):
        yield ValidationError("value is not the expected constant")


_Validator = validators.extend(  # type: ignore[no-untyped-call]
    Draft7Validator, {"const": _const, "constant": _const}
)


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
        Draft7Validator.check_schema(schema)
    except SchemaError as err:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        raise SchemaProblem(f"{path}{where}", err.message) from None
    _check_data_refs(schema, path)
    validator = _Validator(schema)

    def evaluate(context: Mapping[str, Any]) -> bool:
        token = _ROOT.set(context)
        try:
            return bool(validator.is_valid(context))
        finally:
            _ROOT.reset(token)

    return evaluate


def compile_rule(rule: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    """An AccessPolicy's `schema`, compiled into a predicate over the request context."""
    return compile_schema(rule["schema"], "schema")


MAX_REASONS = 5


def explain_rule(rule: Mapping[str, Any], context: Mapping[str, Any], show: Callable[[Any], str]) -> list[str]:
    """The validator's messages for a (valid) schema that rejects the context, each led by the JSON
    path it concerns (`params.resource/type: ...`), at most MAX_REASONS, shallowest first."""
    validator = _Validator(rule["schema"])
    token = _ROOT.set(context)
    try:
        found = sorted((len(e.absolute_path), _reason(e, context, show)) for e in validator.iter_errors(context))
        return [reason for _, reason in found[:MAX_REASONS]]
    finally:
        _ROOT.reset(token)


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
