"""The request context policies see, built once per Check (Aidbox's request object, trimmed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

from authz_service.config.model import RoleConfig
from authz_service.model import HttpRequest, Identity
from authz_service.routes import ROUTE_PARAMS, route

_NO_ROLES: tuple[RoleConfig, ...] = ()

# What build_context can put at the top of a context, by the type of its value. check-config warns
# about a matcho key outside these (no request has it) and about a pattern of the wrong type (a
# number for `uri`, a string for `user`), which can never match; tests/unit/test_context.py holds
# them to build_context.
STRING_KEYS = frozenset({"request-method", "uri", "query-string", "host", "scheme", "remote-addr", "introspector"})
MAP_KEYS = frozenset({"params", "headers", "context_extensions", "operation", "jwt", "token", "client", "user"})
LIST_KEYS = frozenset({"roles", "role"})
CONTEXT_KEYS = STRING_KEYS | MAP_KEYS | LIST_KEYS


def strip_empty(value: Any) -> Any:
    """Remove empty values ([], {}, "", null) at every depth, as Aidbox does before policy checks."""
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            item = strip_empty(item)
            if item is not None and item != "" and item != [] and item != {}:
                result[key] = item
        return result
    if isinstance(value, list):
        items = [strip_empty(item) for item in value]
        return [item for item in items if item is not None and item != "" and item != [] and item != {}]
    return value


def query_params(query: str) -> dict[str, str | list[str]]:
    """Query parameters as a map: one value stays a string, repeated values become a list."""
    return {name: values[0] if len(values) == 1 else values for name, values in parse_qs(query).items()}


def client_id(claims: Mapping[str, Any]) -> str | None:
    """The OAuth client a token was issued to: `client_id` (RFC 7662, RFC 9068), else `azp` (OIDC)."""
    for name in ("client_id", "azp"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def build_context(
    request: HttpRequest,
    identity: Identity | None,
    user: Mapping[str, Any] | None,
    roles: Sequence[RoleConfig] = _NO_ROLES,
) -> dict[str, Any]:
    """The context for one request. Without an identity there is no jwt, token, user, client,
    roles or introspector."""
    path, _, query = request.path.partition("?")
    method = request.method.lower()
    params = query_params(query)
    found = route(method, path)
    if params.keys() & ROUTE_PARAMS:
        # Route parameters come from the path only: a client cannot add resource/id to a search.
        params = {name: value for name, value in params.items() if name not in ROUTE_PARAMS}
    params.update(found.params)
    # What strip_empty would leave of these, built directly (its recursion was a third of the
    # context's cost): every value here is a string, a map of strings, or (params) a map of strings
    # and lists of non-empty strings (parse_qs drops blank values; route params are never empty).
    context: dict[str, Any] = {}
    for key, text in (("request-method", method), ("uri", path), ("query-string", query)):
        if text:
            context[key] = text
    params = {name: value for name, value in params.items() if value != "" and value != []}
    if params:
        context["params"] = params
    # Pseudo-headers (:path, :authority) are Envoy's plumbing; their values are already above.
    headers = {name: value for name, value in request.headers.items() if value and not name.startswith(":")}
    if headers:
        context["headers"] = headers
    for key, text in (("host", request.host), ("scheme", request.scheme), ("remote-addr", request.remote_addr)):
        if text:
            context[key] = text
    extensions = {name: value for name, value in request.context_extensions.items() if value}
    if extensions:
        context["context_extensions"] = extensions
    if found.operation is not None:
        context["operation"] = {"id": found.operation}
    if identity is not None:
        # Claims and users are stripped once (per verification, at config load), not per request:
        # identities reach here shaped by engine.IdentityShaper.
        claims = identity.claims
        if claims:
            context["jwt" if identity.kind == "jwt" else "token"] = claims
            client = client_id(claims)
            if client is not None:
                context["client"] = {"id": client}
        context["introspector"] = identity.introspector
        if user:
            context["user"] = user
        if roles:
            # Aidbox's `role` (the user's Role resources) and a plain list of their names.
            context["roles"] = [role.name for role in roles]
            context["role"] = [role.resource for role in roles]
    return context
