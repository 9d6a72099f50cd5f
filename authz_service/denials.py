"""Deny answers chosen by the config's `responses` block (issue #23 item 2): a redirect to a login
page for browsers, extra headers and a body of the operator's own, per outcome.

Templates are compiled once at config load into literals and slots; rendering a denial escapes the
few slot values for where each lands (header, URL query component, JSON string, HTML text) and
joins. An outcome the block does not name keeps today's answer: `Responses.render` returns None and
the caller sends the `envoy.Denial` it always did. Independent of grpc and aiohttp.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

from authz_service.config.fields import RESERVED_HEADERS, Fields
from authz_service.errors import ConfigError, Problem
from authz_service.lru import Lru
from authz_service.model import Outcome, Reason

# Outcome -> (HTTP status, OAuth error code): the same table as envoy.OUTCOMES, whose answers the
# default body and challenge reproduce (tests/unit/test_denials.py holds the two equal).
DENY_STATUS: Mapping[Outcome, tuple[int, str]] = {
    Outcome.UNAUTHENTICATED: (401, "invalid_token"),
    Outcome.FORBIDDEN: (403, "access_denied"),
    Outcome.INVALID_REQUEST: (400, "invalid_request"),
    Outcome.UNAVAILABLE: (503, "temporarily_unavailable"),
}
REALM = "authz-service"
_NO_CREDENTIALS_ERROR = "unauthorized"  # RFC 6750 3.1: no error code without credentials
HEADERS_TOO_LARGE_STATUS = 431  # RFC 6585, as HTTP mode answers Reason.HEADERS_TOO_LARGE
REDIRECT_STATUS = 302

SLOTS = ("reason", "error", "description", "url", "method", "path")
_REQUEST_SLOTS = frozenset({"url", "method", "path"})
MAX_FILE_BYTES = 64 * 1024
MAX_HEADER_VALUE = 8192  # as envoy.MAX_HEADER_VALUE: a longer rendered header is left out
# A redirect to a login page loops for a client that is signed in but not allowed (403), and
# sends a client whose request is malformed (400) or who met an outage (503) nowhere useful.
_REDIRECTABLE = frozenset({Outcome.UNAUTHENTICATED})
# Headers a template may not set: framing and hop-by-hop, and those the answer itself owns
# (content-type from `body`, location from `redirect`, www-authenticate as RFC 9110 11.6.1 wants it).
_DENY_RESERVED_HEADERS = RESERVED_HEADERS | {"location", "www-authenticate", "trailer", "proxy-connection"}
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_VISIBLE_ASCII = re.compile(r"^[\x21-\x7e]*$")
# A slot, or (strict contexts) any brace at all.
_STRICT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]*)\}|[{}]")
# Bodies: a brace followed by a name must be a whole slot; other braces are text (JSON, CSS).
_LENIENT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]*)(\}?)")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# JSON: beyond json.dumps' escaping, <, > and & as \u escapes, so that a body sniffed as HTML
# (or pasted into a page) cannot open a tag.
_JSON_EXTRA = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})
_JSON_SENTINEL = "\u00a7"  # stands in for each slot when a JSON body is checked at load


class DenyAnswer(NamedTuple):
    """A deny answer rendered from the `responses` block: what the client gets."""

    status: int
    # Every header to send, content-type and www-authenticate included (name lower case).
    headers: tuple[tuple[str, str], ...]
    body: bytes
    content_type: str  # "" for a redirect, which has no body


def _escape_header(value: str) -> str:
    """Printable ASCII kept; every other character (CR, LF, controls, non-ASCII) percent-encoded."""
    if value.isascii() and value.isprintable():
        return value
    return "".join(ch if " " <= ch <= "~" else quote(ch, safe="") for ch in value)


def _escape_url(value: str) -> str:
    """A query component: everything but RFC 3986 unreserved characters percent-encoded."""
    return quote(value, safe="")


def _escape_json(value: str) -> str:
    """The inside of a JSON string (ASCII only, <>& escaped too)."""
    return json.dumps(value)[1:-1].translate(_JSON_EXTRA)


def _escape_html(value: str) -> str:
    """HTML text and attribute values: & < > " ' as entities, control characters replaced."""
    return html.escape(_CONTROL.sub("\ufffd", value), quote=True)


