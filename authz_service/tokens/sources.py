"""Where a request's token comes from: the Authorization header or an introspector's cookie."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from authz_service.errors import MalformedCredentials, TokenRejected
from authz_service.model import Reason
from authz_service.tokens.base import Credential
from authz_service.tokens.jwt import MAX_TOKEN_BYTES


def _parse_cookies(header: str) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


# Visible ASCII only: RFC 6750's b64token is a subset, and opaque tokens and cookies stay inside it.
_TOKEN = re.compile(r"[\x21-\x7e]+")


def _checked(token: str) -> str:
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected(Reason.TOO_LARGE)
    if not _TOKEN.fullmatch(token):
        raise TokenRejected(Reason.MALFORMED)
    return token


class CredentialFinder:
    """Finds the one credential of a request; config decides which cookies count."""

    def __init__(self, cookie_introspectors: Sequence[tuple[str, str]] = ()) -> None:
        # (cookie name, introspector id), in config order.
        self._cookies = tuple(cookie_introspectors)

    def find(self, headers: Mapping[str, str]) -> Credential | None:
        """The request's credential, None if it has none; raise on ambiguous or broken ones."""
        authorization = headers.get("authorization")
        if authorization is not None:
            # Envoy joins repeated headers with ","; no bearer token contains one (RFC 6750 b64token).
            if "," in authorization:
                raise MalformedCredentials(Reason.MULTIPLE_CREDENTIALS)
            scheme, _, rest = authorization.strip().partition(" ")
            if scheme.lower() == "bearer":
                return Credential(_checked(rest.strip()))
            # Another scheme (Basic, ...) is not ours to judge: the request counts as anonymous,
            # exactly as Envoy's jwt_authn treats it.
        if self._cookies:
            cookie_header = headers.get("cookie")
            if cookie_header:
                cookies = _parse_cookies(cookie_header)
                for name, introspector in self._cookies:
                    if name in cookies:
                        return Credential(_checked(cookies[name]), introspector)
        return None
