"""The Envoy adapter: CheckRequest bytes -> HttpRequest, Identity -> headers, Decision ->
CheckResponse bytes (gRPC) or HttpAnswer (HTTP mode).

The one table that maps an Outcome to a gRPC code, an HTTP status and the deny headers lives
here, and the one rule for repeated headers (`join_headers`). Deny responses depend only on
(outcome, reason), so each is built once and reused.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

from google.protobuf.message import DecodeError
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import BoolValue
from google.rpc import code_pb2, status_pb2

from authz_service._pb.envoy.config.core.v3 import base_pb2
from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2
from authz_service._pb.envoy.type.v3 import http_status_pb2
from authz_service.config.model import ResponseConfig
from authz_service.errors import TokenRejected
from authz_service.lru import Lru
from authz_service.model import SENDER_CHALLENGES, Decision, HttpRequest, Identity, Outcome, Reason, header_pairs

log = logging.getLogger(__name__)

REALM = "authz-service"

# Outcome -> (gRPC code, HTTP status, OAuth error code for the body and www-authenticate).
OUTCOMES: Mapping[Outcome, tuple[int, int, str]] = {
    Outcome.UNAUTHENTICATED: (code_pb2.UNAUTHENTICATED, 401, "invalid_token"),
    Outcome.FORBIDDEN: (code_pb2.PERMISSION_DENIED, 403, "access_denied"),
    Outcome.INVALID_REQUEST: (code_pb2.INVALID_ARGUMENT, 400, "invalid_request"),
    Outcome.UNAVAILABLE: (code_pb2.UNAVAILABLE, 503, "temporarily_unavailable"),
}
# RFC 6750 3.1: a request without credentials gets the challenge but no error code.
_NO_CREDENTIALS_ERROR = "unauthorized"
MAX_HEADER_VALUE = 8192
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def header_safe(value: str) -> bool:
    """A value Envoy can put in a header: no control characters, bounded size."""
    return len(value) <= MAX_HEADER_VALUE and not _CONTROL.search(value)


def encode_claims(claims: Mapping[str, Any]) -> str:
    """base64url (no padding) of the claims as compact UTF-8 JSON."""
    raw = json.dumps(claims, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class IdentityHeaders:
    """Turns a verified identity into the headers sent upstream (names fixed at config load)."""

    def __init__(self, response: ResponseConfig) -> None:
        self._user_id = response.user_id_header
        self._claims = response.claims_header
        self._claim_headers = response.claim_headers

    def build(self, identity: Identity) -> tuple[str, ...]:
        """The headers for this identity, flat (name, value, ...); raise TokenRejected if the user id
        cannot be a header."""
        headers: list[str] = []
        if identity.user_id is not None:
            if not header_safe(identity.user_id):
                raise TokenRejected(Reason.BAD_CLAIMS)
            headers += (self._user_id, identity.user_id)
        claims = encode_claims(identity.claims)
        if len(claims) <= MAX_HEADER_VALUE:
            headers += (self._claims, claims)
        for claim, header in self._claim_headers:
            value = identity.claims.get(claim)
            if value is None:
                continue
            text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
            # A claim we cannot pass safely is left out (and so removed upstream), never mangled.
            if header_safe(text):
                headers += (header, text)
        return tuple(headers)


class Denial(NamedTuple):
    """What a client gets for a denied request, in gRPC and in HTTP mode alike."""

    grpc_code: int
    http_status: int
    headers: tuple[tuple[str, str], ...]  # content-type, and www-authenticate for 400 and 401
    body: str  # {"error", "error_description"}: never a token
    error: str  # the OAuth error code in the body
    description: str

    @classmethod
    def of(cls, outcome: Outcome, reason: Reason, dpop_algs: str = "") -> Denial:
        """The answer for a deny, from the one OUTCOMES table. `dpop_algs`: the DPoP proof
        algorithms a DPoP challenge advertises (RFC 9449 7.1), space-separated."""
        grpc_code, http_status, error = OUTCOMES[outcome]
        sender = SENDER_CHALLENGES.get(reason)
        if reason is Reason.MISSING_TOKEN:
            error = _NO_CREDENTIALS_ERROR
            challenge = f'Bearer realm="{REALM}"'
        elif sender is not None:
            # A sender-constrained token's refusal: the DPoP scheme's own challenge.
            error = sender[1]
            challenge = f'DPoP error="{error}", error_description="{reason.description}"'
            if dpop_algs:
                challenge += f', algs="{dpop_algs}"'
        else:
            challenge = f'Bearer realm="{REALM}", error="{error}", error_description="{reason.description}"'
        headers = [("content-type", "application/json")]
        if http_status in (400, 401):
            headers.append(("www-authenticate", challenge))
        body = json.dumps({"error": error, "error_description": reason.description})
        return cls(grpc_code, http_status, tuple(headers), body, error, reason.description)


UNDECODABLE = Decision(Outcome.INVALID_REQUEST, Reason.UNDECODABLE_REQUEST)


def decode_check(raw: bytes) -> HttpRequest | Decision:
    """Our request view of a serialized CheckRequest, or the denial of one that does not decode
    (invalid UTF-8 in a string field, a truncated message)."""
    try:
        check = external_auth_pb2.CheckRequest.FromString(raw)
    except DecodeError:
        log.warning("undecodable CheckRequest", extra={"fields": {"bytes": len(raw)}})
        return UNDECODABLE
    return to_http_request(check)


def to_http_request(check: external_auth_pb2.CheckRequest) -> HttpRequest:
    """Our request view of Envoy's CheckRequest."""
    attributes = check.attributes
    http = attributes.request.http
    if http.headers:
        headers: Mapping[str, str] = http.headers
    else:
        # With encode_raw_headers Envoy sends each value separately, as bytes.
        headers = join_headers(
            (entry.key, entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value)
            for entry in http.header_map.headers
        )
    return HttpRequest(
        method=http.method,
        path=http.path,
        host=http.host,
        scheme=http.scheme,
        headers=headers,
        remote_addr=attributes.source.address.socket_address.address,
        # Set by Envoy's `include_peer_certificate: true` (URL-encoded PEM): certificate-bound tokens.
        certificate=attributes.source.certificate,
        # Envoy's (and Istio's) x-request-id is what its access log and the upstream see; the stream
        # id (attributes.request.http.id) means nothing outside this Envoy, so it is only a fallback.
        request_id=headers.get("x-request-id") or http.id,
        context_extensions=attributes.context_extensions,
    )