def _escape_text(value: str) -> str:
    """text/plain: control characters but tab and line breaks replaced."""
    return _CONTROL.sub("\ufffd", value)


_ESCAPES = {
    "header": _escape_header,
    "url": _escape_url,
    "json": _escape_json,
    "html": _escape_html,
    "text": _escape_text,
}


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template: literals[0], slot[0], literals[1], ..., literals[-1]."""

    literals: tuple[str, ...]
    slots: tuple[str, ...]
    escape: Callable[[str], str]  # for where the template lands (a function of _ESCAPES)
    uses_request: bool  # a slot is {url}, {method} or {path}: the answer is built per request

    def render(self, values: Mapping[str, str]) -> str:
        """The template with each slot's value escaped for its context."""
        if not self.slots:
            return self.literals[0]
        escape = self.escape
        parts = [self.literals[0]]
        for slot, literal in zip(self.slots, self.literals[1:], strict=True):
            parts.append(escape(values[slot]))
            parts.append(literal)
        return "".join(parts)


def compile_template(text: str, context: str, f: Fields, field: str) -> Template | None:
    """Compile `text`, or record why not (an unknown slot, a stray brace) under `field`."""
    literals: list[str] = []
    slots: list[str] = []
    start = 0
    ok = True
    strict = context in ("header", "url")
    for match in (_STRICT if strict else _LENIENT).finditer(text):
        name = match.group(1)
        if name is None or (not strict and match.group(2) != "}"):
            f.problem(field, f"has a stray brace at offset {match.start()} (a slot is written {{name}})")
            ok = False
            continue
        if name not in SLOTS:
            f.problem(field, f"uses {{{name}}}, which is not one of " + ", ".join(f"{{{s}}}" for s in SLOTS))
            ok = False
            continue
        literals.append(text[start : match.start()])
        slots.append(name)
        start = match.end()
    literals.append(text[start:])
    if not ok:
        return None
    uses_request = not _REQUEST_SLOTS.isdisjoint(slots)
    return Template(tuple(literals), tuple(slots), _ESCAPES[context], uses_request)


class _Body(NamedTuple):
    content_type: str  # as sent, with `; charset=utf-8` added to text/* without one
    template: Template


class _Redirect(NamedTuple):
    url: Template
    when_accept: str


@dataclass(frozen=True, slots=True)
class OutcomeAnswer:
    """The compiled answer for one outcome: any of redirect, extra headers and body."""

    outcome: Outcome
    redirect: _Redirect | None
    headers: tuple[tuple[str, Template], ...]
    body: _Body | None
    # Whether each answer depends on the request (else it is built once per reason).
    redirect_uses_request: bool = False
    answer_uses_request: bool = False

    @classmethod
    def of(
        cls, outcome: Outcome, redirect: _Redirect | None, headers: tuple[tuple[str, Template], ...], body: _Body | None
    ) -> OutcomeAnswer:
        """The answer, with what depends on the request worked out once."""
        headers_use = any(template.uses_request for _, template in headers)
        return cls(
            outcome,
            redirect,
            headers,
            body,
            redirect_uses_request=redirect is not None and (redirect.url.uses_request or headers_use),
            answer_uses_request=headers_use or (body is not None and body.template.uses_request),
        )


def default_error(outcome: Outcome, reason: Reason) -> str:
    """The OAuth error code of today's deny body and challenge."""
    return _NO_CREDENTIALS_ERROR if reason is Reason.MISSING_TOKEN else DENY_STATUS[outcome][1]


def _challenge(outcome: Outcome, reason: Reason) -> str:
    if reason is Reason.MISSING_TOKEN:
        return f'Bearer realm="{REALM}"'
    error = DENY_STATUS[outcome][1]
    return f'Bearer realm="{REALM}", error="{error}", error_description="{reason.description}"'


def _status(outcome: Outcome, reason: Reason) -> int:
    return HEADERS_TOO_LARGE_STATUS if reason is Reason.HEADERS_TOO_LARGE else DENY_STATUS[outcome][0]


