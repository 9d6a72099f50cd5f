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
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

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
        dpop_algs: str = "",
    ) -> None:
        self._identity_headers = response.identity_headers
        self._dpop_algs = dpop_algs
        # Query parameters that may carry a token (from_params): the upstream never sees them,
        # whichever source the token of this request came from.
        self._remove_params = remove_params
        self._encoded_denials: dict[tuple[Outcome, Reason], bytes] = {}
        self._allowed: Lru[tuple[Any, ...], bytes] = Lru(memo_entries)

    def encode(self, decision: Decision) -> bytes:
        """The serialized CheckResponse for a decision."""
        if decision.outcome is Outcome.ALLOW:
            identity = decision.identity
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
        key2 = (decision.outcome, decision.reason)
        denial = self._encoded_denials.get(key2)
        if denial is None:
            denial = self._encoded_denials[key2] = encode_denial(*key2, dpop_algs=self._dpop_algs)
        return denial

    def _allow(self, decision: Decision) -> external_auth_pb2.CheckResponse:
        set_names = set(decision.headers[::2])
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
                headers=[_header(name, value) for name, value in header_pairs(decision.headers)],
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


class HttpAnswers:
    """Turns Decisions into HTTP-mode answers for one response config (the same table as gRPC).

    Allow: 200, no body, the identity headers, and the identity headers it does not set listed in
    x-envoy-auth-headers-to-remove. Deny: the status, JSON body and www-authenticate of `Denial`,
    plus the body's two fields as x-authz-error and x-authz-error-description: nginx's
    auth_request drops a denial's body, and its shipped config rebuilds the body from these.
    """

    def __init__(self, response: ResponseConfig, memo_entries: int = ALLOW_MEMO_ENTRIES, dpop_algs: str = "") -> None:
        self._identity_headers = response.identity_headers
        self._dpop_algs = dpop_algs
        self._denials: dict[tuple[Outcome, Reason], HttpAnswer] = {}
        # An allow depends only on the identity headers: the answers of the most recent identities
        # are kept built, as ResponseBuilder keeps its encoded ones.
        self._allowed: Lru[tuple[str, ...], HttpAnswer] = Lru(memo_entries)

    def answer(self, decision: Decision) -> HttpAnswer:
        """The answer for a decision."""
        if decision.outcome is Outcome.ALLOW:
            flat = decision.headers
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
        return denial
