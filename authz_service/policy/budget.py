"""Time budgets for policy regexes, and the check-config warning for the patterns that need one.

Python's `re` cannot be interrupted: a pattern such as `^(a+)+$` searched in `'a' * 40 + 'b'`
backtracks for hours, and Check runs on the event loop, so one hostile header would stall every
request of the process. Policy regexes therefore run on the `regex` package (compiled for `re`'s
reading, VERSION0), whose matcher takes a `timeout`.

The budget is per rule evaluation, not per match: every regex one compiled rule (a matcho pattern,
a json-schema, one item of a complex policy) runs while deciding one request draws on the same
REGEX_BUDGET, so a list of values each crafted to take just under the budget cannot add up to
more. Past it the evaluation raises PolicyTimeout and the request is denied (403 policy_timeout);
a timeout is never read as "does not match", which under `$not` would allow.

The budget is CPU time, never wall time: a process that is descheduled, or throttled by a
container's CPU quota, in the middle of a match must not deny a sane request. `regex` measures
its timeout in the process's CPU time (C `clock()`); between matches a fast match (under
SLOW_MATCH of wall time, so at most that much CPU) is charged its wall time, read from the cheap
monotonic clock, and after a slow one the rule's evaluation is charged the CPU time its thread
really spent. A budgeted match costs a few µs more than an unbudgeted one (CPU clocks are system
calls): docs/matcho.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import monotonic, thread_time
from typing import TYPE_CHECKING

from authz_service.errors import PolicyTimeout

if TYPE_CHECKING:
    import regex

REGEX_BUDGET = 0.1
"""Seconds of CPU one rule evaluation may spend matching regexes. A sane pattern over a header
needs microseconds; a catastrophic one is stopped within this (plus up to 256 steps of the
matcher). Not smaller: a virtual CPU stolen by its host can look like CPU time spent, and a sane
request must not be denied for that (measured here: pauses of 18 ms inside one evaluation)."""

SLOW_MATCH = 0.001
"""A match that took longer than this (wall time) is charged by the thread's CPU clock instead."""


class RegexBudget:
    """What is left of one rule evaluation's regex time: reset when the evaluation starts, drawn on
    by every budgeted match of the rule. A rule evaluates on one thread, start to end, without
    awaiting, so one budget per compiled rule is enough."""

    __slots__ = ("cpu0", "left", "regexes")

    def __init__(self) -> None:
        self.left = REGEX_BUDGET
        self.cpu0 = 0.0  # the thread's CPU time when the evaluation started
        self.regexes = 0  # how many budgeted regexes the rule holds (none: nothing to start)

    def start(self) -> None:
        """Start an evaluation with the whole budget."""
        self.left = REGEX_BUDGET
        self.cpu0 = thread_time()

    def charge(self, left: float, elapsed: float) -> None:
        """Charge a match that took `elapsed` wall seconds when `left` was left: its wall time when
        that is small (CPU time is at most wall time), else the CPU the evaluation really spent."""
        self.left = left - elapsed if elapsed < SLOW_MATCH else REGEX_BUDGET - (thread_time() - self.cpu0)


def found_within(pattern: regex.Pattern[str], value: str, budget: RegexBudget, what: str) -> bool:
    """Search `value` for `pattern` on what is left of `budget`; PolicyTimeout (policy id left
    empty: the caller knows it) when it runs out."""
    left = budget.left
    if left <= 0.0:  # regex reads a negative timeout as none at all
        raise PolicyTimeout("", what)
    start = monotonic()
    try:
        hit = pattern.search(value, timeout=left)
    except TimeoutError:
        budget.left = 0.0
        raise PolicyTimeout("", what) from None
    budget.charge(left, monotonic() - start)
    return hit is not None


def budget_ms() -> int:
    """REGEX_BUDGET in milliseconds, for messages."""
    return round(REGEX_BUDGET * 1000)


def re_literal_braces(source: str) -> str:
    """`source` with every `{` that Python's `re` reads as a literal (`x{e}`, `{}`) escaped, so
    that `regex` reads it as a literal too (it would read `x{e<=1}` as a fuzzy match)."""
    if "{" not in source:
        return source
    out: list[str] = []
    i = 0
    n = len(source)
    while i < n:
        char = source[i]
        if char == "\\":
            end = i + 2
            if source.startswith("N{", i + 1):  # \N{NAME}: the braces belong to the escape
                close = source.find("}", i)
                end = n if close < 0 else close + 1
            out.append(source[i:end])
            i = end
        elif char == "[":
            end = _class_end(source, i)
            out.append(source[i:end])
            i = end
        elif char == "{" and _quantifier(source, i)[0] == i:
            out.append("\\{")
            i += 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------- the lint