def _strip_params(url: str, names: frozenset[str]) -> str:
    """The URL without the query parameters that may carry a token (matched decoded, any case)."""
    base, sep, query = url.partition("?")
    if not sep or not names:
        return url
    fragment = ""
    query, hash_sep, frag = query.partition("#")
    if hash_sep:
        fragment = "#" + frag
    kept = [item for item in query.split("&") if unquote(item.partition("=")[0]).lower() not in names]
    return (f"{base}?{'&'.join(kept)}" if kept else base) + fragment


class Responses:
    """The compiled `responses` block; `render` answers a denial, or None for today's answer."""

    def __init__(self, answers: Mapping[Outcome, OutcomeAnswer], token_params: Collection[str] = ()) -> None:
        self._answers = dict(answers)
        self._token_params = frozenset(name.lower() for name in token_params)
        # Answers that depend only on (outcome, reason, redirected): built once each.
        self._memo: dict[tuple[Outcome, Reason, bool], DenyAnswer] = {}
        # Browsers send a handful of Accept values; each is parsed once.
        self._prefers: Lru[tuple[str, str], bool] = Lru(256)

    def __bool__(self) -> bool:
        return bool(self._answers)

    def header_names(self) -> tuple[str, ...]:
        """The headers an answer of this block may carry besides content-type and www-authenticate:
        what a proxy that filters a denial's headers (Envoy's allowed_client_headers) must let through."""
        names: list[str] = []
        for spec in self._answers.values():
            if spec.redirect is not None:
                names.append("location")
            if spec.body is not None:
                names.append("x-content-type-options")
            names += (name for name, _ in spec.headers)
        return tuple(dict.fromkeys(names))

    def render(
        self, outcome: Outcome, reason: Reason, request_url: str, method: str, path: str, accept: str | None
    ) -> DenyAnswer | None:
        """The answer for a denial, or None when the block leaves this outcome to today's answer.

        `request_url` is the original URL (scheme://host/path?query) and `path` the path without
        its query; token query parameters (`token_params`) are removed from `{url}` here.
        """
        spec = self._answers.get(outcome)
        if spec is None:
            return None
        redirect = spec.redirect is not None and self.prefers(spec.redirect.when_accept, accept)
        memo = not (spec.redirect_uses_request if redirect else spec.answer_uses_request)
        if memo:
            cached = self._memo.get((outcome, reason, redirect))
            if cached is not None:
                return cached
        values = {
            "reason": reason.label,
            "error": default_error(outcome, reason),
            "description": reason.description,
            "url": _strip_params(request_url, self._token_params),
            "method": method,
            "path": path,
        }
        answer = self._redirect(spec.redirect, spec, values) if redirect and spec.redirect is not None else None
        if answer is None:
            answer = self._answer(spec, outcome, reason, values)
        if memo:
            self._memo[(outcome, reason, redirect)] = answer
        return answer

    def prefers(self, media_type: str, accept: str | None) -> bool:
        """Whether `accept` prefers `media_type` to application/json (see `prefers`)."""
        if not accept:
            return False
        if len(accept) > 1024:
            return prefers(media_type, accept)
        key = (media_type, accept)
        known = self._prefers.get(key)
        if known is None:
            known = prefers(media_type, accept)
            self._prefers.put(key, known)
        return known

    @staticmethod
    def _extra_headers(spec: OutcomeAnswer, values: Mapping[str, str]) -> list[tuple[str, str]]:
        headers = []
        for name, template in spec.headers:
            value = template.render(values)
            if len(value) <= MAX_HEADER_VALUE:  # too long to pass: left out, never cut
                headers.append((name, value))
        return headers

    def _redirect(self, redirect: _Redirect, spec: OutcomeAnswer, values: Mapping[str, str]) -> DenyAnswer | None:
        location = redirect.url.render(values)
        if len(location) > MAX_HEADER_VALUE:
            return None  # the client gets the answer it would without a redirect
        return DenyAnswer(REDIRECT_STATUS, (("location", location), *self._extra_headers(spec, values)), b"", "")

    def _answer(self, spec: OutcomeAnswer, outcome: Outcome, reason: Reason, values: Mapping[str, str]) -> DenyAnswer:
        status = _status(outcome, reason)
        if spec.body is None:
            content_type = "application/json"
            body = json.dumps({"error": values["error"], "error_description": values["description"]}).encode()
        else:
            content_type = spec.body.content_type
            body = spec.body.template.render(values).encode()
        headers = [("content-type", content_type)]
        if spec.body is not None:
            # A body of the operator's own carries what the client sent ({path}): read as its type only.
            headers.append(("x-content-type-options", "nosniff"))
        if DENY_STATUS[outcome][0] in (400, 401):  # as envoy.Denial: by the outcome, not HTTP mode's 431
            headers.append(("www-authenticate", _challenge(outcome, reason)))
        headers += self._extra_headers(spec, values)
        return DenyAnswer(status, tuple(headers), body, content_type)


