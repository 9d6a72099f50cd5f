"""javaregex: Java regular expressions (what Aidbox's matcho runs) rewritten for Python's re.

Every expectation below is what java.util.regex.Pattern does with the same pattern and input.
Java applies an inline flag from where it stands to the end of the enclosing group, and its
flags are parser state: a `|` does not reset them, so `a(?i)b|c` is `a(?i:b)|(?i:c)`.
"""

from __future__ import annotations

import re

import pytest

from authz_service.errors import ConfigError, PolicyError
from authz_service.policy.javaregex import ASCII_FLAGS, python_regex
from authz_service.policy.matcho import PatternError, compile_pattern, matches
from authz_service.registries import parse_config


def java_finds(pattern: str, value: str) -> bool:
    """Whether matcho's `#pattern` finds a match in `value` (Aidbox: a regex search)."""
    return matches({"x": f"#{pattern}"}, {"x": value})


def full(pattern: str, value: str) -> bool:
    """Whether the rewritten pattern matches the whole of `value` (Java's Matcher.matches)."""
    return re.fullmatch(python_regex(pattern), value, ASCII_FLAGS) is not None


# Java's `.` outside (?s) and (?d): any character but a line terminator.
DOT = "[^\\n\\r\\x85\\u2028\\u2029]"


# --------------------------------------------------------------------------- no rewrite


@pytest.mark.parametrize(
    "pattern",
    ["^/fhir/Patient/[^/]+$", "a|b", "[a-z]+\\d*", "^$", "", "\\bword\\b", "x{2,3}?"],
)
def test_patterns_without_java_only_syntax_come_back_as_they_are(pattern: str) -> None:
    assert python_regex(pattern) is pattern


@pytest.mark.parametrize(
    "pattern",
    ["(?:a|b)c", "(?=x)y", "(?!x)y", "(?<=y)x", "(?<!y)x", "(?>ab)c", "a++b", "(a)(?:b(c))"],
)
def test_groups_that_are_not_flag_groups_are_kept(pattern: str) -> None:
    assert python_regex(pattern) == pattern


# --------------------------------------------------------------------------- inline flags


def test_aidboxs_own_example_an_inline_flag_after_an_anchor() -> None:
    pattern = "^(?i)(?!.*(INSERT|DELETE)).*"
    assert python_regex(pattern) == f"^(?i:(?!{DOT}*(INSERT|DELETE)){DOT}*)"
    assert java_finds(pattern, "select * from patient")
    assert not java_finds(pattern, "DELETE FROM patient")
    assert not java_finds(pattern, "delete from patient")
    assert not java_finds(pattern, "select 1; Insert into t values (1)")


def test_a_flag_at_the_start_covers_every_alternative() -> None:
    assert python_regex("(?i)abc") == "(?i:abc)"
    assert python_regex("(?i)a|b") == "(?i:a)|(?i:b)"
    assert full("(?i)abc", "AbC")
    assert full("(?i)a|b", "B")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("ab", True), ("aB", True), ("c", True), ("C", True), ("Ab", False), ("AB", False), ("abc", False)],
)
def test_an_alternation_after_a_flag_keeps_the_flag(value: str, expected: bool) -> None:
    # Java: flags are parser state, and `|` does not reset them: c is case-insensitive, a is not.
    assert python_regex("a(?i)b|c") == "a(?i:b)|(?i:c)"
    assert full("a(?i)b|c", value) is expected
    assert java_finds("^(?:a(?i)b|c)$", value) is expected


def test_an_alternative_before_the_flag_is_not_affected() -> None:
    assert python_regex("x|a(?i)b") == "x|a(?i:b)"
    assert full("x|a(?i)b", "aB")
    assert not full("x|a(?i)b", "X")


def test_a_flag_inside_a_group_ends_with_the_group() -> None:
    assert python_regex("(a(?i)b|c)d") == "(a(?i:b)|(?i:c))d"
    assert full("(a(?i)b|c)d", "aBd")
    assert full("(a(?i)b|c)d", "Cd")
    assert not full("(a(?i)b|c)d", "aBD")
    assert not full("(a(?i)b|c)d", "CD")
    # a flag in a non-capturing group or a lookahead stays there too
    assert python_regex("(?:(?i)a)b") == "(?:(?i:a))b"
    assert full("(?:(?i)a)b", "Ab")
    assert not full("(?:(?i)a)b", "AB")
    assert python_regex("(?!(?i)x)y") == "(?!(?i:x))y"
    assert java_finds("^(?!(?i)x).$", "y")
    assert not java_finds("^(?!(?i)x).$", "X")


