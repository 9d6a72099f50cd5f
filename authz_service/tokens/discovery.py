"""Where a JWKS lives: a configured URI, or OIDC discovery from the issuer.

With `discovery: true` the JWKS URI comes from `<iss>/.well-known/openid-configuration` (OpenID
Connect Discovery 1.0, section 4), fetched with the same hardened client as the keys. The
document's `issuer` must equal `jwt.iss` exactly (section 4.3): anything else is a failed fetch,
never a silent accept. The document is fetched again with every key fetch, so a provider that
moves its keys is followed on the next refresh.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol
from urllib.parse import urlsplit

from authz_service.errors import UpstreamUnavailable
from authz_service.tokens.base import IdpClient

log = logging.getLogger(__name__)

MAX_DISCOVERY_BYTES = 64 * 1024
WELL_KNOWN = "/.well-known/openid-configuration"
_URL = re.compile(r"^https?://[^/\s?#]+")


class JwksLocation(Protocol):
    """Tells a JWKS key source where to fetch the keys from, each time it fetches."""

    @property
    def url(self) -> str:
        """Where a fetch starts (the JWKS URI, or the discovery document): what a failure log names."""
        ...

    async def jwks_uri(self) -> str:
        """The JWKS URI; UpstreamUnavailable if it cannot be known now."""
        ...


class FixedJwksUri:
    """A `jwks_uri` from config."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.url = uri

    async def jwks_uri(self) -> str:
        return self.uri


def public_url(url: str) -> str:
    """The URL as logs and /readyz may show it: scheme, host, port and path; never the userinfo,
    query or fragment, where credentials and signed parameters travel."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else "<not a URL>"


def discovery_url(issuer: str) -> str:
    """Where an issuer publishes its OpenID Provider metadata."""
    return issuer.rstrip("/") + WELL_KNOWN


def jwks_uri_of(document: Any, issuer: str) -> str:
    """The `jwks_uri` of a discovery document whose `issuer` is exactly ours; UpstreamUnavailable if not."""
    if not isinstance(document, dict):
        raise UpstreamUnavailable("discovery", "invalid_document")
    if document.get("issuer") != issuer:
        # A prefix, a trailing slash, another tenant: not the issuer we trust, so not its keys.
        raise UpstreamUnavailable("discovery", "issuer_mismatch")
    uri = document.get("jwks_uri")
    if not isinstance(uri, str) or not _URL.match(uri):
        raise UpstreamUnavailable("discovery", "invalid_document")
    return uri


class OidcDiscovery:
    """The JWKS URI from the issuer's discovery document."""

    def __init__(self, issuer: str, client: IdpClient, timeout: float) -> None:
        self.issuer = issuer
        self.url = discovery_url(issuer)
        self._client = client
        self._timeout = timeout
        self._last: str | None = None

    async def jwks_uri(self) -> str:
        document = await self._client.get_json(
            "discovery", self.url, timeout=self._timeout, max_bytes=MAX_DISCOVERY_BYTES
        )
        uri = jwks_uri_of(document, self.issuer)
        if uri != self._last:
            self._last = uri
            issuer_host, jwks_host = urlsplit(self.issuer).netloc, urlsplit(uri).netloc
            if issuer_host != jwks_host:
                # Allowed (providers serve keys from a CDN or another domain), but worth knowing.
                log.info(
                    "discovered jwks_uri is on another host than the issuer",
                    extra={"fields": {"issuer_host": issuer_host, "jwks_host": jwks_host}},
                )
        return uri