# --- Accept negotiation (RFC 9110 12.5.1) ---------------------------------------------------------

_QVALUE = re.compile(r"^(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)$")
_MAX_RANGES = 64  # a longer Accept is judged on its first 64 ranges


def quality(media_type: str, accept: str) -> tuple[float, int]:
    """(q, specificity) that `accept` gives `media_type` (a lower-case type/subtype, no parameters).

    The most specific matching range decides: type/subtype (2) over type/* (1) over */* (0); no
    match is (0.0, -1). A range with parameters other than q does not match (the candidate has
    none), and a range whose q is not an RFC qvalue is ignored.
    """
    wanted_type, _, wanted_sub = media_type.partition("/")
    best_q, best_spec = 0.0, -1
    for item in accept.split(",", _MAX_RANGES)[:_MAX_RANGES]:
        name, *params = item.split(";")
        range_type, slash, range_sub = name.strip().lower().partition("/")
        if not slash:
            continue
        q: float | None = 1.0
        extra = False
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                text = value.strip()
                q = float(text) if _QVALUE.match(text) else None
            else:
                extra = True
        if q is None or extra:
            continue
        if range_type == "*" and range_sub == "*":
            spec = 0
        elif range_type == wanted_type and range_sub == "*":
            spec = 1
        elif range_type == wanted_type and range_sub == wanted_sub:
            spec = 2
        else:
            continue
        if spec > best_spec or (spec == best_spec and q > best_q):
            best_q, best_spec = q, spec
    return best_q, best_spec


def prefers(media_type: str, accept: str | None) -> bool:
    """Whether a request's Accept prefers `media_type` to application/json.

    True when its q is above 0 and (q, specificity) beats application/json's: a browser's
    `text/html,...,*/*;q=0.8` prefers text/html; `*/*` (curl, fetch), `application/json` and
    `application/json, text/html` (a tie) do not, and neither does a request without Accept.
    """
    if not accept:
        return False
    wanted = quality(media_type, accept)
    return wanted[0] > 0 and wanted > quality("application/json", accept)


# --- Config ---------------------------------------------------------------------------------------

_OUTCOME_KEYS: Mapping[str, Outcome] = {outcome.value: outcome for outcome in DENY_STATUS}


def parse_responses(raw: Mapping[str, Any], where: str = "responses", token_params: Collection[str] = ()) -> Responses:
    """The compiled `responses` block, or ConfigError listing every problem (field named).

    `token_params` are the query parameters that may carry a token (`from_params`): `{url}` never
    shows them.
    """
    problems: list[Problem] = []
    f = Fields(where, raw, problems)
    answers: dict[Outcome, OutcomeAnswer] = {}
    for key in raw:
        outcome = _OUTCOME_KEYS.get(str(key))
        if outcome is None:
            continue
        section = f.nested(str(key))
        if section is not None:
            answer = _outcome_answer(outcome, section)
            if answer is not None:
                answers[outcome] = answer
    f.reject_unknown()
    if problems:
        raise ConfigError(problems)
    return Responses(answers, token_params)


def _outcome_answer(outcome: Outcome, f: Fields) -> OutcomeAnswer | None:
    before = len(f.problems)
    redirect = None
    redirect_fields = f.nested("redirect")
    if redirect_fields is not None:
        if outcome not in _REDIRECTABLE:
            f.problem("redirect", "is only for unauthenticated: a redirect here would send the client in circles")
        else:
            redirect = _redirect(redirect_fields)
    headers: list[tuple[str, Template]] = []
    raw_headers = f.get("headers", dict, {}) or {}
    for name, text in raw_headers.items():
        field = f"headers.{name}"
        header = _header_name(f, field, name)
        if not isinstance(text, str):
            f.problem(field, "must be a string template")
            continue
        if header is None:
            continue
        if any(existing == header for existing, _ in headers):
            f.problem(field, "names a header twice (names are case-insensitive)")
            continue
        template = compile_template(text, "header", f, field)
        if template is not None and not all(_header_literal_ok(part) for part in template.literals):
            f.problem(field, "must hold printable ASCII only outside its {slots}")
        elif template is not None:
            headers.append((header, template))
    body_fields = f.nested("body")
    body = _body(body_fields) if body_fields is not None else None
    f.reject_unknown()
    if len(f.problems) > before:
        return None
    return OutcomeAnswer.of(outcome, redirect, tuple(headers), body)


