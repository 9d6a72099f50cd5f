"""HTTP mode's adapter: a check as a proxy sends it (method, target, header pairs) -> HttpRequest,
or the Decision that refuses it. No server framework here, so every HTTP shell (aiohttp's in
server/http.py, and any other) routes and reads a check the same way, and tests feed plain values.

- `/ext_authz/<original path>`: Envoy's http_service with `path_prefix: /ext_authz`; the method,
  path (with query) and headers are the original request's.
- `/forward_auth`: nginx and Traefik; the original request is described by X-Forwarded-Method /
  X-Original-Method, X-Forwarded-Uri / X-Original-URI, X-Forwarded-Host / Host and
  X-Forwarded-Proto. A proxy sets one of each pair, once: a request whose pair disagrees, or that
  repeats one, carries a client's own header and is refused (400 `conflicting_original`).

Decision -> answer is `envoy.HttpAnswers` (the engine builds one per response config).
"""

from __future__ import annotations

import enum
from collections.abc import Collection

from authz_service.envoy import join_headers
from authz_service.model import Decision, HttpRequest, Outcome, Reason

EXT_AUTHZ_PREFIX = "/ext_authz"
FORWARD_AUTH = "/forward_auth"
# What a shell hands over: the request's headers as (name, value) pairs in the order received,
# repeats kept (aiohttp's `headers.items()`, an RSGI scope's `headers.items()`). A Collection, not
# an iterator: forward_auth reads it a second time when some header repeats.
HeaderPairs = Collection[tuple[str, str]]

NO_URI = Decision(Outcome.INVALID_REQUEST, Reason.NO_ORIGINAL_URI)
CONFLICTING = Decision(Outcome.INVALID_REQUEST, Reason.CONFLICTING_ORIGINAL)
HEADERS_TOO_LARGE = Decision(Outcome.INVALID_REQUEST, Reason.HEADERS_TOO_LARGE)
TOKEN_TOO_LARGE = Decision(Outcome.UNAUTHENTICATED, Reason.TOO_LARGE)
UNPARSABLE = Decision(Outcome.INVALID_REQUEST, Reason.UNDECODABLE_REQUEST)


class Route(enum.Enum):
    """What a request to the HTTP-mode listener asks for."""

    EXT_AUTHZ = "ext_authz"
    FORWARD_AUTH = "forward_auth"
    HEALTHZ = "healthz"
    READYZ = "readyz"
    NOT_FOUND = "not_found"


_PATHS = {FORWARD_AUTH: Route.FORWARD_AUTH, "/healthz": Route.HEALTHZ, "/readyz": Route.READYZ}


def route(target: str) -> Route:
    """The route of a request target, as sent (path and query, nothing decoded)."""
    # Routed by the target as sent, never a decoded or dot-resolved path: Envoy sends `/ext_authz`
    # + the original path as it is (`/ext_authz/../admin` is a check of `/../admin`).
    if target.startswith(EXT_AUTHZ_PREFIX) and target[10:11] in ("", "/", "?"):
        return Route.EXT_AUTHZ
    return _PATHS.get(target.partition("?")[0], Route.NOT_FOUND)


def client_address(headers: dict[str, str], peer: str) -> str:
    """The client's address: the last X-Forwarded-For entry (the one the proxy in front of us
    added itself: Envoy with use_remote_address, nginx's $proxy_add_x_forwarded_for, Traefik), else
    the peer. Entries a client sends itself come before it, so they are never read."""
    forwarded = headers.get("x-forwarded-for")
    if forwarded:
        return forwarded.rpartition(",")[2].strip()
    return peer


def ext_authz_request(method: str, target: str, pairs: HeaderPairs, peer: str) -> HttpRequest:
    """The original request, from Envoy's http_service check (path_prefix /ext_authz)."""
    return ext_authz_joined(method, target, join_headers(pairs), peer)


def ext_authz_joined(method: str, target: str, headers: dict[str, str], peer: str) -> HttpRequest:
    """ext_authz_request, from the headers already joined (`envoy.join_headers`: lower-case names,
    repeats joined): for a shell that reads them into a dict in one pass."""
    path = target[len(EXT_AUTHZ_PREFIX) :] or "/"
    if path.startswith("?"):
        path = "/" + path
    return HttpRequest(
        method=method,
        path=path,
        host=headers.get("host", ""),
        scheme=headers.get("x-forwarded-proto", "http"),
        headers=headers,
        remote_addr=client_address(headers, peer),
        request_id=headers.get("x-request-id", ""),
    )


# What describes the original request (Traefik's X-Forwarded-*, nginx's X-Original-*): a proxy
# sets one of each pair, once.
_ORIGINAL_HEADERS = frozenset(("x-forwarded-uri", "x-original-uri", "x-forwarded-method", "x-original-method"))


def forward_auth_request(method: str, target: str, pairs: HeaderPairs, peer: str) -> HttpRequest | Decision:
    """The original request, from nginx's or Traefik's X-Forwarded-* / X-Original-* headers; a
    denial when the proxy did not say which URI it asks about, or when those headers disagree.
    (`target` is /forward_auth itself: the signature is ext_authz_request's.)"""
    headers = join_headers(pairs)
    # Fewer names than pairs: some header came more than once (rare, so the second look is too).
    if len(headers) < len(pairs) and _repeats_an_original(pairs):
        return CONFLICTING  # repeated: a client's own value besides the proxy's
    return forward_auth_joined(method, target, headers, peer)


def forward_auth_joined(method: str, target: str, headers: dict[str, str], peer: str) -> HttpRequest | Decision:
    """forward_auth_request, from headers already joined in which no header came twice (a shell
    whose request repeats one calls forward_auth_request: a repeated original is refused there)."""
    forwarded_uri, original_uri = headers.get("x-forwarded-uri"), headers.get("x-original-uri")
    if forwarded_uri and original_uri and forwarded_uri != original_uri:
        return CONFLICTING
    forwarded_method, original_method = headers.get("x-forwarded-method"), headers.get("x-original-method")
    if forwarded_method and original_method and forwarded_method.upper() != original_method.upper():
        return CONFLICTING
    uri = forwarded_uri or original_uri
    if not uri:
        return NO_URI
    return HttpRequest(
        method=(forwarded_method or original_method or method).upper(),
        path=uri,
        host=headers.get("x-forwarded-host") or headers.get("host", ""),
        scheme=headers.get("x-forwarded-proto", "http"),
        headers=headers,
        remote_addr=client_address(headers, peer),
        request_id=headers.get("x-request-id", ""),
    )


def _repeats_an_original(pairs: HeaderPairs) -> bool:
    seen: set[str] = set()
    for name, _ in pairs:
        key = name.lower()
        if key in _ORIGINAL_HEADERS:
            if key in seen:
                return True
            seen.add(key)
    return False


def too_large(start: bytes) -> Decision:
    """The denial for a header (or the request line) over the server's size limit, from the start
    of it that the parser quotes: a Bearer (or DPoP-scheme) token is judged as a token (401), as
    Check judges one; a `DPoP:` proof header (`dpop:`, or a value `eyJ...`) is a header (431)."""
    if start.lower().startswith((b"bearer ", b"dpop ", b"authorization:")):
        return TOKEN_TOO_LARGE
    return HEADERS_TOO_LARGE
