"""The request context policies see, built once per Check (Aidbox's request object, trimmed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from authz_service.model import HttpRequest, Identity


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


def build_context(
    request: HttpRequest,
    identity: Identity | None,
    user: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The context for one request. Without an identity there is no jwt, token, user or introspector."""
    path, _, query = request.path.partition("?")
    context: dict[str, Any] = {
        "request-method": request.method.lower(),
        "uri": path,
        "query-string": query,
        "params": query_params(query),
        # Pseudo-headers (:path, :authority) are Envoy's plumbing; their values are already above.
        "headers": {name: value for name, value in request.headers.items() if not name.startswith(":")},
        "host": request.host,
        "scheme": request.scheme,
        "remote-addr": request.remote_addr,
        "context_extensions": dict(request.context_extensions),
    }
    context = strip_empty(context)
    if identity is not None:
        # Claims and users are stripped once (per verification, at config load), not per request:
        # identities reach here shaped by engine.IdentityShaper.
        claims = identity.claims
        if claims:
            context["jwt" if identity.kind == "jwt" else "token"] = claims
        context["introspector"] = identity.introspector
        if user:
            context["user"] = user
    return context
