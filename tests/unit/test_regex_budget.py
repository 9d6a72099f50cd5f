"""Policy regexes run within a time budget: a hostile value cannot stall the loop, and check-config
warns about the shapes that backtrack.

`^(a|aa)+$` searched in `'a' * 40 + 'b'` takes hours without a budget (the `regex` package, like
`re`, tries every way to split the a's); `^(a+)+$`, the textbook case, the `regex` package's own
guards already answer at once, so the tests use the first to prove the budget.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import regex

from authz_service.config.model import PolicyConfig
from authz_service.errors import PolicyTimeout
from authz_service.policy import complex as complex_engine
from authz_service.policy import matcho, schema
from authz_service.policy.budget import (
    NESTED,
    OVERLAPPING,
    REGEX_BUDGET,
    backtracking_risk,
    re_literal_braces,
)
from authz_service.policy.explain import Redactor, explain_policy
from authz_service.policy.javaregex import ASCII_FLAGS, compile_java, translate
from authz_service.policy.matcho import PatternError, compile_pattern
from authz_service.registries import parse_config

CATASTROPHIC = "^(a|aa)+$"
HOSTILE = "a" * 40 + "b"
# What the tests allow a budgeted evaluation: the budget, the matcher's last 256 steps, and a
# loaded 2-core CI machine (the budget is CPU time; wall time may add the neighbours' share).
CPU_BOUND = REGEX_BUDGET + 0.1
WALL_BOUND = 10 * REGEX_BUDGET + 2.0

Predicate = Callable[[Mapping[str, Any]], bool]


def timed_out(predicate: Predicate, context: Mapping[str, Any]) -> tuple[PolicyTimeout, float, float]:
    """The PolicyTimeout the predicate raises, and the CPU and wall seconds it took to raise it."""
    cpu, wall = time.process_time(), time.monotonic()
    with pytest.raises(PolicyTimeout) as caught:
        predicate(context)
    return caught.value, time.process_time() - cpu, time.monotonic() - wall


def assert_within_budget(cpu: float, wall: float) -> None:
    assert REGEX_BUDGET * 0.5 <= cpu < CPU_BOUND, cpu  # it did run (about) the budget, and no longer
    assert wall < WALL_BOUND, wall


# --------------------------------------------------------------------------- matcho


def test_a_catastrophic_matcho_regex_raises_policy_timeout_within_the_budget() -> None:
    rule = matcho.compile_rule({"matcho": {"headers": {"x-tenant": f"#{CATASTROPHIC}"}}})
    err, cpu, wall = timed_out(rule, {"headers": {"x-tenant": HOSTILE}})
    assert (err.policy, err.what) == ("", "matcho.headers.x-tenant")  # the Authorizer adds the id
    assert HOSTILE not in str(err)  # the value is never named
    assert_within_budget(cpu, wall)


def test_the_textbook_nested_quantifier_is_answered_at_once_and_does_not_match() -> None:
    # `re` would backtrack for hours here; the regex package's guards see through (a+)+.
    rule = matcho.compile_rule({"matcho": {"uri": "#^(a+)+$"}})
    started = time.process_time()
    assert rule({"uri": HOSTILE}) is False
    assert rule({"uri": "aaaa"}) is True
    assert time.process_time() - started < REGEX_BUDGET


def test_the_budget_is_per_evaluation_so_many_slow_values_cannot_add_up() -> None:
    # Each of these takes ~5 ms: 500 of them would hold the loop for seconds with a per-match budget.
    slow = "a" * 20 + "b"
    rule = matcho.compile_rule({"matcho": {"params": {"tag": {"$contains": f"#{CATASTROPHIC}"}}}})
    err, cpu, wall = timed_out(rule, {"params": {"tag": [slow] * 500}})
    assert err.what == "matcho.params.tag.$contains"
    assert_within_budget(cpu, wall)


def test_each_evaluation_starts_with_the_whole_budget() -> None:
    rule = matcho.compile_rule({"matcho": {"headers": {"x-tenant": f"#{CATASTROPHIC}"}}})
    timed_out(rule, {"headers": {"x-tenant": HOSTILE}})
    assert rule({"headers": {"x-tenant": "aaaa"}}) is True
    assert all(rule({"headers": {"x-tenant": "a" * 30}}) for _ in range(2000))


def test_a_timeout_is_never_read_as_no_match_so_not_cannot_turn_it_into_an_allow() -> None:
    rule = matcho.compile_rule({"matcho": {"headers": {"x-tenant": {"$not": f"#{CATASTROPHIC}"}}}})
    assert rule({"headers": {"x-tenant": "b"}}) is True
    timed_out(rule, {"headers": {"x-tenant": HOSTILE}})


def test_a_pattern_without_regexes_has_no_budget_wrapper() -> None:
    compiled = compile_pattern({"request-method": "get"})
    assert compiled.__name__ == "subset_matches"  # nothing to time, nothing added to its cost
    assert compile_pattern({"uri": "#^/x"}).__name__ == "within_budget"


# --------------------------------------------------------------------------- json-schema


def headers_schema(keyword: dict[str, Any]) -> Predicate:
    return schema.compile_rule({"schema": {"properties": {"headers": keyword}}})


def test_a_catastrophic_schema_pattern_raises_policy_timeout_naming_its_schema_path() -> None:
    rule = headers_schema({"properties": {"x-tenant": {"pattern": CATASTROPHIC}}})
    assert rule({"headers": {"x-tenant": "aaaa"}}) is True
    assert rule({"headers": {"x-tenant": "ab"}}) is False
    err, cpu, wall = timed_out(rule, {"headers": {"x-tenant": HOSTILE}})
    assert err.what == "schema.properties.headers.properties.x-tenant.pattern"
    assert_within_budget(cpu, wall)


def test_pattern_properties_searches_the_requests_keys_within_the_budget() -> None:
    rule = headers_schema({"patternProperties": {CATASTROPHIC: {"const": "v"}}})
    assert rule({"headers": {"aaaa": "v"}}) is True
    assert rule({"headers": {"aaaa": "w"}}) is False
    err, cpu, wall = timed_out(rule, {"headers": {HOSTILE: "v"}})
    assert err.what == f"schema.properties.headers.patternProperties[{CATASTROPHIC!r}]"
    assert_within_budget(cpu, wall)


def test_additional_properties_next_to_pattern_properties_keeps_its_meaning_and_its_budget() -> None:
    rule = headers_schema({"properties": {"host": {}}, "patternProperties": {"^x-": {}}, "additionalProperties": False})
    assert rule({"headers": {"host": "h", "x-a": "1"}}) is True
    assert rule({"headers": {"host": "h", "cookie": "1"}}) is False
    hostile = headers_schema({"patternProperties": {CATASTROPHIC: {}}, "additionalProperties": False})
    assert hostile({"headers": {"aaaa": "1"}}) is True
    timed_out(hostile, {"headers": {HOSTILE: "1"}})


def test_additional_properties_explains_as_jsonschema_did() -> None:
    rule = {"schema": {"properties": {"headers": {"patternProperties": {"^x-": {}}, "additionalProperties": False}}}}
    reasons = schema.explain_rule(rule, {"headers": {"cookie": "1"}}, repr)
    assert reasons == ["headers: 'cookie' does not match any of the regexes: '^x-'"]
    plain = {"schema": {"properties": {"headers": {"additionalProperties": False}}}}
    assert schema.explain_rule(plain, {"headers": {"b": 1, "a": 2}}, repr) == [
        "headers: Additional properties are not allowed ('a', 'b' were unexpected)"
    ]


@pytest.mark.parametrize(
    ("pattern", "value", "found"),
    [
        ("^x{e}$", "x{e}", True),  # re reads a brace that starts no repetition as a literal ...
        ("^x{e<=1}$", "y", False),  # ... and so must the regex package (not as a fuzzy match)
        ("^x{2}$", "xx", True),
        ("^x{,2}$", "xx", True),
        ("^\\N{DIGIT ONE}{2}$", "11", True),
    ],
)
def test_schema_regexes_keep_res_reading_of_braces(pattern: str, value: str, found: bool) -> None:
    assert (re.search(pattern, value) is not None) is found
    assert headers_schema({"properties": {"x": {"pattern": pattern}}})({"headers": {"x": value}}) is found


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("[[:alpha:]]", "ambiguous regular expression"),  # regex would read a POSIX class here
        ("(?a:\\w)", "the a and L flags are not supported here"),
    ],
)
def test_schema_regexes_the_two_engines_would_read_differently_are_refused(pattern: str, problem: str) -> None:
    with pytest.raises(schema.SchemaProblem) as caught:
        headers_schema({"properties": {"x": {"pattern": pattern}}})
    assert caught.value.path == "schema.properties.headers.properties.x.pattern"
    assert problem in caught.value.message


def test_re_literal_braces_escapes_only_what_re_reads_as_a_literal() -> None:
    assert re_literal_braces("a{2,3}[{]\\{x{e}{}") == "a{2,3}[{]\\{x\\{e}\\{}"
    assert re_literal_braces("plain") == "plain"


# --------------------------------------------------------------------------- complex and explain


def test_a_complex_items_timeout_names_the_items_path() -> None:
    rule = complex_engine.compile_rule(
        {"and": [{"engine": "allow"}, {"or": [{"engine": "matcho", "matcho": {"uri": f"#{CATASTROPHIC}"}}]}]}
    )
    err, _, _ = timed_out(rule, {"uri": HOSTILE})
    assert err.what == "and[1].or[0].matcho.uri"


def policy(rule: dict[str, Any], engine: str = "matcho") -> PolicyConfig:
    from authz_service.policy import ENGINES

    return PolicyConfig("slow", engine, rule, ENGINES[engine].compile(rule))


@pytest.mark.parametrize(
    ("rule", "engine", "what"),
    [
        ({"matcho": {"uri": f"#{CATASTROPHIC}"}}, "matcho", "matcho.uri"),
        (
            {"schema": {"properties": {"uri": {"pattern": CATASTROPHIC}}}},
            "json-schema",
            "schema.properties.uri.pattern",
        ),
        ({"or": [{"engine": "matcho", "matcho": {"uri": f"#{CATASTROPHIC}"}}]}, "complex", "or[0].matcho.uri"),
    ],
)
def test_explain_reports_a_timeout_as_its_reason_and_does_not_hang(
    rule: dict[str, Any], engine: str, what: str
) -> None:
    context = {"uri": HOSTILE}
    started = time.monotonic()
    explanation = explain_policy(policy(rule, engine), context, None, Redactor((), (), context))
    assert time.monotonic() - started < WALL_BOUND
    assert not explanation.matched
    [reason] = explanation.why
    assert reason.startswith(f"{what}: ran past its time budget ({round(REGEX_BUDGET * 1000)} ms")
    assert "403 policy_timeout" in reason


def test_explain_walk_of_a_matcho_rule_is_budgeted_too() -> None:
    # The walk re-asks compiled matchers node by node: each carries its own budget.
    rule = {"matcho": {"uri": f"#{CATASTROPHIC}"}}
    with pytest.raises(PolicyTimeout):
        matcho.explain_rule(rule, {"uri": HOSTILE}, repr)


# --------------------------------------------------------------------------- the regex engine


JAVA_CASES = [
    ("^/Patient/[^/]+$", ["/Patient/1", "/Patient/1/x", ""]),
    ("^(?i)(?!.*(INSERT|DELETE)).*", ["select 1", "DELETE x", "delete x"]),
    ("a(?i)b|c", ["aB", "AB", "C", "c"]),
    ("^a.b$", ["a\rb", "a\u2028b", "axb", "a\nb"]),
    ("^(?s)a.b$", ["a\rb", "a\nb"]),
    ("^\\d+\\s\\w+$", ["12 ab", "\u0663 ab", "1 caf\u00e9"]),
    ("^(?i)k$", ["K", "k", "\u212a"]),
    ("\\Qa.b\\E\\z", ["a.b", "axb", "a.b\n"]),
    ("a\\Z", ["a", "a\n", "a\n\n"]),
    ("x{2,3}+y", ["xxy", "xxxxy", "xy"]),
    ("(?>ab|a)c", ["abc", "ac"]),
]


@pytest.mark.parametrize(("pattern", "values"), JAVA_CASES)
def test_the_regex_package_matches_as_re_did(pattern: str, values: list[str]) -> None:
    java = translate(pattern)
    plain = re.compile(java.text, ASCII_FLAGS)
    budgeted = compile_java(java)
    for value in values:
        assert (budgeted.search(value) is not None) is (plain.search(value) is not None), value


@pytest.mark.parametrize(
    ("pattern", "value", "found"),
    [
        ("^(?iu)caf\u00e9$", "CAF\u00c9", True),  # Unicode case where the pattern asks for it
        ("^(?iu)k$", "\u212a", True),
        ("^(?iu)\\w$", "\u00e9", True),  # as documented: Python's u turns on Unicode classes too
        ("^(?U)\\w$", "\u00e9", True),  # U: Unicode classes (re missed a lone \w here)
        ("^(?i)caf\u00e9$", "CAF\u00c9", False),  # no u: ASCII case only
    ],
)
def test_java_unicode_case_is_scoped_as_java_scopes_it(pattern: str, value: str, found: bool) -> None:
    assert matcho.matches({"x": f"#{pattern}"}, {"x": value}) is found


@pytest.mark.parametrize("pattern", ["(?i)a(?u)\u00e9", "(?iu)\u00e9(?-u)e"])
def test_mixing_ascii_and_unicode_case_folding_is_refused(pattern: str) -> None:
    # regex folds case by the pattern's global flag alone: one of the two parts would match more.
    with pytest.raises(PatternError, match="ASCII case in one part and Unicode case"):
        compile_pattern({"x": f"#{pattern}"})


@pytest.mark.parametrize("pattern", ["x{e}", "x{e<=1}", "{}", "a{,3}", "a{1,x}"])
def test_a_brace_that_starts_no_java_repetition_is_refused(pattern: str) -> None:
    with pytest.raises(PatternError, match="starts no repetition"):
        compile_pattern({"x": f"#{pattern}"})


def test_a_braced_escape_is_not_a_repetition() -> None:
    with pytest.raises(PatternError, match="invalid regular expression"):  # \p is refused as before
        compile_pattern({"x": "#\\p{Alpha}"})
    assert matcho.matches({"x": "#^\\Q{x}\\E$"}, {"x": "{x}"})


def test_budgeted_search_agrees_with_re_on_a_thousand_generated_patterns() -> None:
    # A small differential fuzz over the syntax both engines share (classes, groups, alternation,
    # quantifiers, anchors, lazy and possessive forms, flags), on short ASCII and non-ASCII values.
    import random

    generator = random.Random(20261205)
    atoms = ["a", "b", ".", "\\d", "\\w", "\\s", "[ab]", "[^a]", "\\b", "^", "$", "(?i:A)", "\u00e9"]
    quantifiers = ["", "", "*", "+", "?", "{1,2}", "*?", "++", "{2}"]
    values = ["", "a", "ab", "ba", "aab", "a b", "A", "1", "\u00e9", "a\n", "ab\u00e9a", "bbb"]
    checked = 0
    for _ in range(1000):
        pattern = "".join(
            generator.choice(["(", "(?:", ""]) + generator.choice(atoms) + generator.choice(quantifiers)
            for _ in range(generator.randint(1, 4))
        )
        pattern += ")" * (pattern.count("(") - pattern.count(")"))
        try:
            plain = re.compile(pattern, ASCII_FLAGS)
        except re.error:
            continue
        budgeted = regex.compile(pattern, regex.VERSION0 | regex.ASCII)
        for value in values:
            left, right = plain.search(value), budgeted.search(value, timeout=1.0)
            assert (left and left.span()) == (right and right.span()), (pattern, value)
        checked += 1
    assert checked > 500


# --------------------------------------------------------------------------- the lint


@pytest.mark.parametrize(
    ("pattern", "risk"),
    [
        ("^(a+)+$", NESTED),
        ("(a*)*", NESTED),
        ("(.*)*", NESTED),
        ("^(\\w+\\s?)*$", NESTED),
        ("(?:(?:a{2,})x?)+", NESTED),
        ("(a|a)*", OVERLAPPING),
        ("^(a|aa)+$", OVERLAPPING),
        ("(\\d|1)+", OVERLAPPING),
        ("((a)|(a))*", OVERLAPPING),
    ],
)
def test_shapes_that_backtrack_exponentially_are_named(pattern: str, risk: str) -> None:
    assert backtracking_risk(pattern) == risk


@pytest.mark.parametrize(
    "pattern",
    [
        "^/Patient/[^/]+$",
        "(a|b)*",
        "(\\d|x)+",
        "(a+)?",
        "(a{2})+",
        "(?>a+)+",  # atomic: no backtracking into it
        "(a++)*",  # possessive
        "^(?:[a-z]+\\.)*[a-z]+$",  # each repetition ends with a dot the repeated part cannot match
        "x{e}",
        "\\((a+)\\)*",
        "[(](?:a)+",
    ],
)
def test_linear_shapes_are_not_flagged(pattern: str) -> None:
    assert backtracking_risk(pattern) is None


def test_matcho_lint_names_the_place_and_the_pattern_and_skips_literals() -> None:
    rule = {"matcho": {"uri": "#^(a+)+$", "x": {"$enum": ["#(a+)+"]}, "y": ["ok", "#(a|a)*"], "z": "#^ok$"}}
    assert [warning for warning in matcho.lint_rule(rule) if "exponential" in warning] == [
        "matcho.uri: '#^(a+)+$' has a nested quantifier, which can take exponential time on some inputs",
        "matcho.y[1]: '#(a|a)*' repeats alternatives that can match the same text, "
        "which can take exponential time on some inputs",
    ]


def test_schema_lint_reads_pattern_and_pattern_properties_but_not_data() -> None:
    rule = {
        "schema": {
            "properties": {"uri": {"pattern": "^(a+)+$"}, "pattern": {"const": {"pattern": "(a*)*"}}},
            "patternProperties": {"(x*)*": {"pattern": "^ok$"}},
        }
    }
    assert schema.lint_rule(rule) == [
        "schema.properties.uri.pattern: '^(a+)+$' has a nested quantifier, "
        "which can take exponential time on some inputs",
        "schema.patternProperties['(x*)*']: '(x*)*' has a nested quantifier, "
        "which can take exponential time on some inputs",
    ]


def test_complex_lint_leads_each_warning_with_the_items_path() -> None:
    rule = {
        "and": [
            {"engine": "matcho", "matcho": {"uri": "#^(a+)+$"}},
            {"or": [{"engine": "allow"}, {"engine": "json-schema", "schema": {"pattern": "(.*)*"}}]},
        ]
    }
    assert complex_engine.lint_rule(rule) == [
        "and[0].matcho.uri: '#^(a+)+$' has a nested quantifier, which can take exponential time on some inputs",
        "and[1].or[1].schema.pattern: '(.*)*' has a nested quantifier, which can take exponential time on some inputs",
    ]


def test_check_config_warns_about_a_nested_quantifier_naming_the_policy() -> None:
    text = (
        "authentication_only: false\n"
        "introspectors: [{id: i, type: jwt, jwt: {iss: 'https://i', secret: 'a-secret-of-at-least-32-bytes-here!'}}]\n"
        "policies:\n"
        "- {id: tenants, engine: matcho, matcho: {headers: {x-tenant: '#^(a+)+$'}}}\n"
        "- {id: plain, engine: matcho, matcho: {uri: '#^/Patient/[^/]+$'}}\n"
    )
    config = parse_config(text, {})
    assert [w for w in config.warnings if "quantifier" in w or "alternatives" in w] == [
        "policy 'tenants': matcho.headers.x-tenant: '#^(a+)+$' has a nested quantifier, "
        "which can take exponential time on some inputs"
    ]
