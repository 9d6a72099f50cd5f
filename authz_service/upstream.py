"""The one HTTP client that talks to identity providers (JWKS and introspection endpoints).

Every call has a timeout, never follows a redirect, caps the body it reads, and turns every
failure into UpstreamUnavailable with a short outcome label. Nothing here logs a URL's query,
a token or a response body.

Content-Type: an introspection answer must be labelled JSON (`application/json` or any
`application/*+json`, parameters such as `; charset=utf-8` allowed): RFC 7662 2.2 answers are
`application/json`, and a 200 in any other type (text/plain, none, application/jsonp, HTML) is
not an introspection endpoint we understand, so it is an outage (503, never cached), never an
allow. JWKS and discovery documents are read whatever their label: providers disagree
(Keycloak, Auth0, Okta, Entra ID and Google say application/json, Kubernetes
application/jwk-set+json, keys hosted on S3, GCS or GitHub Pages often arrive as
application/octet-stream or text/plain), and the document proves itself: strict JSON of the
right shape, and every key checked on its own (tokens/keys.py), so a label would only refuse
working providers.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from authz_service import strictjson
from authz_service.errors import UpstreamUnavailable
from authz_service.tokens.base import CLIENT_AUTH_FAILED, INVALID_TOKEN, IdpErrorAnswer
from authz_service.tokens.discovery import public_url
from authz_service.tracing import Spans

MAX_JWKS_BYTES = 1024 * 1024
MAX_INTROSPECTION_BYTES = 64 * 1024
# What we ask for (servers that negotiate pick what they have; RFC 7517 8.5 names the JWK Set type).
_ACCEPT = {"jwks": "application/jwk-set+json, application/json"}
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9!#$&^_.+-]+\+)?json")
# RFC 6749 5.2 / RFC 7662 2.3 / RFC 6750 3.1 error codes an OAuth endpoint's 400 or 401 may carry.
# Any other `error` value is read as none: it never becomes a label, a log field or a decision.
_OAUTH_ERRORS = frozenset(
    {"invalid_request", "invalid_client", "invalid_token", "unsupported_token_type", "unauthorized_client"}
)
_TOKEN_ERRORS = frozenset({"invalid_token", "unsupported_token_type"})
_OAUTH_ERROR_STATUSES = frozenset({400, 401})


def is_json_media_type(content_type: str | None) -> bool:
    """`application/json` or `application/<anything>+json`, whatever its parameters."""
    if not content_type:
        return False
    media_type = content_type.partition(";")[0].strip().lower()
    return _JSON_MEDIA_TYPE.fullmatch(media_type) is not None


class UpstreamClient:
    """A shared aiohttp session, created lazily on the running loop."""

    def __init__(self, on_call: Callable[[str, str], None] | None = None, spans: Spans | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        # (endpoint, outcome) -> count, and the metrics hook called with the same pair.
        self.calls: Counter[tuple[str, str]] = Counter()
        self._on_call = on_call
        # One client span per call when tracing exports (None: not traced), a child of the check
        # span current in the caller's context, or a root span for a background key fetch.
        self.spans = spans if spans is not None and spans.enabled else None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=60),
                headers={"User-Agent": "authz-service"},
                # Proxies from the environment are not honoured: IdP traffic goes where config says.
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get_json(self, endpoint: str, url: str, *, timeout: float, max_bytes: int = MAX_JWKS_BYTES) -> Any:
        """GET url and return its JSON body; raise UpstreamUnavailable on any failure."""
        return await self._request(endpoint, "GET", url, timeout=timeout, max_bytes=max_bytes)

    async def post_form(
        self,
        endpoint: str,
        url: str,
        form: Mapping[str, str],
        *,
        headers: Mapping[str, str],
        timeout: float,
        max_bytes: int = MAX_INTROSPECTION_BYTES,
    ) -> Any:
        """POST a form and return its JSON body (labelled JSON); raise UpstreamUnavailable on any failure."""
        return await self._request(
            endpoint, "POST", url, timeout=timeout, max_bytes=max_bytes, form=form, headers=headers, json_only=True
        )

    async def _request(
        self,
        endpoint: str,
        method: str,
        url: str,
        *,
        timeout: float,
        max_bytes: int,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        json_only: bool = False,
    ) -> Any:
        spans = self.spans
        if spans is None:
            return await self._send(endpoint, method, url, timeout, max_bytes, form, headers, json_only)
        # The span names the endpoint's URL without userinfo, query or fragment, never the form.
        with spans.call(endpoint, method, public_url(url)) as span:
            try:
                result = await self._send(endpoint, method, url, timeout, max_bytes, form, headers, json_only)
            except IdpErrorAnswer as err:
                spans.outcome(span, err.outcome, err.status)
                raise
            except UpstreamUnavailable as err:
                spans.outcome(span, err.outcome)
                raise
            spans.outcome(span, "ok", 200)
            return result

    async def _send(
        self,
        endpoint: str,
        method: str,
        url: str,
        timeout: float,
        max_bytes: int,
        form: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        json_only: bool,
    ) -> Any:
        outcome = "ok"
        try:
            async with asyncio.timeout(timeout):
                async with self._client().request(
                    method,
                    url,
                    data=dict(form) if form is not None else None,
                    headers={"Accept": _ACCEPT.get(endpoint, "application/json"), **(headers or {})},
                    allow_redirects=False,
                ) as response:
                    if response.status != 200:
                        outcome = f"http_{response.status}"
                        if form is not None and response.status in _OAUTH_ERROR_STATUSES:
                            error = await _oauth_error(response, max_bytes)
                            outcome = _oauth_outcome(response.status, error) or outcome
                            raise IdpErrorAnswer(endpoint, outcome, status=response.status, error=error)
                        raise UpstreamUnavailable(endpoint, outcome)
                    if json_only and not is_json_media_type(response.headers.get("Content-Type")):
                        outcome = "bad_content_type"
                        raise UpstreamUnavailable(endpoint, outcome)
                    if response.content_length is not None and response.content_length > max_bytes:
                        outcome = "too_large"
                        raise UpstreamUnavailable(endpoint, outcome)
                    body = await response.content.read(max_bytes + 1)
                    if len(body) > max_bytes:
                        outcome = "too_large"
                        raise UpstreamUnavailable(endpoint, outcome)
            try:
                return strictjson.loads(body)
            except (ValueError, RecursionError) as err:
                outcome = "not_json"
                raise UpstreamUnavailable(endpoint, outcome) from err
        except UpstreamUnavailable:
            raise
        except TimeoutError as err:
            outcome = "timeout"
            raise UpstreamUnavailable(endpoint, outcome) from err
        except aiohttp.ClientError as err:
            outcome = "connect_error" if isinstance(err, aiohttp.ClientConnectionError) else "http_error"
            raise UpstreamUnavailable(endpoint, outcome) from err
        finally:
            self.calls[(endpoint, outcome)] += 1
            if self._on_call is not None:
                self._on_call(endpoint, outcome)


async def _oauth_error(response: aiohttp.ClientResponse, max_bytes: int) -> str | None:
    """The known RFC 6749 5.2 `error` code of an error answer's JSON body, else None (body capped)."""
    body = await response.content.read(max_bytes + 1)
    if len(body) > max_bytes:
        return None
    try:
        document = strictjson.loads(body)
    except (ValueError, RecursionError):
        return None
    error = document.get("error") if isinstance(document, dict) else None
    return error if isinstance(error, str) and error in _OAUTH_ERRORS else None


def _oauth_outcome(status: int, error: str | None) -> str | None:
    """The label of an OAuth error answer that is not an outage (None: it is one, `http_<status>`).

    401 is the endpoint refusing our client credentials (RFC 7662 2.3, RFC 6749 5.2), as is
    `invalid_client` on a 400 (servers answer so to credentials sent in the form body); a 400
    `invalid_token` or `unsupported_token_type` is an answer about the token, not a broken IdP.
    """
    if status == 401 or error == "invalid_client":
        return CLIENT_AUTH_FAILED
    if error in _TOKEN_ERRORS:
        return INVALID_TOKEN
    return None