def join_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-case names; a repeated header's values joined with "," in the order received, as Envoy
    joins them for CheckRequest's `headers` map, so a request means the same whichever way it came."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    # append=false explicitly: Envoy then overwrites any client-sent header of the same name.
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append=BoolValue(value=False))


# --- What the config's optional answers plug in (issue #23): denials.Responses and
# identity_token.IdentityTokenMinter, built by the engine; described here by what envoy reads, so
# that this module stays independent of both.


class ShapedDenial(Protocol):
    """A deny answer from the `responses` block (denials.DenyAnswer)."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def body(self) -> bytes: ...


class DenialShaper(Protocol):
    """The compiled `responses` block (denials.Responses)."""

    def render(
        self, outcome: Outcome, reason: Reason, request_url: str, method: str, path: str, accept: str | None
    ) -> ShapedDenial | None: ...


class TokenMinter(Protocol):
    """The identity token's signer with its cache (identity_token.IdentityTokenMinter)."""

    @property
    def header(self) -> str: ...

    def token_for(
        self,
        user_id: str | None,
        claims: Mapping[str, Any],
        policy: str | None,
        introspector: str | None,
        cache_key: Hashable,
        not_after: float | None = None,
    ) -> str: ...


_NO_REQUEST = HttpRequest()


class _Rechallenged(NamedTuple):
    """A `responses` answer whose challenge was swapped for the DPoP scheme's (see shaped_denial)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def shaped_denial(
    shaper: DenialShaper, decision: Decision, request: HttpRequest, dpop_algs: str = ""
) -> ShapedDenial | None:
    """The `responses` block's answer to a denial, from the original request's URL, method, path
    and Accept; None when the block leaves this outcome to the precomputed answer. A refused
    sender-constrained token keeps the DPoP scheme's challenge (RFC 9449 7.1) in the block's answer:
    the block writes Bearer's."""
    target = request.path
    url = f"{request.scheme or 'http'}://{request.host}{target}"
    path = target.partition("?")[0]
    shaped = shaper.render(decision.outcome, decision.reason, url, request.method, path, request.headers.get("accept"))
    if shaped is None or decision.reason not in SENDER_CHALLENGES:
        return shaped
    challenge = dict(Denial.of(decision.outcome, decision.reason, dpop_algs).headers).get("www-authenticate")
    if challenge is None:
        return shaped
    headers = tuple((name, challenge if name == "www-authenticate" else value) for name, value in shaped.headers)
    return _Rechallenged(shaped.status, headers, shaped.body)


