"""Where a request's token comes from.

Order (SPEC): `Authorization: Bearer` (or `DPoP`, RFC 9449 7.1, with its `DPoP` proof header)
first; then each introspector's own sources, introspectors
in config order, and within one introspector its `from_headers` (in order), its `from_params` (in
order), then its `cookie`. A token from an introspector's own source is bound to that
introspector: no other may vouch for it.

A query parameter carries a token only under its configured name, exactly: that is the name
Envoy's `query_parameters_to_remove` removes (it compares names undecoded). A parameter another
reader could take for a token parameter (`access%5Ftoken`, `Access_Token`, ` access_token`, or
`x=1;access_token=...` to a server that also splits on `;`) would reach the upstream unremoved
and unverified, so such a request is refused (400 `ambiguous_path`), whichever source its own
token came from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import unquote_plus

from authz_service.config.model import HeaderSource, IntrospectorConfig
from authz_service.errors import MalformedCredentials, TokenRejected
from authz_service.model import HttpRequest, Reason
from authz_service.tokens.base import Credential, DPoPCredential
from authz_service.tokens.dpop import InvalidDPoPProof, proof_header
from authz_service.tokens.jws import MAX_TOKEN_BYTES

# Visible ASCII only: RFC 6750's b64token is a subset, and opaque tokens and cookies stay inside it.
_TOKEN = re.compile(r"[\x21-\x7e]+")


def _parse_cookies(header: str) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


def _checked(token: str) -> str:
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected(Reason.TOO_LARGE)
    if not _TOKEN.fullmatch(token):
        raise TokenRejected(Reason.MALFORMED)
    return token


def _single(value: str) -> str:
    # Envoy joins repeated headers with ","; no bearer token contains one (RFC 6750 b64token).
    if "," in value:
        raise MalformedCredentials(Reason.MULTIPLE_CREDENTIALS)
    return value


class _Sources:
    """One introspector's own token sources."""

    __slots__ = ("cookie", "headers", "introspector", "params")

    def __init__(self, config: IntrospectorConfig) -> None:
        self.introspector = config.id
        self.headers: tuple[HeaderSource, ...] = config.from_headers
        self.params: tuple[str, ...] = config.from_params
        self.cookie = config.cookie


_NO_PARAMS: Mapping[str, list[str]] = {}


class CredentialFinder:
    """Finds the one credential of a request; config decides which sources count."""

    def __init__(self, introspectors: Sequence[IntrospectorConfig] = ()) -> None:
        self._sources = tuple(
            _Sources(c) for c in introspectors if c.cookie is not None or c.from_headers or c.from_params
        )
        self._reads_query = any(s.params for s in self._sources)
        self._params = frozenset(p for s in self._sources for p in s.params)
        self._folded_params = frozenset(p.lower() for p in self._params)
        self._reads_cookies = any(s.cookie is not None for s in self._sources)
        # Every query parameter that may carry a token: removed from what the upstream sees.
        self.token_params: tuple[str, ...] = tuple(dict.fromkeys(p for s in self._sources for p in s.params))
        # Every header that may carry a token (besides authorization and cookie): redacted wherever
        # a request is shown (test-policy, explain).
        self.token_headers: tuple[str, ...] = tuple(dict.fromkeys(h.name for s in self._sources for h in s.headers))

    def find(self, request: HttpRequest) -> Credential | None:
        """The request's credential, None if it has none; raise on ambiguous or broken ones."""
        headers = request.headers
        # Read whenever a token may come from the query, so a disguised token parameter is refused
        # even when the token comes from elsewhere (the module docstring).
        query = self._query(request.path) if self._reads_query else _NO_PARAMS
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, rest = _single(authorization).strip().partition(" ")
            folded = scheme.lower()
            if folded == "bearer":
                return Credential(_checked(rest.strip()))
            if folded == "dpop":
                # A DPoP-bound token without its proof is refused before any introspection (RFC 9449 7.1).
                proof = proof_header(headers)
                if not proof:
                    raise InvalidDPoPProof("missing_proof", "DPoP proof required")
                return DPoPCredential(_checked(rest.strip()), proof=proof)
            # Another scheme (Basic, ...) is not ours to judge: the request counts as anonymous,
            # exactly as Envoy's jwt_authn treats it.
        if not self._sources:
            return None
        cookies = _parse_cookies(headers.get("cookie", "")) if self._reads_cookies else {}
        for source in self._sources:
            token = _own_token(source, headers, query, cookies)
            if token is not None:
                return Credential(_checked(token), source.introspector)
        return None

    def _query(self, path: str) -> Mapping[str, list[str]]:
        """The token parameters' values (percent-decoded), by their exact names; raise when another
        parameter could be read as one."""
        _, mark, query = path.partition("?")
        if not mark:
            return _NO_PARAMS
        params: dict[str, list[str]] = {}
        for piece in query.split("&"):
            name, _, value = piece.partition("=")
            if name in self._params:
                params.setdefault(name, []).append(unquote_plus(value))
            elif self._disguised(name):
                raise MalformedCredentials(Reason.AMBIGUOUS_QUERY)
            if ";" in piece and any(self._disguised(part.partition("=")[0]) for part in piece.split(";")[1:]):
                raise MalformedCredentials(Reason.AMBIGUOUS_QUERY)
        return params

    def _disguised(self, name: str) -> bool:
        """Whether a parameter name that is not a token parameter's reads as one once decoded,
        trimmed or lower-cased, as some server may."""
        return bool(name) and unquote_plus(name).strip().lower() in self._folded_params


def _own_token(
    source: _Sources, headers: Mapping[str, str], query: Mapping[str, list[str]], cookies: Mapping[str, str]
) -> str | None:
    for header in source.headers:
        value = headers.get(header.name)
        if value is not None:
            value = _single(value).strip()
            prefix = header.prefix
            if not prefix:
                return value
            if value[: len(prefix)].lower() == prefix.lower():
                return value[len(prefix) :].strip()
    for name in source.params:
        values = query.get(name)
        if values:
            if len(values) > 1:
                raise MalformedCredentials(Reason.MULTIPLE_CREDENTIALS)
            return values[0]
    if source.cookie is not None and source.cookie in cookies:
        return cookies[source.cookie]
    return None
