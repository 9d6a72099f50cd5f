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

What remains different (POSIX `\\p{Alpha}` classes, class intersections `[a-z&&[^e]]`, ...) fails
to compile and is reported as a config error naming the pattern: docs/matcho.md lists them.
"""

from __future__ import annotations

import re

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

    __slots__ = ("dotall", "openers", "unix")

    def __init__(self, dotall: bool, unix: bool) -> None:
        self.openers: list[str] = []
        self.dotall = dotall
        self.unix = unix

    def inner(self, flags: str = "") -> _Group:
        """A group opened inside this one (with `flags` for a scoped `(?flags:`)."""
        group = _Group(self.dotall, self.unix)
        group.apply(flags)
        return group

    def apply(self, flags: str) -> None:
        on, _, off = flags.partition("-")
        self.dotall = ("s" in on or self.dotall) and "s" not in off
        self.unix = ("d" in on or self.unix) and "d" not in off


def python_regex(source: str) -> str:
    """`source` as Java reads it, written for Python's re (compile it with ASCII_FLAGS); unchanged
    when it needs no rewrite."""
    if not any(mark in source for mark in ("(?", "\\Q", "\\z", "\\Z", ".")):
        return source
    out: list[str] = []
    groups = [_Group(dotall=False, unix=False)]
    i = 0
    n = len(source)
    while i < n:
        char = source[i]
        group = groups[-1]
        if char == "\\":
            i = _escape(source, i, out)
        elif char == "[":
            i = _char_class(source, i, out)
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
            i += 1
    out.append(")" * len(groups[-1].openers))
    return "".join(out)


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