def _header_literal_ok(text: str) -> bool:
    return text.isascii() and text.isprintable()


def _header_name(f: Fields, field: str, name: Any) -> str | None:
    lowered = name.lower() if isinstance(name, str) else ""
    if not _HEADER_NAME.match(lowered):
        f.problem(field, "must be named by an HTTP header name (letters, digits, '-')")
        return None
    if lowered in _DENY_RESERVED_HEADERS or lowered.startswith("x-envoy-"):
        f.problem(field, f"must not set the reserved header {lowered!r}")
        return None
    return lowered


def _redirect(f: Fields) -> _Redirect | None:
    url = f.get("url", str)
    when_accept = f.get("when_accept", str, "text/html")
    f.reject_unknown()
    ok = True
    if not isinstance(when_accept, str) or not _MEDIA_TYPE.match(when_accept.lower()):
        f.problem("when_accept", "must be a media type type/subtype without wildcards or parameters")
        ok = False
    elif when_accept.lower() == "application/json":
        f.problem("when_accept", "must not be application/json: it is what API clients are told apart by")
        ok = False
    if url is None:
        return None
    template = compile_template(url, "url", f, "url")
    if template is None:
        return None
    literal = "".join(template.literals)
    if not _VISIBLE_ASCII.match(literal):
        f.problem("url", "must hold visible ASCII only outside its {slots} (percent-encode the rest)")
        return None
    if not (template.literals[0].startswith(("https://", "http://")) or re.match(r"^/(?!/)", template.literals[0])):
        f.problem("url", "must be an http:// or https:// URL, or a path starting with one '/'")
        return None
    return _Redirect(template, when_accept.lower()) if ok else None


def _body(f: Fields) -> _Body | None:
    content_type = f.get("content_type", str)
    text = f.get("text", str, None)
    file = f.get("file", str, None)
    f.reject_unknown()
    if (text is None) == (file is None):
        f.problems.append(Problem(f.where, f.prefix.rstrip("."), "needs exactly one of text and file"))
        return None
    if content_type is None:
        return None
    if not _header_literal_ok(content_type) or not content_type:
        f.problem("content_type", "must be a media type in printable ASCII")
        return None
    essence = content_type.partition(";")[0].strip().lower()
    if not _MEDIA_TYPE.match(essence):
        f.problem("content_type", f"must be a media type (type/subtype), got {content_type!r}")
        return None
    if essence == "application/json" or essence.endswith("+json"):
        context = "json"
    elif essence in ("text/html", "application/xhtml+xml"):
        context = "html"
    elif essence == "text/plain":
        context = "text"
    else:
        f.problem("content_type", "must be application/json (or */*+json), text/html or text/plain")
        return None
    if essence.startswith("text/") and "charset" not in content_type.lower():
        content_type = f"{content_type}; charset=utf-8"
    field = "text" if file is None else "file"
    source = text if file is None else _read_file(f, file)
    if source is None:
        return None
    template = compile_template(source, context, f, field)
    if template is None:
        return None
    if context == "json":
        try:
            json.loads(_JSON_SENTINEL.join(template.literals))
        except ValueError:
            f.problem(field, "must be JSON, with each {slot} inside a JSON string")
            return None
    return _Body(content_type, template)


def _read_file(f: Fields, name: str) -> str | None:
    """The file's text, read once at load; a problem (never its content) when it cannot be used."""
    path = Path(name)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        f.problem("file", f"cannot be read: {err.strerror or 'error'} ({name})")
        return None
    if len(data) > MAX_FILE_BYTES:
        f.problem("file", f"is over {MAX_FILE_BYTES // 1024} KiB ({name})")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        f.problem("file", f"is not UTF-8 text ({name})")
        return None
