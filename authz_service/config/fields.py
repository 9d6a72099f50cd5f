"""Reading raw config mappings: `${VAR}` expansion and typed field access that records problems.

Nothing here raises on bad input: every problem is recorded (resource, field, message) so that
`check-config` can list all of them at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from authz_service.config.model import Listen
from authz_service.config.registry import Registries
from authz_service.errors import Problem

T = TypeVar("T")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_URL = re.compile(r"^https?://[^/\s]+")
_COOKIE_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Headers an identity header must never overwrite: routing, framing and credentials.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "authorization",
        "cookie",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "keep-alive",
        "proxy-authorization",
    }
)


def expand_env(value: Any, env: Mapping[str, str], path: str, problems: list[Problem]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string, reporting unset variables by path."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = env.get(name)
            # As in the shell and docker compose: ":-" applies when unset *or* empty.
            if default is not None and not value:
                return default
            if value is not None:
                return value
            problems.append(Problem("config", path or "(top)", f"uses ${{{name}}}, which is not set"))
            return ""

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


class _Missing:
    pass


_MISSING = _Missing()


class Fields:
    """Typed access to one mapping of the raw config that records problems instead of raising."""

    def __init__(self, where: str, raw: Mapping[str, Any], problems: list[Problem], prefix: str = "") -> None:
        self.where, self.raw, self.problems, self.prefix = where, raw, problems, prefix
        self.seen: set[str] = set()

    def problem(self, name: str, message: str) -> None:
        """Record a problem with field `name` of this mapping."""
        self.problems.append(Problem(self.where, self.prefix + name, message))

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: Any = _MISSING) -> Any:
        """The value of `name` if it has the right type; the default (or None, recorded) if not."""
        self.seen.add(name)
        value = self.raw.get(name, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                self.problem(name, "is required")
                return None
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, str) and str not in kinds and (int in kinds or float in kinds):
            value = _number_from_text(value, float in kinds)  # e.g. `cache_ttl: ${TTL}`
        # YAML booleans are ints to Python; a bool is never a number here.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int):
            ok = True
        else:
            ok = isinstance(value, kinds)
        if not ok:
            self.problem(name, f"must be {_kind_name(kinds)}, got {describe(value)}")
            return None if default is _MISSING else default
        return value

    def int_in(self, name: str, default: int, low: int, high: int) -> int:
        """An integer within [low, high]."""
        value = self.get(name, int, default)
        if value is None:
            return default
        if not low <= value <= high:
            self.problem(name, f"must be between {low} and {high}, got {value}")
        return int(value)

    def number_in(self, name: str, default: float, low: float, high: float) -> float:
        """A number within (low, high]."""
        value = self.get(name, float, default)
        if value is None:
            return default
        if not low < value <= high:
            self.problem(name, f"must be more than {low:g} and at most {high:g}, got {value}")
        return float(value)

    def nested(self, name: str) -> Fields | None:
        """A nested mapping, whose problems name the field path (`jwt.iss`)."""
        value = self.get(name, dict, None)
        return None if value is None else Fields(self.where, value, self.problems, f"{self.prefix}{name}.")

    def required_nested(self, name: str, why: str) -> Fields | None:
        """A required nested mapping; its absence is reported with `why`, a wrong type as usual."""
        if name not in self.raw:
            self.seen.add(name)
            self.problem(name, f"is required {why}")
            return None
        return self.nested(name)

    def section(self, name: str) -> Fields | None:
        """A top-level section, whose problems are reported under its own name."""
        value = self.get(name, dict, None)
        return None if value is None else Fields(name, value, self.problems)

    def reject_unknown(self, allowed_extra: frozenset[str] = frozenset()) -> None:
        """Every key not read so far is a problem: a typo must not be silently ignored."""
        for key in self.raw:
            if key not in self.seen and key not in allowed_extra:
                self.problem(str(key), "is not a known field")

    def address(self, name: str, value: str | None) -> Listen | None:
        """A HOST:PORT value parsed, or None (recorded when it is given but is not one)."""
        if value is None:
            return None
        parsed = Listen.parse(value)
        if parsed is None:
            self.problem(name, f"must be HOST:PORT, got {value!r}")
        return parsed

    def url(self, name: str, value: str | None) -> None:
        """Check an http(s) URL."""
        if value is not None and not _URL.match(value):
            self.problem(name, "must be an http:// or https:// URL")

    def header_name(self, name: str, value: str | None) -> str | None:
        """A lower-cased header name that is not reserved, or None (recorded)."""
        if value is None:
            return None
        lowered = value.lower()
        if not _HEADER_NAME.match(lowered) or len(lowered) > 128:
            self.problem(name, f"must be an HTTP header name (letters, digits, '-'), got {value!r}")
            return None
        if lowered in RESERVED_HEADERS:
            self.problem(name, f"must not be the reserved header {lowered!r}")
            return None
        return lowered

    def cookie_name(self, name: str, value: str | None) -> str | None:
        """A cookie name (RFC 6265 token), or None (recorded)."""
        if value is not None and not _COOKIE_NAME.match(value):
            self.problem(name, f"must be a cookie name, got {value!r}")
            return None
        return value

    def resource_type(self, expected: str) -> None:
        """`resourceType`, when given, must name this kind of resource."""
        value = self.get("resourceType", str, None)
        if value is not None and value != expected:
            self.problem("resourceType", f"must be {expected}, got {value!r}")


def _number_from_text(text: str, allow_float: bool) -> Any:
    """A number written as text (what ${VAR} expansion yields), or the text unchanged."""
    try:
        return int(text.strip())
    except ValueError:
        pass
    if allow_float:
        try:
            return float(text.strip())
        except ValueError:
            pass
    return text


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def describe(value: Any) -> str:
    """What a raw value is, for messages (never the value: it could be a secret)."""
    return {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        dict: "a mapping",
        list: "a list",
    }.get(type(value), type(value).__name__)


def header_safe_text(value: str) -> bool:
    """No control characters: the value can go into an HTTP header as it is."""
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)


class Sections:
    """The state every part of validation shares: the problems and warnings so far, and the registries."""

    def __init__(self, problems: list[Problem], registries: Registries) -> None:
        self.problems = problems
        self.warnings: list[str] = []
        self.registries = registries
