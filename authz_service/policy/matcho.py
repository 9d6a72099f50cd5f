"""Aidbox's matcho pattern language, compiled once at config load and evaluated per request.

`compile_pattern` turns a pattern (the `matcho` of an AccessPolicy, as YAML or JSON gives it) into
a tree of closures. Evaluating one never re-reads the pattern and, whatever JSON-like value it
meets, raises nothing but PolicyTimeout: its `#regex` searches share one time budget per evaluation
(policy/budget.py). The rules, and where we chose the stricter of two readings, are in docs/matcho.md.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from time import monotonic
from typing import Any, TypeAlias

import regex

from authz_service.context import CONTEXT_KEYS, LIST_KEYS, MAP_KEYS, STRING_KEYS
from authz_service.errors import PolicyError, PolicyTimeout
from authz_service.policy.budget import SLOW_MATCH, RegexBudget, backtracking_risk
from authz_service.policy.javaregex import ASCII_FLAGS, compile_java, translate
from authz_service.routes import parse_reference

Matcher: TypeAlias = Callable[[Any, Mapping[str, Any]], bool]
"""A compiled pattern: (value, context) -> matched?"""

PRESENT = "present?"
NIL = "nil?"
NOT_BLANK = "not-blank?"


class PatternError(PolicyError):
    """A matcho pattern cannot be compiled; `path` says where in the pattern the problem is."""


MAX_PATTERN_DEPTH = 64


def compile_pattern(pattern: Any, path: str = "matcho") -> Matcher:
    """Compile a matcho pattern; `path` names its place in the config for error messages (and in
    PolicyTimeout, for the regex that ran out of time)."""
    if not _depth_within(pattern, MAX_PATTERN_DEPTH):
        raise PatternError(path, f"is nested deeper than {MAX_PATTERN_DEPTH} levels")
    budget = RegexBudget()
    root = _compile(pattern, path, budget)
    if not budget.regexes:
        return root  # nothing to time

    def within_budget(value: Any, context: Mapping[str, Any]) -> bool:
        budget.start()  # each evaluation starts with the whole budget
        return root(value, context)

    return within_budget


def _depth_within(pattern: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(pattern, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, Mapping) else item if isinstance(item, list | tuple) else None
        if children is None:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def _compile(pattern: Any, path: str, budget: RegexBudget) -> Matcher:
    if isinstance(pattern, Mapping):
        return _compile_map(pattern, path, budget)
    if isinstance(pattern, list | tuple):
        return _compile_list(pattern, path, budget)
    if isinstance(pattern, str):
        return _compile_string(pattern, path, budget)
    if isinstance(pattern, bool):
        return _compile_bool(pattern)
    if isinstance(pattern, int | float):
        return _compile_number(pattern)
    if pattern is None:
        return _is_nil
    hint = " (quote YAML dates and timestamps)" if type(pattern).__module__ == "datetime" else ""
    raise PatternError(path, f"unsupported pattern of type {type(pattern).__name__}{hint}")


def matches(pattern: Any, value: Any, context: Mapping[str, Any] | None = None) -> bool:
    """Compile `pattern` and match `value`; without a context, `value` is the context, as for a policy."""
    if context is None:
        context = value if isinstance(value, Mapping) else {}
    return compile_pattern(pattern)(value, context)


# --------------------------------------------------------------------------- value helpers


def _is_list(value: Any) -> bool:
    # A JSON array. Strings are sequences too, but never lists here.
    return isinstance(value, list | tuple)


def _scalar_equal(left: Any, right: Any) -> bool:
    """JSON scalar equality: a bool equals only the same bool; 1 equals 1.0; "1" never equals 1."""
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    if isinstance(left, int | float):
        return isinstance(right, int | float) and left == right
    if isinstance(left, str):
        return isinstance(right, str) and left == right
    if left is None:
        return right is None
    return False  # not JSON: never equal, and never trusted to compare itself


def _json_equal(left: Any, right: Any) -> bool:
    """Deep JSON equality with the scalar rules above; iterative, so depth cannot overflow the stack."""
    pending: list[tuple[Any, Any]] = [(left, right)]
    while pending:
        a, b = pending.pop()
        if isinstance(a, Mapping):
            if not isinstance(b, Mapping) or len(a) != len(b):
                return False
            for key, item in a.items():
                if key not in b:
                    return False
                pending.append((item, b[key]))
        elif _is_list(a):
            if not _is_list(b) or len(a) != len(b):
                return False
            pending.extend(zip(a, b, strict=True))
        elif not _scalar_equal(a, b):
            return False
    return True


# --------------------------------------------------------------------------- scalars and strings


def _is_nil(value: Any, context: Mapping[str, Any]) -> bool:
    return value is None


def _is_present(value: Any, context: Mapping[str, Any]) -> bool:
    return value is not None


def _is_not_blank(value: Any, context: Mapping[str, Any]) -> bool:
    # Blank as in Clojure: empty or only whitespace. Non-strings are neither blank nor not-blank.
    return isinstance(value, str) and value != "" and not value.isspace()


def _compile_bool(pattern: bool) -> Matcher:
    def same_bool(value: Any, context: Mapping[str, Any]) -> bool:
        return value is pattern

    return same_bool


def _compile_number(pattern: float) -> Matcher:
    def same_number(value: Any, context: Mapping[str, Any]) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and value == pattern

    return same_number


def _compile_literal(pattern: str) -> Matcher:
    def same_string(value: Any, context: Mapping[str, Any]) -> bool:
        return isinstance(value, str) and value == pattern

    return same_string


_SPECIAL_STRINGS: dict[str, Matcher] = {PRESENT: _is_present, NIL: _is_nil, NOT_BLANK: _is_not_blank}


def _is_literal_string(pattern: Any) -> bool:
    """Whether a pattern is a plain string, matched by equality (no `#regex`, `.path` or `present?`)."""
    return isinstance(pattern, str) and pattern not in _SPECIAL_STRINGS and not pattern.startswith(("#", "."))


def _compile_string(pattern: str, path: str, budget: RegexBudget) -> Matcher:
    if _is_literal_string(pattern):  # the one definition of a literal ($contains relies on it too)
        return _compile_literal(pattern)
    special = _SPECIAL_STRINGS.get(pattern)
    if special is not None:
        return special
    if pattern.startswith("#"):
        return _compile_regex(pattern[1:], path, budget)
    return _compile_context_path(pattern, path)  # what is left starts with "."


def _compile_regex(source: str, path: str, budget: RegexBudget) -> Matcher:
    """A `#regex` as Aidbox (java.util.regex) reads it: Java-only syntax is rewritten first. `re`
    validates it (its errors and warnings are the config's); the `regex` package matches it, within
    the rule's time budget."""
    try:
        java = translate(source)
    except PolicyError as err:
        raise PatternError(path, err.message) from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # re caches compiled patterns and warns only on the first compile; purge so an ambiguous
        # regex is rejected on every load (a SIGHUP reload too), not only the first one.
        re.purge()
        try:
            re.compile(java.text, ASCII_FLAGS)
            compiled = compile_java(java)
        except (re.error, regex.error, OverflowError, RecursionError, ValueError) as err:
            # regex.error reads like re.error ("missing ) at position 2"); re's is the one seen first.
            why = f"{err.msg} at position {err.pos}" if isinstance(err, re.error) else str(err) or type(err).__name__
            raise PatternError(path, f"invalid regular expression {_quoted(source)}: {why}") from err
    if caught:
        # e.g. FutureWarning "Possible nested set" for `[[:alpha:]]`: Python would read it
        # differently from what the author meant, so refuse it instead of guessing.
        raise PatternError(path, f"ambiguous regular expression {_quoted(source)}: {caught[0].message}")
    budget.regexes += 1
    search = compiled.search

    def regex_found(value: Any, context: Mapping[str, Any]) -> bool:
        # budget.found_within, inlined: this runs once per regex per Check.
        if not isinstance(value, str):
            return False
        left = budget.left
        if left <= 0.0:  # regex reads a negative timeout as none at all
            raise PolicyTimeout("", path)
        start = monotonic()
        try:
            hit = search(value, timeout=left)
        except TimeoutError:
            budget.left = 0.0
            raise PolicyTimeout("", path) from None
        elapsed = monotonic() - start
        if elapsed < SLOW_MATCH:  # budget.charge, inlined too
            budget.left = left - elapsed
        else:
            budget.charge(left, elapsed)
        return hit is not None

    return regex_found


def _quoted(source: str, limit: int = 120) -> str:
    """A pattern quoted in a config problem, cut so that a hostile one cannot flood the message."""
    return repr(source) if len(source) <= limit else repr(source[:limit]) + f"... ({len(source)} characters)"


def compile_context_path(source: str, path: str) -> Callable[[Any], Any]:
    """The resolver of a `.a.b.0` path: context -> the value there, or None."""
    segments = source[1:].split(".")
    if any(segment == "" for segment in segments):
        raise PatternError(path, f"context path {source!r} has an empty segment")
    # Numeric segments index lists; on a map they are ordinary keys ("0").
    steps = tuple((segment, int(segment) if segment.isascii() and segment.isdigit() else None) for segment in segments)

    def resolve(context: Any) -> Any:
        current = context
        for key, index in steps:
            if isinstance(current, Mapping):
                current = current.get(key)
            elif index is not None and _is_list(current) and index < len(current):
                current = current[index]
            else:
                return None
            if current is None:
                return None
        return current

    return resolve


def _compile_context_path(source: str, path: str) -> Matcher:
    resolve = compile_context_path(source, path)

    def equals_context(value: Any, context: Mapping[str, Any]) -> bool:
        expected = resolve(context)
        # An unresolved path never matches, not even a missing value: otherwise a user without
        # the referenced field would pass a check such as `practitioner: .user.data.id`.
        return expected is not None and _json_equal(value, expected)

    return equals_context


# --------------------------------------------------------------------------- lists and maps


def _compile_list(pattern: Sequence[Any], path: str, budget: RegexBudget) -> Matcher:
    items = tuple(_compile(item, f"{path}[{i}]", budget) for i, item in enumerate(pattern))
    size = len(items)

    def prefix_matches(value: Any, context: Mapping[str, Any]) -> bool:
        if not _is_list(value) or len(value) < size:
            return False
        # A loop, not all(genexpr): ~0.3 us less a call, and this runs per Check.
        for matcher, item in zip(items, value, strict=False):  # noqa: SIM110
            if not matcher(item, context):
                return False
        return True

    return prefix_matches


def _compile_map(pattern: Mapping[Any, Any], path: str, budget: RegexBudget) -> Matcher:
    if "$one-of" in pattern and len(pattern) > 1:
        others = ", ".join(sorted(str(key) for key in pattern if key != "$one-of"))
        raise PatternError(f"{path}.$one-of", f"cannot be combined with other keys ({others})")
    fields: list[tuple[str, Matcher]] = []
    checks: list[Matcher] = []
    for key, sub in pattern.items():
        if not isinstance(key, str):
            raise PatternError(path, f"key {key!r} must be a string (quote it in YAML)")
        where = f"{path}.{key}"
        if key.startswith("$"):
            operator = _OPERATORS.get(key)
            if operator is None:
                known = ", ".join(_OPERATORS)
                raise PatternError(where, f"unknown operator {key!r} (known: {known})")
            checks.append(operator(sub, where, budget))
        else:
            fields.append((key, _compile(sub, where, budget)))

    if fields or not checks:
        checks.insert(0, _compile_fields(tuple(fields)))
    if len(checks) == 1:
        return checks[0]
    all_checks = tuple(checks)

    def all_hold(value: Any, context: Mapping[str, Any]) -> bool:
        for check in all_checks:  # noqa: SIM110 (a loop: cheaper than all(genexpr) per Check)
            if not check(value, context):
                return False
        return True

    return all_hold


def _compile_fields(fields: tuple[tuple[str, Matcher], ...]) -> Matcher:
    def subset_matches(value: Any, context: Mapping[str, Any]) -> bool:
        # Every Check asks this for each map of every rule: a loop, not all(genexpr).
        if not isinstance(value, Mapping):
            return False
        get = value.get
        for key, matcher in fields:  # noqa: SIM110
            if not matcher(get(key), context):
                return False
        return True

    return subset_matches


# --------------------------------------------------------------------------- $operators


def _pattern_list(spec: Any, path: str) -> list[Any]:
    if not isinstance(spec, list | tuple):
        raise PatternError(path, f"must be a list, got {type(spec).__name__}")
    if not spec:
        raise PatternError(path, "must not be empty")
    return list(spec)


def _op_enum(spec: Any, path: str, budget: RegexBudget) -> Matcher:
    items = _pattern_list(spec, path)
    for i, item in enumerate(items):
        if not isinstance(item, str | int | float):  # bool is an int
            raise PatternError(f"{path}[{i}]", f"must be a string, number or boolean, got {type(item).__name__}")
    bools = frozenset(item for item in items if isinstance(item, bool))
    numbers = frozenset(item for item in items if isinstance(item, int | float) and not isinstance(item, bool))
    strings = frozenset(item for item in items if isinstance(item, str))

    def in_enum(value: Any, context: Mapping[str, Any]) -> bool:
        if isinstance(value, bool):
            return value in bools
        if isinstance(value, str):
            return value in strings
        if isinstance(value, int | float):
            return value == value and value in numbers  # NaN equals nothing
        return False

    return in_enum


def _op_one_of(spec: Any, path: str, budget: RegexBudget) -> Matcher:
    if isinstance(spec, str) and spec.startswith("."):
        return _one_of_context(spec, path)
    options = tuple(_compile(item, f"{path}[{i}]", budget) for i, item in enumerate(_pattern_list(spec, path)))

    def any_option(value: Any, context: Mapping[str, Any]) -> bool:
        for option in options:  # noqa: SIM110 (a loop: cheaper than any(genexpr) per Check)
            if option(value, context):
                return True
        return False

    return any_option


def _one_of_context(source: str, path: str) -> Matcher:
    """`$one-of: .jwt.roles` (Aidbox's older docs): the value equals an element of the list at that
    path (or the value there, when it is not a list). An unresolved path matches nothing."""
    resolve = compile_context_path(source, path)

    def in_context_list(value: Any, context: Mapping[str, Any]) -> bool:
        allowed = resolve(context)
        if allowed is None or value is None:
            return False
        if _is_list(allowed):
            for item in allowed:  # noqa: SIM110 (a loop: cheaper than any(genexpr) per Check)
                if _json_equal(value, item):
                    return True
            return False
        return _json_equal(value, allowed)

    return in_context_list


def _op_reference(spec: Any, path: str, budget: RegexBudget) -> Matcher:
    target = _compile(spec, path, budget)

    def reference_matches(value: Any, context: Mapping[str, Any]) -> bool:
        parsed = parse_reference(value)
        return parsed is not None and target(parsed, context)

    return reference_matches


def _op_contains(spec: Any, path: str, budget: RegexBudget) -> Matcher:
    if _is_literal_string(spec):
        # `$contains: admin`, the common case: list membership. `in` compares with ==, and a
        # string equals only the same string, so this is _scalar_equal's answer.
        def contains_string(value: Any, context: Mapping[str, Any]) -> bool:
            return _is_list(value) and spec in value

        return contains_string
    element = _compile(spec, path, budget)

    def some_element(value: Any, context: Mapping[str, Any]) -> bool:
        if not _is_list(value):
            return False
        for item in value:  # noqa: SIM110 (a loop: cheaper than any(genexpr) per Check)
            if element(item, context):
                return True
        return False

    return some_element


def _op_every(spec: Any, path: str, budget: RegexBudget) -> Matcher:
    element = _compile(spec, path, budget)

    def every_element(value: Any, context: Mapping[str, Any]) -> bool:
        # An empty list does not match: "every role is X" must not pass a user with no roles.
        if not _is_list(value) or not value:
            return False
        for item in value:  # noqa: SIM110 (a loop: cheaper than all(genexpr) per Check)
            if not element(item, context):
                return False
        return True

    return every_element


def _op_not(spec: Any, path: str, budget: RegexBudget) -> Matcher:
    negated = _compile(spec, path, budget)

    def does_not_match(value: Any, context: Mapping[str, Any]) -> bool:
        return not negated(value, context)

    return does_not_match


def _op_present_all(spec: Any, path: str, budget: RegexBudget) -> Matcher:
    wanted = tuple(_compile(item, f"{path}[{i}]", budget) for i, item in enumerate(_pattern_list(spec, path)))

    def all_present(value: Any, context: Mapping[str, Any]) -> bool:
        if not _is_list(value):
            return False
        for pattern in wanted:  # loops, not all(any(genexpr)): this runs per Check
            for item in value:
                if pattern(item, context):
                    break
            else:
                return False
        return True

    return all_present


def _op_length(spec: Any, path: str, budget: RegexBudget) -> Matcher:
    if not isinstance(spec, int) or isinstance(spec, bool) or spec < 0:
        raise PatternError(path, f"must be a non-negative integer, got {spec!r}")

    def has_length(value: Any, context: Mapping[str, Any]) -> bool:
        return _is_list(value) and len(value) == spec

    return has_length


_OPERATORS: dict[str, Callable[[Any, str, RegexBudget], Matcher]] = {
    "$enum": _op_enum,
    "$one-of": _op_one_of,
    "$contains": _op_contains,
    "$every": _op_every,
    "$not": _op_not,
    "$present-all": _op_present_all,
    "$length": _op_length,
    "$reference": _op_reference,
}


def compile_rule(rule: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    """An AccessPolicy's `matcho`, compiled into a predicate over the request context."""
    matcher = compile_pattern(rule["matcho"], "matcho")

    def policy_matches(context: Mapping[str, Any]) -> bool:
        return matcher(context, context)

    return policy_matches


def lint_rule(rule: Mapping[str, Any]) -> list[str]:
    """check-config's warnings for a (compiled) `matcho`: each `#regex` whose shape can backtrack
    exponentially (`matcho.uri: '#^(a+)+$' has a nested quantifier, ...`), and each top-level key
    the request context never has or whose pattern can never match it (docs/policies.md)."""
    warnings_ = []
    for path, source in _regexes(rule["matcho"], "matcho"):
        try:
            text = translate(source).text
        except PolicyError:
            continue  # compile_rule refuses it; nothing to warn about
        risk = backtracking_risk(text)
        if risk is not None:
            warnings_.append(f"{path}: {'#' + source!r} {risk}, which can take exponential time on some inputs")
    if isinstance(rule["matcho"], Mapping):
        warnings_.extend(_context_warnings(rule["matcho"]))
    return warnings_


# A method as build_context has it: an HTTP token (RFC 9110 5.6.2), lower-cased.
_LOWER_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
# A regex that starts at the start of the value: `^` or `\A`, after any leading inline flags.
_ANCHORED = re.compile(r"(?:\(\?[a-zA-Z]+\))*(?:\^|\\A)")


def _context_warnings(pattern: Mapping[Any, Any]) -> Iterator[str]:
    """What a top-level matcho map asks of the context that no request context can give. Sound by
    construction: only keys build_context never sets, and literals of a type (or, for
    request-method, a spelling) the context's value never has; anything read through `.path`,
    `#regex` or an operator other than `$enum` is left alone."""
    for key, sub in pattern.items():
        if not isinstance(key, str) or key.startswith("$"):
            continue
        where = f"matcho.{key}"
        if key not in CONTEXT_KEYS:
            yield f"{where}: no request context has {key!r} (it has {', '.join(sorted(CONTEXT_KEYS))})"
            continue
        literals = _literals(sub)
        for literal in literals:
            why = _never(key, literal)
            if why is not None:
                yield f"{where}: {_shown(literal)} never matches: {why}"
        if key == "uri" and isinstance(sub, str) and sub.startswith("#") and not _ANCHORED.match(sub[1:]):
            yield (
                f"{where}: {sub!r} is not anchored with '^', so it matches anywhere in the path "
                "(also /other/prefix/...); start it with '^'"
            )


def _literals(sub: Any) -> list[Any]:
    """The values a pattern compares the context's value with as they are: itself (unless it is
    null, a regex, a context path or present?/nil?/not-blank?) or the items of a lone `$enum`."""
    if isinstance(sub, Mapping):
        values = sub.get("$enum") if len(sub) == 1 else None
        return list(values) if isinstance(values, list) else []  # $enum's strings are all literal
    if sub is None or (isinstance(sub, str) and (sub in _SPECIAL_STRINGS or sub.startswith(("#", ".")))):
        return []
    return [sub]


def _never(key: str, literal: Any) -> str | None:
    """Why the context's `key` can never equal `literal`, or None when it might."""
    if key in STRING_KEYS:
        if not isinstance(literal, str):
            return f"{key} is always a string"
        if key == "request-method" and literal.lower() != literal:
            return "request-method is lower case (get, post, ...)"
        if key == "request-method" and not _LOWER_METHOD.fullmatch(literal):
            return "request-method is an HTTP method name (letters, digits and !#$%&'*+.^_`|~-)"
    elif key in MAP_KEYS and not isinstance(literal, Mapping):
        return f"{key} is always a map"
    elif key in LIST_KEYS and not isinstance(literal, list | tuple):
        return f"{key} is always a list"
    return None


def _shown(value: Any) -> str:
    return _quoted(value) if isinstance(value, str) else repr(value)


def _regexes(pattern: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, source) of every `#regex` in a pattern, named as compile_pattern names them."""
    if isinstance(pattern, Mapping):
        for key, sub in pattern.items():
            if key in ("$enum", "$length") or (key == "$one-of" and isinstance(sub, str)):
                continue  # literal values, a count, a context path: no regex there
            yield from _regexes(sub, f"{path}.{key}")
    elif isinstance(pattern, list | tuple):
        for index, item in enumerate(pattern):
            yield from _regexes(item, f"{path}[{index}]")
    elif isinstance(pattern, str) and pattern.startswith("#") and pattern not in _SPECIAL_STRINGS:
        yield path, pattern[1:]


# --------------------------------------------------------------------------- explanations
#
# Used by test-policy and `authz-service explain` only, never by Check. The walk follows the
# pattern's maps and lists itself and asks the compiled matcher at every other node, so what it
# reports failing is exactly what fails in Check; it names the first failing path in the context.


def explain_rule(rule: Mapping[str, Any], context: Mapping[str, Any], show: Callable[[Any], str]) -> list[str]:
    """Why an AccessPolicy's `matcho` does not match the context: one reason, or [] when it matches."""
    reason = _explain(rule["matcho"], context, context, "", show)
    return [] if reason is None else [reason]


def _at(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _rule_path(where: str) -> str:
    """Where a regex evaluated at context path `where` sits in the rule, near enough for the
    PolicyTimeout of an explanation (the pattern path and the context path differ at operators)."""
    return f"matcho.{where}" if where else "matcho"


def _subject(where: str) -> str:
    return where or "the request context"


def _seen(value: Any, show: Callable[[Any], str]) -> str:
    return "nothing (missing)" if value is None else show(value)


def _explain(
    pattern: Any, value: Any, context: Mapping[str, Any], where: str, show: Callable[[Any], str]
) -> str | None:
    """The first reason `pattern` does not match `value` (at `where` in the context), or None."""
    if isinstance(pattern, Mapping):
        return _explain_map(pattern, value, context, where, show)
    if isinstance(pattern, list | tuple):
        if not _is_list(value):
            return f"{_subject(where)}: expected a list, saw {_seen(value, show)}"
        if len(value) < len(pattern):
            return f"{_subject(where)}: has {len(value)} items, the pattern needs at least {len(pattern)}"
        for index, (item_pattern, item) in enumerate(zip(pattern, value, strict=False)):
            reason = _explain(item_pattern, item, context, _at(where, index), show)
            if reason is not None:
                return reason
        return None
    if compile_pattern(pattern, _rule_path(where))(value, context):
        return None
    subject = _subject(where)
    if isinstance(pattern, str):
        if pattern == PRESENT:
            return f"{subject}: is missing (expected present?)"
        if pattern in (NIL, NOT_BLANK):
            return f"{subject}: {_seen(value, show)} is not {pattern}"
        if pattern.startswith("#"):
            return f"{subject}: {_seen(value, show)} does not match {pattern!r}"
        if pattern.startswith("."):
            expected = compile_context_path(pattern, "")(context)
            if expected is None:
                return f"{subject}: {pattern} resolves to nothing in the context, so nothing equals it"
            return f"{subject}: {_seen(value, show)} is not {pattern} ({show(expected)})"
    if pattern is None:
        return f"{subject}: {_seen(value, show)} is present (expected nothing)"
    return f"{subject}: {_seen(value, show)} is not {show(pattern)}"


def _explain_map(
    pattern: Mapping[str, Any], value: Any, context: Mapping[str, Any], where: str, show: Callable[[Any], str]
) -> str | None:
    fields = [(key, sub) for key, sub in pattern.items() if not key.startswith("$")]
    if fields or len(fields) == len(pattern):
        if not isinstance(value, Mapping):
            return f"{_subject(where)}: expected a map, saw {_seen(value, show)}"
        for key, sub in fields:
            reason = _explain(sub, value.get(key), context, _at(where, key), show)
            if reason is not None:
                return reason
    for key, spec in pattern.items():
        if key.startswith("$") and not compile_pattern({key: spec}, _rule_path(where))(value, context):
            return _explain_operator(key, spec, value, context, where, show)
    return None


def _explain_operator(
    operator: str, spec: Any, value: Any, context: Mapping[str, Any], where: str, show: Callable[[Any], str]
) -> str:
    subject = _subject(where)
    seen = _seen(value, show)
    if operator == "$enum":
        return f"{subject}: {seen} is not one of {show(spec)}"
    if operator == "$one-of":
        if isinstance(spec, str):
            return f"{subject}: {seen} is not one of {spec} ({_seen(compile_context_path(spec, '')(context), show)})"
        reasons = [_explain(option, value, context, where, show) or "" for option in spec]
        return f"{subject}: matches none of the $one-of options: " + "; ".join(
            f"[{index}] {reason.removeprefix(subject + ': ')}" for index, reason in enumerate(reasons)
        )
    if operator == "$not":
        return f"{subject}: {seen} matches what $not excludes ({show(spec)})"
    if operator == "$length":
        if not _is_list(value):
            return f"{subject}: $length needs a list, saw {seen}"
        return f"{subject}: has {len(value)} items, $length wants {spec}"
    if operator == "$reference":
        parsed = parse_reference(value)
        if parsed is None:
            return f"{subject}: {seen} is not a relative reference such as 'Patient/pt-1'"
        reason = _explain(spec, parsed, context, f"{subject}($reference)", show)
        return reason or f"{subject}: $reference does not match"
    if not _is_list(value):
        return f"{subject}: {operator} needs a list, saw {seen}"
    if operator == "$contains":
        return f"{subject}: no element matches {show(spec)}"
    if operator == "$every":
        if not value:
            return f"{subject}: is an empty list ($every needs at least one element)"
        element = compile_pattern(spec, _rule_path(where))
        index = next(i for i, item in enumerate(value) if not element(item, context))
        return _explain(spec, value[index], context, _at(where, index), show) or f"{subject}: $every fails"
    # $present-all
    for index, wanted in enumerate(spec):
        matcher = compile_pattern(wanted, _rule_path(where))
        if not any(matcher(item, context) for item in value):
            return f"{subject}: no element matches $present-all[{index}] ({show(wanted)})"
    return f"{subject}: {operator} does not match"
