"""What every introspector is: one protocol, whatever the kind of token.

`Authorizer` sees only this protocol (through the verified-token cache and the router), never
a concrete class: JWT and opaque introspectors, and the caches that wrap them, all fit it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from authz_service.errors import UpstreamUnavailable
from authz_service.model import Identity, Reason
from authz_service.tokens.jws import ParsedJwt

# Outcome labels of an OAuth endpoint's error answers (RFC 6749 5.2): neither is an outage.
CLIENT_AUTH_FAILED = "client_auth_failed"  # 401, or `invalid_client`: the IdP refused *our* credentials
INVALID_TOKEN = "invalid_token"  # 400 `invalid_token` / `unsupported_token_type`: an answer about the token


class IdpErrorAnswer(UpstreamUnavailable):
    """An OAuth endpoint answered an error status; `error` is its RFC 6749 5.2 code when it is a known one.

    Still an UpstreamUnavailable (503, never cached) unless the introspector reads it otherwise:
    `INVALID_TOKEN` is an answer about the token (401), `CLIENT_AUTH_FAILED` our misconfiguration.
    """

    def __init__(self, endpoint: str, outcome: str, *, status: int, error: str | None) -> None:
        # What Check answers with it (decide.py): the IdP refusing our credentials is not an outage.
        reason = Reason.INTROSPECTION_CLIENT_AUTH if outcome == CLIENT_AUTH_FAILED else Reason.IDP_UNAVAILABLE
        super().__init__(endpoint, outcome, reason)
        self.status = status
        self.error = error


@dataclass(frozen=True, slots=True)
class Credential:
    """A token found on a request, and the introspector its source binds it to (if any)."""

    token: str
    introspector: str | None = None  # set by per-introspector sources (cookie, from_headers, from_params)
    jwt: ParsedJwt | None = None  # the token already parsed as a JWS, when routing needed its `iss`

    # The Authorization scheme it came with, lower case: "bearer" here (also every per-introspector
    # source), "dpop" for a DPoPCredential. Properties rather than fields: a frozen dataclass sets
    # each field through object.__setattr__, and every Check builds one Credential.
    @property
    def scheme(self) -> str:
        """`bearer`; `dpop` for a DPoPCredential."""
        return "bearer"

    @property
    def proof(self) -> str | None:
        """The request's DPoP proof (RFC 9449): only a DPoPCredential has one."""
        return None


@dataclass(frozen=True, slots=True)
class DPoPCredential(Credential):
    """A token sent as `Authorization: DPoP <token>` (RFC 9449 7.1), with the request's `DPoP` proof."""

    proof: str | None = None

    @property
    def scheme(self) -> str:
        return "dpop"


class Introspector(Protocol):
    """Turns a credential into an Identity, or raises TokenRejected / UpstreamUnavailable."""

    @property
    def id(self) -> str:
        """The TokenIntrospector's id."""
        ...

    @property
    def issuer(self) -> str | None:
        """The `iss` this introspector claims (jwt); None: asked, in config order, for tokens no issuer claims."""
        ...

    @property
    def key_generation(self) -> int:
        """Changes whenever the keys change (a rotation): identities verified before are not reused."""
        ...

    async def introspect(self, credential: Credential) -> Identity:
        """The identity behind the credential; TokenRejected (401) or UpstreamUnavailable (503) if none."""
        ...

    def trusted_until(self, identity: Identity) -> float:
        """Epoch seconds until which this verification of `identity` may be reused without asking again."""
        ...


class KeyRefresh(Protocol):
    """A key source's background refresh, as a verified-token cache hit pokes it (tokens/jwks.py).

    A hit never asks the key source for keys, so without the poke a token served from memory would
    never start the refresh ahead of expiry, and the first miss after the keys expire would wait for
    a fetch. The hit compares one number; only a due refresh costs a call.
    """

    # Seconds on `clock` (the key source's monotonic clock) from which a background refresh is due.
    refresh_due_at: float

    def clock(self) -> float:
        """Now, on the clock refresh_due_at is read on."""
        ...

    def refresh_in_background(self) -> None:
        """Start the due refresh unless one is in flight; never waits, never raises."""
        ...


class IdpClient(Protocol):
    """The HTTP client introspectors talk to identity providers with (upstream.UpstreamClient).

    Every failure is raised as UpstreamUnavailable (IdpErrorAnswer for an OAuth endpoint's 400 and
    401 answers, with their `error` code); the answer is strict JSON.
    """

    async def get_json(self, endpoint: str, url: str, *, timeout: float, max_bytes: int = ...) -> Any:
        """GET url; its JSON body (at most max_bytes, a default that suits a JWKS)."""
        ...

    async def post_form(
        self, endpoint: str, url: str, form: Mapping[str, str], *, headers: Mapping[str, str], timeout: float
    ) -> Any:
        """POST a form to url; its JSON body."""
        ...