#
# A textual scan of a Python-syntax pattern (matcho's after the Java rewrite, json-schema's as
# written) for the two shapes behind almost every exponential backtracking: a repeated group that
# itself repeats something (`(a+)+`, `(a*)*`, `(.*)*`, `(\w+\s?)*`), and a repeated alternation
# whose branches can start alike (`(a|a)*`, `(a|ab)+`, `(.|x)*`). It is a warning, not an error:
# the budget is what protects the service, the warning tells the author before an attacker does.
# Possessive quantifiers (`a*+`) and atomic groups and lookarounds (`(?>...)`, `(?=...)`) cannot
# backtrack into what they matched, so they count as neither.

NESTED = "has a nested quantifier"
OVERLAPPING = "repeats alternatives that can match the same text"
# What a branch's first atom may match, read on these characters: every ASCII one and a few others.
_SAMPLES = (*(chr(code) for code in range(128)), "é", "É", "\u0663", "\u00a0", "\u2028", "\u017f", "\u212a")
_ALL = frozenset(_SAMPLES)
_ZERO_WIDTH_ESCAPES = frozenset("bBAZzG")


@dataclass(slots=True)
class _Frame:
    """One open group while scanning: what its branches start and end with, every character an atom
    inside can match, and what the atoms repeated inside it (at any depth) can match."""

    atomic: bool
    firsts: list[frozenset[str] | None] = field(default_factory=lambda: [None])
    tails: list[frozenset[str] | None] = field(default_factory=lambda: [None])  # None: empty or optional
    chars: frozenset[str] = frozenset()
    repeated: frozenset[str] = frozenset()

    def atom(self, chars: frozenset[str]) -> None:
        """An atom (a character, a class, a closed group) in the current branch."""
        if self.firsts[-1] is None:
            self.firsts[-1] = chars
        self.tails[-1] = chars
        self.chars |= chars

    def branch(self) -> None:
        """A `|`: a new branch starts."""
        self.firsts.append(None)
        self.tails.append(None)

    def starts(self) -> frozenset[str]:
        """What the group as a whole can start with."""
        return frozenset().union(*(chars for chars in self.firsts if chars is not None))

    def overlaps(self) -> bool:
        """Whether two branches can start with the same character."""
        seen: set[str] = set()
        for chars in self.firsts:
            if chars is None:
                continue
            if seen & chars:
                return True
            seen |= chars
        return False

    def ambiguous(self) -> bool:
        """Whether something repeats inside and the repetitions are not held apart: a group whose
        every branch ends with a required atom that no repeated atom matches (`(?:[a-z]+\\.)*`)
        splits a text one way only."""
        if not self.repeated:
            return False
        return any(tail is None or tail & self.repeated for tail in self.tails)