def test_an_alternation_outside_the_flags_group_is_not_affected() -> None:
    assert python_regex("x(a(?i)b|c)|d") == "x(a(?i:b)|(?i:c))|d"
    assert full("x(a(?i)b|c)|d", "xC")
    assert full("x(a(?i)b|c)|d", "d")
    assert not full("x(a(?i)b|c)|d", "D")


def test_a_flag_turned_off_again() -> None:
    assert python_regex("(?i)a(?-i)b") == "(?i:a(?-i:b))"
    assert full("(?i)a(?-i)b", "Ab")
    assert not full("(?i)a(?-i)b", "AB")
    assert not full("(?i)a(?-i)b", "aB")
    # the last flag group before a `|` decides for the alternatives after it
    assert python_regex("(?i)a(?-i)b|c") == "(?i:a(?-i:b))|(?i:(?-i:c))"
    assert full("(?i)a(?-i)b|c", "c")
    assert not full("(?i)a(?-i)b|c", "C")


def test_other_flags_java_and_python_share() -> None:
    assert python_regex("a(?s).b") == "a(?s:.b)"
    assert full("a(?s).b", "a\nb")
    assert not full("a.b", "a\nb")
    assert python_regex("x(?m)^a$") == "x(?m:^a$)"
    assert java_finds("x\n(?m)^a$", "x\na\nb")
    assert python_regex("a(?x) b c") == "a(?x: b c)"
    assert full("a(?x) b c", "abc")


@pytest.mark.parametrize(
    ("pattern", "rewritten"),
    [
        ("(?u)a", "(?u:a)"),  # Unicode case (Java) -> Unicode classes and case (Python)
        ("(?U)\\w+", "(?u:\\w+)"),
        ("(?d).", "."),  # UNIX_LINES: `.` stops at \n only, Python's own `.`
        ("(?iu)a", "(?iu:a)"),
        ("(?iU)x", "(?iu:x)"),
        ("(?idu)x", "(?iu:x)"),
        ("(?-u)a", "(?a:a)"),  # back to ASCII
        ("(?i-U)x", "(?ia:x)"),
        ("x(?u)|y", "x(?u:)|(?u:y)"),
        ("(?s).", "(?s:.)"),
        ("(?-s).", f"(?-s:{DOT})"),
    ],
)
def test_unicode_dotall_and_unix_lines_flags_are_translated(pattern: str, rewritten: str) -> None:
    assert python_regex(pattern) == rewritten
    re.compile(rewritten, ASCII_FLAGS)


def test_unicode_case_folding_when_asked_for_with_u() -> None:
    # Java's (?iu) folds non-ASCII letters too; Python does with (?i) for text.
    assert java_finds("^(?iu)café$", "CAFÉ")


def test_setting_and_clearing_one_flag_at_once_is_refused() -> None:
    with pytest.raises(PolicyError) as caught:
        python_regex("(?i-i)a")
    assert "(i-i)" in caught.value.message
    with pytest.raises(PatternError) as in_matcho:
        compile_pattern({"uri": "#(?i-i)a"})
    assert in_matcho.value.path == "matcho.uri"


# --------------------------------------------------------------------------- quoting and ends


def test_quoted_text_is_literal() -> None:
    assert python_regex("\\Qa.b\\E") == "a\\.b"
    assert java_finds("^\\Qa.b\\E$", "a.b")
    assert not java_finds("^\\Qa.b\\E$", "axb")
    # flags, groups and bars inside \Q...\E are text, and open no scope
    assert python_regex("\\Q(?i)|\\E") == re.escape("(?i)|")
    assert java_finds("^\\Q(?i)|\\E$", "(?i)|")
    assert not java_finds("^\\Q(?i)|\\E$", "I")
    # a flag outside applies to the quoted text
    assert java_finds("^(?i)\\Qa.b\\E$", "A.B")


def test_quoting_without_an_end_runs_to_the_end_of_the_pattern() -> None:
    assert python_regex("x\\Q.*") == "x\\.\\*"
    assert java_finds("^x\\Q.*", "x.*")
    assert not java_finds("^x\\Q.*", "xyz")


def test_lower_z_is_the_very_end() -> None:
    assert python_regex("a\\z") == "a\\Z"
    assert java_finds("a\\z", "a")
    assert not java_finds("a\\z", "a\n")
    assert not java_finds("a\\z", "ab")