def minted_token(minter: TokenMinter, decision: Decision, identity: Identity) -> str:
    """The identity token of an allow, from the minter's cache when this credential and policy had
    one recently. The credential is named by what its identity carries: the introspector, user id
    and the identity headers (whose claims header holds every claim, `exp` and `jti` included).
    The token never outlives the credential: its `exp` claim, else until when the service trusts it."""
    key = (identity.introspector, identity.user_id, decision.headers)
    exp = identity.claims.get("exp")
    not_after = exp if isinstance(exp, int | float) and not isinstance(exp, bool) else identity.answer_until
    return minter.token_for(identity.user_id, identity.claims, decision.policy, identity.introspector, key, not_after)


# The deny answers of the `responses` block kept encoded: those built once per (outcome, reason)
# repeat; those that quote the request ({url}, {path}) churn through a few.
SHAPED_MEMO_ENTRIES = 256


# The allow answers kept encoded, per ResponseBuilder (and per HttpAnswers): the most recent
# identities'. One costs ~600 bytes (its ~450-byte answer, key and slot); building one again costs
# ~12 µs. A user's requests come in bursts (a page's dozens of calls within a second), so 4,096
# identities hold every burst at thousands of checks a second, in 2.4 MB (10,000 took 6 MB of the
# 150 MB that 100,000 cached tokens may take).
ALLOW_MEMO_ENTRIES = 4096


