"""Java regular expressions (what Aidbox's matcho runs) rewritten into what Python's `re` accepts.

Aidbox runs `#...` patterns with java.util.regex. Most of its syntax is Python's too; the
differences a policy meets in practice, and what we do with each:

- An inline flag group in the middle of a pattern (`^(?i)(?!.*DELETE).*`): Java applies it from
  there to the end of the enclosing group; Python 3.11+ accepts global flags only at the very
  start. We rewrite it as a scoped group, `^(?i:(?!.*DELETE).*)`, closed at the end of the
  enclosing group and reopened after each `|` of that group, so alternatives keep their meaning.
- Java's classes and case folding are ASCII unless a pattern asks for Unicode: `\\d`, `\\w`, `\\s`
  and `(?i)` match ASCII only. So the pattern is compiled with re.ASCII (`ASCII_FLAGS`), and
  Java's `u` (Unicode case) and `U` (Unicode classes) become Python's scoped `u`, which turns on
  both; turning them off (`(?-u)`) becomes `a`.
- Java's `.` stops at every line terminator (`\\n`, `\\r`, U+0085, U+2028, U+2029), Python's at
  `\\n` only: outside `(?s)` and `(?d)` (UNIX_LINES, Python's own reading), `.` becomes a class
  that excludes them all. `d` itself is then dropped.
- `\\Q...\\E` (quote everything between) becomes the escaped text; `\\z` (the very end) becomes
  Python's `\\Z`, and Java's `\\Z` (the end, before a final line break) becomes `(?=\\n?\\Z)`.
- A `{` that starts no repetition (`x{e}`) is an error in Java ("Illegal repetition"); Python's
  `re` would read it as a literal and the `regex` package that runs policies (with a time budget,
  policy/budget.py) as a fuzzy match, so it is refused.

The result is matched with the `regex` package (`compile_java`), in `re`'s reading (VERSION0).
`regex` folds case by the pattern's global flag only (its scoped `u`/`a` change the classes), so a
pattern whose case-insensitive parts are Unicode (`(?iu)`) is compiled with Unicode folding and
its classes kept ASCII by an outer `(?a:...)`; one that mixes ASCII and Unicode case-insensitive
parts cannot be matched faithfully and is refused.

What remains different (POSIX `\\p{Alpha}` classes, class intersections `[a-z&&[^e]]`, ...) fails
to compile and is reported as a config error naming the pattern: docs/matcho.md lists them.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import regex

from authz_service.errors import PolicyError

_JAVA_FLAGS = frozenset("idmsuxU")
_PYTHON_FLAGS = frozenset("imsx")  # the ones Python's scoped groups accept (and Java means the same by)
_UNICODE_FLAGS = frozenset("uU")
ASCII_FLAGS = re.ASCII  # compile python_regex's result with these: Java's classes are ASCII by default


# Java's `.` stops at every line terminator unless `s` (DOTALL), or `d` (UNIX_LINES: only `\n`).
_JAVA_DOT = "[^\\n\\r\\x85\\u2028\\u2029]"


class _Group:
    """One open group of the pattern (the whole pattern is the outermost): the scoped flag groups
    opened in it (closed at its `)`, reopened after each of its `|`), and the modes `.` reads."""

    __slots__ = ("dotall", "fold", "openers", "unicode", "unix")

    def __init__(self, dotall: bool, unix: bool, fold: bool = False, unicode: bool = False) -> None:
        self.openers: list[str] = []
        self.dotall = dotall
        self.unix = unix
        self.fold = fold  # case-insensitive (i)
        self.unicode = unicode  # Unicode case and classes (u, U)

    def inner(self, flags: str = "") -> _Group:
        """A group opened inside this one (with `flags` for a scoped `(?flags:`)."""
        group = _Group(self.dotall, self.unix, self.fold, self.unicode)
        group.apply(flags)
        return group

    def apply(self, flags: str) -> None:
        on, _, off = flags.partition("-")
        self.dotall = ("s" in on or self.dotall) and "s" not in off
        self.unix = ("d" in on or self.unix) and "d" not in off
        self.fold = ("i" in on or self.fold) and "i" not in off
        self.unicode = (_unicode(on) or self.unicode) and not _unicode(off)

    def folding(self) -> str | None:
        """How case-insensitive matching folds here: `ascii`, `unicode`, or None (case-sensitive)."""
        if not self.fold:
            return None
        return "unicode" if self.unicode else "ascii"


class JavaRegex(NamedTuple):
    """A Java regex rewritten for Python: its text, and whether its case-insensitive parts fold
    Unicode (Java's `u`/`U`), which `compile_java` needs to know."""

    text: str
    unicode_case: bool


def python_regex(source: str) -> str:
    """`source` as Java reads it, written for Python's re (compile it with ASCII_FLAGS); unchanged
    when it needs no rewrite."""
    return translate(source).text


def compile_java(java: JavaRegex) -> regex.Pattern[str]:
    """The `regex` package's compiled form of a translated pattern, matching as `re` with
    ASCII_FLAGS does (budgeted matching: policy/budget.py); regex.error if it does not compile."""
    if java.unicode_case:
        # regex folds case by the global flag alone: Unicode folding, ASCII classes outside (?u:).
        return regex.compile(f"(?a:{java.text})", regex.VERSION0)
    return regex.compile(java.text, regex.VERSION0 | regex.ASCII)


_REPETITION = re.compile(r"\{\d+(?:,\d*)?\}")


def translate(source: str) -> JavaRegex:
    """`source` as Java reads it, written for Python (`text` is `source` itself when it needs no
    rewrite); PolicyError for what Java refuses or Python cannot match the same way."""
    if not any(mark in source for mark in ("(?", "\\Q", "\\z", "\\Z", ".", "{")):
        return JavaRegex(source, unicode_case=False)
    out: list[str] = []
    groups = [_Group(dotall=False, unix=False)]
    folds: set[str | None] = set()  # how the pattern's cased parts fold: ascii, unicode
    i = 0
    n = len(source)
    while i < n:
        char = source[i]
        group = groups[-1]
        if char == "\\":
            start = i
            i = _escape(source, i, out)
            if _escape_cased(source[start:i]):
                folds.add(group.folding())
        elif char == "[":
            i = _char_class(source, i, out)
            if _cased(out[-1]):
                folds.add(group.folding())
        elif char == "{" and not _REPETITION.match(source, i):
            raise PolicyError(
                "",
                f"regular expression {source!r} has a '{{' that starts no repetition such as {{2}} or "
                "{1,3}: Java refuses it; write \\{ for a literal brace",
            )
        elif char == "(":
            flags, end = _flag_group(source, i)
            if flags is not None and source.startswith(":", end - 1):
                # `(?iU:...)`: a scoped group in Java too; only its flags need translating.
                groups.append(group.inner(flags))
                out.append(_scoped_opener(flags, source) or "(?:")
                i = end
            elif flags is not None:
                # `(?i)`: from here to the end of the group, as a scoped group (even at the very
                # start: `(?i:...)` over the whole pattern means `(?i)...`).
                group.apply(flags)
                opener = _scoped_opener(flags, source)
                if opener is not None:
                    out.append(opener)
                    group.openers.append(opener)
                i = end
            else:
                groups.append(group.inner())
                out.append(char)
                i += 1
        elif char == ")":
            out.append(")" * len(group.openers) + char)
            if len(groups) > 1:
                groups.pop()
            i += 1
        elif char == "|":
            out.append(")" * len(group.openers) + "|" + "".join(group.openers))
            i += 1
        elif char == "." and not group.dotall and not group.unix:
            out.append(_JAVA_DOT)
            i += 1
        else:
            out.append(char)
            if _cased(char):
                folds.add(group.folding())
            i += 1
    out.append(")" * len(groups[-1].openers))
    if {"ascii", "unicode"} <= folds:
        raise PolicyError(
            "",
            f"regular expression {source!r} is case-insensitive with ASCII case in one part and Unicode "
            "case (u, U) in another, which cannot be matched faithfully here: use one of them throughout",
        )
    text = "".join(out)
    return JavaRegex(source if text == source else text, unicode_case="unicode" in folds)


def _cased(text: str) -> bool:
    """Whether `text` holds a letter that has another case (what case-insensitive matching folds)."""
    return any(char.lower() != char.upper() for char in text)


def _escape_cased(escape: str) -> bool:
    """Whether an escape (as written in Java, `\\Q...\\E` included) can match a cased letter."""
    if escape.startswith("\\Q"):
        return _cased(escape[2:].removesuffix("\\E"))
    letter = escape[1:2]
    return letter.isalnum() and letter not in "dDsSwWbBAGzZ0123456789tnrfae"


def _drop(flags: str) -> str:
    return "".join(flag for flag in flags if flag in _PYTHON_FLAGS)


def _unicode(flags: str) -> bool:
    return any(flag in _UNICODE_FLAGS for flag in flags)


def _flag_group(source: str, start: int) -> tuple[str | None, int]:
    """(flags, index after the group) when source[start:] is `(?idmsuxU-idmsuxU)`; for the scoped
    form `(?idmsuxU-idmsuxU:` the index after the colon; else (None, start)."""
    if not source.startswith("(?", start):
        return None, start
    stop = start + 2
    while stop < len(source) and (source[stop] in _JAVA_FLAGS or source[stop] == "-"):
        stop += 1
    if stop >= len(source) or source[stop] not in "):":
        return None, start
    end = stop
    flags = source[start + 2 : end]
    on, _, off = flags.partition("-")
    if not flags or not set(on) | set(off) <= _JAVA_FLAGS or "-" in off or flags == "-":
        return None, start
    return flags, end + 1


def _scoped_opener(flags: str, source: str) -> str | None:
    """`(?i:` for Java's `(?i)`, keeping only flags Python knows; None when nothing is left."""
    java_on, _, java_off = flags.partition("-")
    if _unicode(java_on) and _unicode(java_off):
        raise PolicyError("", f"regular expression {source!r} both sets and clears Unicode matching in ({flags})")
    on = _drop(java_on) + ("u" if _unicode(java_on) else "a" if _unicode(java_off) else "")
    off = _drop(java_off)
    if set(on) & set(off):
        raise PolicyError("", f"regular expression {source!r} both sets and clears a flag in ({flags})")
    if not on and not off:
        return None
    return f"(?{on}-{off}:" if off else f"(?{on}:"


def _escape(source: str, start: int, out: list[str]) -> int:
    """Copy (or rewrite) one escape starting at source[start] == '\\'; the index after it."""
    following = source[start + 1 : start + 2]
    if following == "Q":
        end = source.find("\\E", start + 2)
        if end < 0:
            end = len(source)  # Java quotes to the end of the pattern when \E is missing
        out.append(re.escape(source[start + 2 : end]))
        return end + 2
    if following == "z":
        out.append("\\Z")
    elif following == "Z":
        out.append("(?=\\n?\\Z)")
    elif following in "pPNx" and source.startswith("{", start + 2) and "}" in source[start + 2 :]:
        # `\p{Alpha}`, `\x{263A}`: the braces belong to the escape (Python refuses or reads them).
        end = source.index("}", start + 2) + 1
        out.append(source[start:end])
        return end
    else:
        out.append(source[start : start + 2])
    return start + 2


def _char_class(source: str, start: int, out: list[str]) -> int:
    """Copy a character class verbatim (its `(`, `|` and `)` are literals); the index after it."""
    i = start + 1
    if source.startswith("^", i):
        i += 1
    if source.startswith("]", i):
        i += 1  # a leading ] is a literal in both dialects
    n = len(source)
    while i < n and source[i] != "]":
        i += 2 if source[i] == "\\" else 1
    end = min(i + 1, n)
    out.append(source[start:end])
    return end