def backtracking_risk(source: str) -> str | None:
    """NESTED or OVERLAPPING when the pattern has a shape that can backtrack exponentially, else
    None. Only ever a hint: it may miss a subtle case, and it never rejects a pattern."""
    import regex  # here, not with the module: see _matched

    frames = [_Frame(atomic=False)]
    last: frozenset[str] | None = None  # what the atom before a quantifier matches
    group: _Frame | None = None  # that atom, when it is a group
    n = len(source)
    i = 0
    while i < n:
        char = source[i]
        frame = frames[-1]
        atom: frozenset[str] | None = None
        closed: _Frame | None = None
        if char == "\\":
            escape = source[i + 1 : i + 2]
            if escape not in _ZERO_WIDTH_ESCAPES:
                atom = _ALL if escape.isdigit() else _matched(source[i : i + 2])
            i += 2
        elif char == "[":
            end = _class_end(source, i)
            atom = _matched(source[i:end])
            i = end
        elif char == "(":
            i, kind = _group_header(source, i)
            if kind in ("group", "atomic"):
                frames.append(_Frame(atomic=kind == "atomic"))
            elif kind == "atom":
                atom = _ALL  # a backreference
        elif char == ")":
            i += 1
            if len(frames) > 1:
                closed = frames.pop()
                frame = frames[-1]
                if not closed.atomic:
                    frame.repeated |= closed.repeated
                atom = closed.starts() if closed.chars else None
                frame.chars |= closed.chars
        elif char == "|":
            frame.branch()
            i += 1
        elif char in "*+?{" and _quantifier(source, i)[0] > i:
            end, low, high = _quantifier(source, i)
            suffix = source[end : end + 1]
            i = end + (1 if suffix in ("+", "?") else 0)
            if low == 0:
                frame.tails[-1] = None  # optional: it holds nothing apart
            possessive = suffix == "+"  # a possessive repeat never backtracks into what it matched
            repeats = not possessive and last is not None and (high is None or high > 1)
            if repeats and group is not None and not group.atomic:
                if group.ambiguous():
                    return NESTED
                if group.overlaps():
                    return OVERLAPPING
            if not possessive and last is not None and (high is None or high > low):
                frame.repeated |= group.chars if group is not None else last
            last = group = None
            continue
        else:
            if char not in "^$":
                atom = _matched("." if char == "." else regex.escape(char))
            i += 1
        if atom is not None:
            frame.atom(atom)
        last, group = atom, closed
    return None


def _matched(atom: str) -> frozenset[str]:
    """The sample characters a one-character atom (a literal, an escape, a class, `.`) matches."""
    # `regex` is imported by the lint, not with this module: policy.explain imports the module in
    # every service (the admin API's test-policy), and `regex` is 1.4 MB of RSS (more when compiled
    # from source) that a service without policy regexes never uses. The engines that compile
    # regexes (matcho, json-schema, javaregex) import it themselves.
    import regex

    try:
        compiled = regex.compile(atom, regex.VERSION0)
    except regex.error:
        return _ALL
    return frozenset(char for char in _SAMPLES if compiled.fullmatch(char) is not None)


def _group_header(source: str, start: int) -> tuple[int, str]:
    """(index after the opening of the group at source[start], what it is): `group`, `atomic` (also
    lookarounds, which do not backtrack into what they matched), `atom` (a backreference `(?P=x)`),
    or `none` (a comment, or flags for the whole pattern)."""
    if not source.startswith("(?", start):
        return start + 1, "group"
    for opener in ("(?>", "(?=", "(?!", "(?<=", "(?<!"):
        if source.startswith(opener, start):
            return start + len(opener), "atomic"
    if source.startswith(("(?#", "(?P="), start):
        end = source.find(")", start)
        return (len(source) if end < 0 else end + 1), ("none" if source[start + 2] == "#" else "atom")
    if source.startswith("(?P<", start):
        end = source.find(">", start)
        return (len(source) if end < 0 else end + 1), "group"
    if source.startswith("(?(", start):
        end = source.find(")", start + 3)
        return (len(source) if end < 0 else end + 1), "group"
    stop = start + 2
    while stop < len(source) and source[stop] not in ":)":
        stop += 1
    if stop < len(source) and source[stop] == ")":
        return stop + 1, "none"  # `(?i)`: flags, no group
    return stop + 1, "group"


def _class_end(source: str, start: int) -> int:
    """The index after the character class starting at source[start] == '['."""
    i = start + 1
    if source.startswith("^", i):
        i += 1
    if source.startswith("]", i):
        i += 1
    n = len(source)
    while i < n and source[i] != "]":
        i += 2 if source[i] == "\\" else 1
    return min(i + 1, n)


def _quantifier(source: str, start: int) -> tuple[int, int, int | None]:
    """(index after the quantifier at source[start], its least and most repetitions, None for no
    bound); the index is `start` when the `{` there is a literal brace (as `re` reads `x{e}`)."""
    char = source[start]
    if char in "*+?":
        return start + 1, (1 if char == "+" else 0), (1 if char == "?" else None)
    end = source.find("}", start)
    low, comma, high = source[start + 1 : end].partition(",") if end > 0 else ("x", "", "")
    if not (low.isdigit() or (comma and low == "")) or not (high == "" or high.isdigit()):
        return start, 0, None
    least = int(low) if low else 0
    if not comma:
        return end + 1, least, least
    return end + 1, least, int(high) if high else None