class ResponseBuilder:
    """Turns Decisions into CheckResponses for one response config.

    `encode` gives the serialized answer, which is what the gRPC layer sends: a deny depends only
    on (outcome, reason) and is encoded once; an allow depends only on the identity headers and
    metadata, so the answers of the most recent identities are kept encoded (a repeated token
    costs a dict lookup instead of building and serializing ~10 protobuf messages, ~12 µs).
    """

    def __init__(
        self,
        response: ResponseConfig,
        memo_entries: int = ALLOW_MEMO_ENTRIES,
        remove_params: tuple[str, ...] = (),
        *,
        denials: DenialShaper | None = None,
        minter: TokenMinter | None = None,
        dpop_algs: str = "",
    ) -> None:
        self._identity_headers = response.identity_headers
        self._dpop_algs = dpop_algs
        # Query parameters that may carry a token (from_params): the upstream never sees them,
        # whichever source the token of this request came from.
        self._remove_params = remove_params
        self._encoded_denials: dict[tuple[Outcome, Reason], bytes] = {}
        self._allowed: Lru[tuple[Any, ...], bytes] = Lru(memo_entries)
        # The config's `responses` block and identity token; None (the default) leaves every answer
        # as it was: precomputed denials, allows without a token.
        self._denials = denials
        self._minter = minter
        self._shaped: Lru[ShapedDenial, bytes] = Lru(SHAPED_MEMO_ENTRIES)

    def encode(self, decision: Decision, request: HttpRequest = _NO_REQUEST) -> bytes:
        """The serialized CheckResponse for a decision (`request`: the original request, which the
        `responses` block's templates may quote)."""
        if decision.outcome is Outcome.ALLOW:
            identity = decision.identity
            if self._minter is not None and identity is not None:
                return self._allow_with_token(decision, identity, self._minter)
            key = (
                (identity.introspector, identity.user_id, decision.headers, decision.policy)
                if identity
                else ((), decision.headers, decision.policy)
            )
            encoded = self._allowed.get(key)
            if encoded is None:
                encoded = self._allow(decision).SerializeToString()
                self._allowed.put(key, encoded)
            return encoded
        if self._denials is not None:
            shaped = shaped_denial(self._denials, decision, request, self._dpop_algs)
            if shaped is not None:
                encoded = self._shaped.get(shaped)
                if encoded is None:
                    encoded = encode_shaped_denial(decision.outcome, decision.reason, shaped)
                    self._shaped.put(shaped, encoded)
                return encoded
        key2 = (decision.outcome, decision.reason)
        denial = self._encoded_denials.get(key2)
        if denial is None:
            denial = self._encoded_denials[key2] = encode_denial(*key2, dpop_algs=self._dpop_algs)
        return denial

    def _allow_with_token(self, decision: Decision, identity: Identity, minter: TokenMinter) -> bytes:
        """An allow carrying the identity token: the token (cached by the minter) is part of the key,
        so a re-minted token makes a new answer and a repeated one costs two lookups."""
        token = minted_token(minter, decision, identity)
        key = (identity.introspector, identity.user_id, decision.headers, decision.policy, token)
        encoded = self._allowed.get(key)
        if encoded is None:
            encoded = self._allow(decision, (minter.header, token)).SerializeToString()
            self._allowed.put(key, encoded)
        return encoded

    def _allow(self, decision: Decision, extra: tuple[str, ...] = ()) -> external_auth_pb2.CheckResponse:
        set_names = set(decision.headers[::2]) | set(extra[::2])
        metadata = Struct()
        identity = decision.identity
        if identity is not None:
            if identity.user_id is not None:
                metadata["user_id"] = identity.user_id
            metadata["introspector"] = identity.introspector
        if decision.policy is not None:
            metadata["policy"] = decision.policy
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(name, value) for name, value in header_pairs(decision.headers + extra)],
                headers_to_remove=[name for name in self._identity_headers if name not in set_names],
                query_parameters_to_remove=self._remove_params,
            ),
            dynamic_metadata=metadata,
        )


def encode_denial(outcome: Outcome, reason: Reason, dpop_algs: str = "") -> bytes:
    """The serialized CheckResponse of a deny (it depends on nothing else but the config's DPoP algorithms)."""
    denial = Denial.of(outcome, reason, dpop_algs)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=denial.grpc_code, message=reason.label),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=denial.http_status),  # type: ignore[arg-type]
            headers=[_header(name, value) for name, value in denial.headers],
            body=denial.body,
        ),
    ).SerializeToString()


def encode_shaped_denial(outcome: Outcome, reason: Reason, shaped: ShapedDenial) -> bytes:
    """The serialized CheckResponse of a deny answered as the `responses` block says (a 302 with
    its Location, or the outcome's status with the block's headers and body)."""
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=OUTCOMES[outcome][0], message=reason.label),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=shaped.status),  # type: ignore[arg-type]
            headers=[_header(name, value) for name, value in shaped.headers],
            body=shaped.body.decode("utf-8", "replace"),
        ),
    ).SerializeToString()


# HTTP mode: the header Envoy's http_service reads for headers to strip from the upstream request
# (the equivalent of OkHttpResponse.headers_to_remove); nginx and Traefik ignore it.
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"


# RFC 6585: what HTTP mode answers a request whose headers are over its limit (the body still
# says `invalid_request`); gRPC checks never carry that reason.
HEADERS_TOO_LARGE_STATUS = 431