def test_upper_z_is_the_end_before_a_final_line_break() -> None:
    assert python_regex("a\\Z") == "a(?=\\n?\\Z)"
    assert java_finds("a\\Z", "a")
    assert java_finds("a\\Z", "a\n")
    assert not java_finds("a\\Z", "a\n\n")
    assert not java_finds("a\\Z", "ab")


def test_an_escaped_backslash_before_z_or_q_is_a_backslash() -> None:
    # Java's `a\\z` is `a`, a backslash and `z`; `\\Q` is a backslash and `Q`.
    assert python_regex("a\\\\z") == "a\\\\z"
    assert java_finds("^a\\\\z$", "a\\z")
    assert python_regex("(?i)\\\\Q") == "(?i:\\\\Q)"
    assert java_finds("^(?i)\\\\Q$", "\\q")


# --------------------------------------------------------------------------- character classes


def test_a_class_holding_flag_syntax_is_a_class() -> None:
    assert python_regex("[(?i)]x") == "[(?i)]x"
    assert java_finds("^[(?i)]x$", "ix")
    assert java_finds("^[(?i)]x$", "?x")
    assert not java_finds("^[(?i)]x$", "Ix")


def test_bars_and_parentheses_in_a_class_are_literals() -> None:
    assert python_regex("(?i)a[|)]b") == "(?i:a[|)]b)"
    assert full("(?i)a[|)]b", "A|B")
    assert full("(?i)a[|)]b", "a)b")
    assert python_regex("[\\]|](?i)a") == "[\\]|](?i:a)"
    assert full("[\\]|](?i)a", "]A")
    assert python_regex("[]|](?i)a") == "[]|](?i:a)"  # a leading ] is a literal
    assert full("[]|](?i)a", "|A")


# --------------------------------------------------------------------------- what does not translate


@pytest.mark.parametrize(
    ("regex", "problem"),
    [
        ("\\p{Alpha}+", "invalid regular expression"),  # POSIX classes
        ("[a-z&&[^e]]", "ambiguous regular expression"),  # class intersection
        ("(?<name>a)", "invalid regular expression"),  # Java's named groups
        ("a(?i", "invalid regular expression"),
    ],
)
def test_java_only_constructs_are_pattern_errors_naming_the_path(regex: str, problem: str) -> None:
    with pytest.raises(PatternError) as caught:
        compile_pattern({"params": {"q": f"#{regex}"}})
    assert caught.value.path == "matcho.params.q"
    assert caught.value.message.startswith(f"{problem} {regex!r}")


def test_a_java_only_construct_is_a_config_error_naming_the_policy_and_field() -> None:
    text = "policies:\n- {id: letters, engine: matcho, matcho: {uri: '#^/\\p{Alpha}+$'}}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    [problem] = caught.value.problems
    assert (problem.where, problem.field) == ("policy 'letters'", "")
    assert str(problem).startswith("policy 'letters': matcho.uri: invalid regular expression '^/\\\\p{Alpha}+$'")


@pytest.mark.parametrize(("pattern", "value"), [("^(?U:\\w)$", "a"), ("^(?d:.)$", "a"), ("^(?iU:b)$", "B")])
def test_scoped_java_flag_groups_load(pattern: str, value: str) -> None:
    assert java_finds(pattern, value)


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("^\\d+$", "\u0663"),  # ARABIC-INDIC DIGIT THREE
        ("^\\w+$", "café"),
        ("^\\s$", "\u00a0"),  # NO-BREAK SPACE
        ("^(?i)café$", "CAFÉ"),  # no `u`: ASCII case folding only
        ("^(?i)k$", "\u212a"),  # KELVIN SIGN
        ("^a.b$", "a\rb"),
        ("^a.b$", "a\u2028b"),
    ],
    ids=["digit", "word", "space", "case-e-acute", "case-kelvin", "dot-cr", "dot-line-separator"],
)
def test_java_default_classes_case_and_dot_are_not_unicode(pattern: str, value: str) -> None:
    assert not java_finds(pattern, value)


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("^(?U)\\d+$", "\u0663"),
        ("^(?U)\\w+$", "café"),
        ("^(?iu)café$", "CAFÉ"),
        ("^(?s)a.b$", "a\rb"),
        ("^(?d)a.b$", "a\u2028b"),
        ("^a(?s:.)b$", "a\nb"),
    ],
)
def test_unicode_and_line_terminators_when_the_pattern_asks(pattern: str, value: str) -> None:
    assert java_finds(pattern, value)