class HttpAnswer(NamedTuple):
    """An answer in HTTP mode: status, headers and body, ready to send."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def http_denial(outcome: Outcome, reason: Reason, dpop_algs: str = "") -> HttpAnswer:
    """The HTTP-mode answer of a deny (it depends on nothing else but the config's DPoP algorithms)."""
    shaped = Denial.of(outcome, reason, dpop_algs)
    headers = (
        *shaped.headers,
        ("x-authz-error", shaped.error),
        ("x-authz-error-description", shaped.description),
    )
    status = HEADERS_TOO_LARGE_STATUS if reason is Reason.HEADERS_TOO_LARGE else shaped.http_status
    return HttpAnswer(status, headers, shaped.body.encode())


# A proxy that cannot pass a 302 from its auth request on (nginx's auth_request turns it into a
# 500) says so with this request header; a redirect is then answered 401 with the target in
# x-authz-location (and no www-authenticate, which nginx would copy onto its own 302).
REDIRECT_AS = "x-authz-redirect-as"
LOCATION_HEADER = "x-authz-location"
_REDIRECT_STATUS = 302


class HttpAnswers:
    """Turns Decisions into HTTP-mode answers for one response config (the same table as gRPC).

    Allow: 200, no body, the identity headers, and the identity headers it does not set listed in
    x-envoy-auth-headers-to-remove. Deny: the status, JSON body and www-authenticate of `Denial`,
    plus the body's two fields as x-authz-error and x-authz-error-description: nginx's
    auth_request drops a denial's body, and its shipped config rebuilds the body from these.
    """

    def __init__(
        self,
        response: ResponseConfig,
        memo_entries: int = ALLOW_MEMO_ENTRIES,
        *,
        denials: DenialShaper | None = None,
        minter: TokenMinter | None = None,
        dpop_algs: str = "",
    ) -> None:
        self._identity_headers = response.identity_headers
        self._dpop_algs = dpop_algs
        self._denials: dict[tuple[Outcome, Reason], HttpAnswer] = {}
        # An allow depends only on the identity headers: the answers of the most recent identities
        # are kept built, as ResponseBuilder keeps its encoded ones.
        self._allowed: Lru[tuple[str, ...], HttpAnswer] = Lru(memo_entries)
        self._shaper = denials  # the `responses` block; None: every denial precomputed
        self._minter = minter  # the identity token; None: allows carry none

    def answer(self, decision: Decision, request: HttpRequest = _NO_REQUEST) -> HttpAnswer:
        """The answer for a decision (`request`: the original request, for the `responses` block)."""
        if decision.outcome is Outcome.ALLOW:
            flat = decision.headers
            if self._minter is not None and decision.identity is not None:
                flat = (*flat, self._minter.header, minted_token(self._minter, decision, decision.identity))
            allowed = self._allowed.get(flat)
            if allowed is None:
                set_names = set(flat[::2])
                removed = ",".join(name for name in self._identity_headers if name not in set_names)
                pairs = tuple(header_pairs(flat))
                headers = (*pairs, (HEADERS_TO_REMOVE, removed)) if removed else pairs
                allowed = HttpAnswer(200, headers, b"")
                self._allowed.put(flat, allowed)
            return allowed
        key = (decision.outcome, decision.reason)
        denial = self._denials.get(key)
        if denial is None:
            denial = self._denials[key] = http_denial(*key, dpop_algs=self._dpop_algs)
        if self._shaper is not None:
            shaped = shaped_denial(self._shaper, decision, request, self._dpop_algs)
            if shaped is not None:
                return _http_shaped(shaped, denial.headers[-2:], request)
        return denial


def _http_shaped(shaped: ShapedDenial, errors: tuple[tuple[str, str], ...], request: HttpRequest) -> HttpAnswer:
    """The `responses` block's answer in HTTP mode, with x-authz-error and its description as every
    denial carries them; a redirect as nginx can pass it on when the proxy asked (REDIRECT_AS)."""
    if shaped.status == _REDIRECT_STATUS and request.headers.get(REDIRECT_AS) == "401":
        headers = [(LOCATION_HEADER if name == "location" else name, value) for name, value in shaped.headers]
        return HttpAnswer(401, (*headers, *errors), b"")
    return HttpAnswer(shaped.status, (*shaped.headers, *errors), shaped.body)
