"""Property-based fuzzing of the pure core: no network, no server, a few hundred examples per target.

Each target states the one contract a hostile input must never break: the token parser and the
credential finder raise only their documented errors, matcho compiles or says PatternError and its
matchers never raise, identity headers never carry a control character, and the Authorizer turns any
CheckRequest into a Decision (never an internal error).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from authz_service._pb.envoy.config.core.v3 import address_pb2, base_pb2
from authz_service._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_service.config.model import ResponseConfig
from authz_service.decide import Authorizer
from authz_service.engine import build_engine
from authz_service.envoy import MAX_HEADER_VALUE, IdentityHeaders, ResponseBuilder, to_http_request
from authz_service.errors import MalformedCredentials, TokenRejected
from authz_service.model import Decision, HttpRequest, Identity, Outcome, Reason, header_pairs
from authz_service.policy.matcho import PatternError, compile_pattern
from authz_service.registries import parse_config
from authz_service.tokens.cache import CacheFactory
from authz_service.tokens.jws import MAX_TOKEN_BYTES, parse_jwt
from authz_service.tokens.sources import CredentialFinder
from authz_service.upstream import UpstreamClient

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ISS = "https://fuzz.example"
SECRET = "fuzz-suite-hmac-secret-0123456789abcdef"

# Text a protobuf string field can carry (no lone surrogates), biased towards the bytes that hurt.
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)
nasty_text = st.one_of(
    text,
    st.sampled_from(["", " ", "\r\n", "\x00", "\x7f", "..", "=", ";", ",", "Bearer", "eyJ", "é", "\u2028", "🙂"]),
    st.lists(
        st.sampled_from(["\r", "\n", "\x00", "\x7f", "\t", ";", ",", "=", " ", ".", "a", "é", "\u0085"]), max_size=20
    ).map("".join),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), nasty_text)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(nasty_text, inner, max_size=4)),
    max_leaves=10,
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hs256(header: str, payload: str, secret: str = SECRET) -> str:
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    return f"{signing_input}.{b64(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())}"


# --------------------------------------------------------------------------- (a) parse_jwt


def _parse_only_rejects(token: str) -> None:
    try:
        parsed = parse_jwt(token)
    except TokenRejected:
        return
    assert len(token) <= MAX_TOKEN_BYTES
    assert isinstance(parsed.header, dict)
    assert isinstance(parsed.claims, dict)
    assert isinstance(parsed.alg, str)
    assert parsed.alg


@FUZZ
@given(
    st.one_of(
        text,
        st.text(max_size=300),
        st.binary(max_size=300).map(lambda raw: raw.decode("latin-1")),
        st.binary(max_size=300).map(lambda raw: raw.decode("utf-8", "replace")),
        st.lists(st.binary(max_size=80).map(b64), min_size=0, max_size=6).map(".".join),
    )
)
@example("..")
@example("eyJ.eyJ.")
@example("e.e.e")
def test_parse_jwt_on_arbitrary_text_raises_only_token_rejected(token: str) -> None:
    _parse_only_rejects(token)


def _segment(value: Any, raw: str | None, junk: bytes | None, mode: str) -> str:
    if mode == "junk" and junk is not None:
        return b64(junk)
    source = raw if raw is not None else json.dumps(value)  # json.dumps happily writes NaN and Infinity
    encoded = source.encode("utf-16" if mode == "utf16" else "utf-8", "surrogatepass")
    segment = b64(encoded)
    if mode == "padded":
        return segment + "=="
    if mode == "std-alphabet":
        return base64.b64encode(encoded).decode("ascii")
    return segment


header_value = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {"alg": st.one_of(st.sampled_from(["HS256", "RS256", "none", "", "ES256"]), json_value)},
        optional={"kid": json_value, "crit": json_value, "jku": json_value, "typ": json_value},
    ),
)
raw_json = st.one_of(
    st.none(),
    st.sampled_from(
        [
            '{"alg":"HS256","alg":"none"}',
            '{"alg":"HS256"} x',
            "[" * 3000,
            '{"a":' * 3000,
            '{"alg":"HS256","kid":"\\ud800"}',
            '{"alg": NaN}',
            '{"exp": Infinity}',
            "\ufeff{}",
            '{"alg":"HS256","exp":' + "9" * 5000 + "}",
        ]
    ),
)
segment_mode = st.sampled_from(["json", "json", "json", "junk", "utf16", "padded", "std-alphabet"])


@pytest.mark.slow  # Hypothesis: 1-2 s of examples
@FUZZ
@given(
    header=header_value,
    header_raw=raw_json,
    header_junk=st.one_of(st.none(), st.binary(max_size=60)),
    header_mode=segment_mode,
    payload=json_value,
    payload_raw=raw_json,
    payload_junk=st.one_of(st.none(), st.binary(max_size=60)),
    payload_mode=segment_mode,
    signature=st.one_of(st.binary(max_size=80).map(b64), nasty_text),
    extra_dots=st.integers(0, 2),
)
def test_parse_jwt_on_near_jwts_raises_only_token_rejected(
    header: Any,
    header_raw: str | None,
    header_junk: bytes | None,
    header_mode: str,
    payload: Any,
    payload_raw: str | None,
    payload_junk: bytes | None,
    payload_mode: str,
    signature: str,
    extra_dots: int,
) -> None:
    token = (
        ".".join(
            [
                _segment(header, header_raw, header_junk, header_mode),
                _segment(payload, payload_raw, payload_junk, payload_mode),
                signature,
            ]
        )
        + "." * extra_dots
    )
    _parse_only_rejects(token)


@FUZZ
@given(
    prefix=st.sampled_from(["", "eyJhbGciOiJIUzI1NiJ9.", "eyJ", "Bearer "]),
    size=st.integers(MAX_TOKEN_BYTES + 1, 40000),
    fill=st.sampled_from(["A", ".", "é", "\x00", "eyJ.e30."]),
)
def test_parse_jwt_never_returns_for_oversized_strings(prefix: str, size: int, fill: str) -> None:
    token = (prefix + fill * size)[: max(size, MAX_TOKEN_BYTES + 1)]
    assert len(token) > MAX_TOKEN_BYTES
    with pytest.raises(TokenRejected) as rejected:
        parse_jwt(token)
    assert rejected.value.reason is Reason.TOO_LARGE


@pytest.mark.parametrize("where", ["header", "payload", "signature"])
def test_parse_jwt_segments_are_strictly_base64url(where: str) -> None:
    """`$` in a segment regex also matches before a trailing newline; such a segment must still be refused."""
    header, payload, signature = hs256('{"alg":"HS256"}', json.dumps({"iss": ISS, "exp": 4102444800})).split(".")
    parse_jwt(f"{header}.{payload}.{signature}")  # the control: the clean token parses
    parts = {"header": header, "payload": payload, "signature": signature}
    parts[where] += "\n"
    with pytest.raises(TokenRejected):
        parse_jwt(".".join(parts.values()))


# --------------------------------------------------------------------------- (b) CredentialFinder

header_name = st.one_of(st.sampled_from(["authorization", "cookie", "x-user-id", ":path", "Authorization"]), text)
cookie_header = st.lists(
    st.tuples(st.one_of(st.sampled_from(["ASPXAUTH", "sid", "", " ", "ASPXAUTH "]), text), nasty_text),
    max_size=8,
).map(lambda pairs: ";".join(f"{name}={value}" if i % 3 else f"{name}{value}" for i, (name, value) in enumerate(pairs)))
authorization_header = st.one_of(
    nasty_text,
    st.tuples(
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Bearer ", ""]),
        st.sampled_from([" ", "  ", "\t", ""]),
        nasty_text,
    ).map("".join),
)


# Two introspectors reading their own cookies: ASPXAUTH for an opaque one, sid for a JWT one.
COOKIE_FINDER = CredentialFinder(
    parse_config(
        yaml.safe_dump(
            {
                "introspectors": [
                    {
                        "id": "opaque",
                        "type": "opaque",
                        "cookie": "ASPXAUTH",
                        "introspection_endpoint": {"url": "https://idp.example/introspect"},
                    },
                    {"id": "hs", "type": "jwt", "cookie": "sid", "jwt": {"iss": ISS, "secret": SECRET}},
                ]
            }
        )
    ).introspectors
)


@FUZZ
@given(
    headers=st.dictionaries(header_name, nasty_text, max_size=6),
    authorization=st.one_of(st.none(), authorization_header),
    cookie=st.one_of(st.none(), cookie_header),
)
def test_credential_finder_raises_only_documented_errors(
    headers: dict[str, str], authorization: str | None, cookie: str | None
) -> None:
    if authorization is not None:
        headers["authorization"] = authorization
    if cookie is not None:
        headers["cookie"] = cookie
    try:
        credential = COOKIE_FINDER.find(HttpRequest(headers=headers))
    except (TokenRejected, MalformedCredentials):
        return
    if credential is not None:
        assert credential.token
        assert len(credential.token) <= MAX_TOKEN_BYTES
        assert not any(ch.isspace() for ch in credential.token)
        assert credential.introspector in (None, "opaque", "hs")


# --------------------------------------------------------------------------- (c) matcho

operator_key = st.sampled_from(
    ["$enum", "$one-of", "$contains", "$every", "$not", "$present-all", "$length", "$nope", "$"]
)
pattern_string = st.one_of(
    nasty_text,
    st.sampled_from(
        [
            "present?",
            "nil?",
            "not-blank?",
            ".jwt.sub",
            ".",
            "..",
            ".a..b",
            ".0",
            "#",
            "#(",
            "#[",
            "#[[:alpha:]]",
            "#^/Patient/.*",
            "#(?i)ADMIN",
            "#\\",
            "#a{2,1}",
            "#(?P<x>a)(?P=x)",
        ]
    ),
    text.map(lambda t: "#" + t),
    text.map(lambda t: "." + t),
)
pattern = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), pattern_string),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(nasty_text, operator_key), inner, max_size=4),
        st.dictionaries(operator_key, st.one_of(inner, st.lists(inner, max_size=3)), min_size=1, max_size=2),
    ),
    max_leaves=20,
)


@pytest.mark.slow  # Hypothesis: 1-2 s of examples
@FUZZ
@given(
    pattern=pattern,
    values=st.lists(json_value, min_size=1, max_size=4),
    context=st.dictionaries(nasty_text, json_value, max_size=5),
)
def test_matcho_compiles_or_says_pattern_error_and_never_raises_on_values(
    pattern: Any, values: list[Any], context: dict[str, Any]
) -> None:
    try:
        matcher = compile_pattern(pattern)
    except PatternError:
        return
    for value in [*values, context]:
        assert matcher(value, context) in (True, False)


def _deep(depth: int, leaf: Any, wrap: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = wrap(value)
    return value


HOSTILE_PATTERNS: dict[str, Any] = {
    "regex nested 5000 groups deep": "#" + "(" * 5000 + ")" * 5000,
    "regex repeat count overflows": "#a{99999999999}",
    "regex repeat count overflows in a map": {"uri": "#^/x{4294967296}"},
    "list pattern 3000 deep": _deep(3000, "x", lambda v: [v]),
    "map pattern 3000 deep": _deep(3000, "x", lambda v: {"a": v}),
    "$not 3000 deep": _deep(3000, "x", lambda v: {"$not": v}),
}


@pytest.mark.parametrize("name", list(HOSTILE_PATTERNS))
def test_matcho_hostile_patterns_are_pattern_errors(name: str) -> None:
    """A config can hold any of these; each is a clean config problem naming where it is (never
    another exception, and never a pattern that compiles and then fails or stalls on a request)."""
    with pytest.raises(PatternError) as caught:
        compile_pattern(HOSTILE_PATTERNS[name])
    message = str(caught.value)
    assert message.startswith("matcho"), message
    assert len(message) < 400, "the problem quotes the pattern, but not all of it"


# --------------------------------------------------------------------------- (d) identity headers

CLAIM_HEADERS = (("email", "x-user-email"), ("data", "x-data"), ("n", "x-n"), ("sub", "x-sub"))
claims_strategy = st.dictionaries(
    st.one_of(st.sampled_from(["email", "data", "n", "sub", "box_user", "exp"]), nasty_text),
    json_value,
    max_size=8,
)


long_text = st.builds(
    lambda unit, count: unit * count, st.sampled_from(["u", "é", "\x7f", "🙂"]), st.integers(2000, 9000)
)


@pytest.mark.slow  # Hypothesis: 1-2 s of examples
@FUZZ
@given(
    user_id=st.one_of(st.none(), nasty_text, long_text), claims=claims_strategy, kind=st.sampled_from(["jwt", "opaque"])
)
def test_identity_headers_never_carry_control_characters(
    user_id: str | None, claims: dict[str, Any], kind: str
) -> None:
    builder = IdentityHeaders(ResponseConfig(claim_headers=CLAIM_HEADERS))
    rejected: Reason | None = None
    try:
        headers = builder.build(Identity(user_id, claims, "fuzz", kind, None))
    except TokenRejected as err:
        rejected = err.reason
    if rejected is not None:
        assert rejected is Reason.BAD_CLAIMS
        return
    names = list(headers[::2])
    assert len(names) == len(set(names))
    for name, value in header_pairs(headers):
        assert isinstance(value, str)
        assert not CONTROL.search(value), (name, value)
        assert len(value) <= MAX_HEADER_VALUE, name
    if user_id is not None:
        assert ("x-user-id", user_id) in header_pairs(headers)


# --------------------------------------------------------------------------- (e) the Authorizer


def _authorizer() -> tuple[Authorizer, ResponseBuilder]:
    config = parse_config(
        yaml.safe_dump(
            {
                "server": {"grpc_address": "127.0.0.1:0", "admin_address": None},
                "cache": {"max_entries": 50},
                "response": {"claim_headers": {"email": "x-user-email", "tenant": "x-tenant"}},
                "introspectors": [
                    {"id": "hs", "type": "jwt", "jwt": {"iss": ISS, "secret": SECRET}},
                    {
                        "id": "cookie-hs",
                        "type": "jwt",
                        "cookie": "sid",
                        "jwt": {"iss": ISS + "/cookie", "secret": SECRET},
                    },
                ],
                "policies": [
                    {
                        "id": "public",
                        "engine": "matcho",
                        "matcho": {"uri": "#^/public/", "request-method": {"$enum": ["get"]}},
                    },
                    {
                        "id": "signed-in",
                        "engine": "matcho",
                        "matcho": {"jwt": {"sub": "not-blank?"}, "headers": {"x-tenant": ".jwt.tenant"}},
                    },
                    {
                        "id": "schema",
                        "engine": "json-schema",
                        "schema": {
                            "required": ["jwt"],
                            "properties": {
                                "jwt": {"required": ["role"], "properties": {"role": {"constant": "admin"}}}
                            },
                        },
                    },
                ],
                "users": [{"id": "u1", "roles": [{"value": "admin"}]}],
            }
        )
    )
    engine = build_engine(config, UpstreamClient(), CacheFactory(config.cache))
    return engine.authorizer, engine.responses


AUTHORIZER, RESPONSES = _authorizer()


def _signed_token(claims: dict[str, Any], header: Any) -> str:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISS, "sub": "u1", "exp": now + 300}
    return hs256(json.dumps(header), json.dumps({**base, **claims}))


token_strategy = st.one_of(
    nasty_text,
    st.builds(_signed_token, claims_strategy, st.one_of(st.just({"alg": "HS256"}), header_value)),
    st.builds(_signed_token, claims_strategy, st.just({"alg": "HS256"})),
)
raw_entry = st.tuples(header_name, st.one_of(st.binary(max_size=40), nasty_text.map(str.encode)))


@st.composite
def check_requests(draw: st.DrawFn) -> pb.CheckRequest:
    headers = draw(st.dictionaries(header_name, nasty_text, max_size=6))
    token = draw(st.one_of(st.none(), token_strategy))
    if token is not None:
        scheme = draw(st.sampled_from(["Bearer ", "bearer ", "Bearer  ", "Basic ", ""]))
        headers["authorization"] = scheme + token + draw(st.sampled_from(["", "", ",Bearer x", " "]))
    if draw(st.booleans()):
        headers["cookie"] = draw(cookie_header) + (f"; sid={token}" if token and draw(st.booleans()) else "")
    path = draw(
        st.one_of(
            nasty_text,
            st.sampled_from(["/", "/public/x", "/public/x?a=1&a=2&b", "/api?%zz=%ff"]),
            text.map(lambda t: "/public/" + t),
        )
    )
    http = ac.AttributeContext.HttpRequest(
        id=draw(nasty_text),
        method=draw(st.one_of(st.sampled_from(["GET", "get", "POST", ""]), nasty_text)),
        path=path,
        host=draw(nasty_text),
        scheme=draw(nasty_text),
        headers=headers,
    )
    if draw(st.booleans()) and not headers:
        # Envoy's encode_raw_headers form: every value separately, as raw bytes.
        entries = draw(st.lists(raw_entry, max_size=6))
        if token is not None:
            entries.append(("authorization", f"Bearer {token}".encode()))
        values = [base_pb2.HeaderValue(key=k, raw_value=v) for k, v in entries]
        http.header_map.CopyFrom(base_pb2.HeaderMap(headers=values))
    peer = address_pb2.SocketAddress(address=draw(nasty_text), port_value=draw(st.integers(0, 65535)))
    return pb.CheckRequest(
        attributes=ac.AttributeContext(
            source=ac.AttributeContext.Peer(address=address_pb2.Address(socket_address=peer)),
            request=ac.AttributeContext.Request(http=http),
            context_extensions=draw(st.dictionaries(nasty_text, nasty_text, max_size=4)),
        )
    )


@pytest.mark.slow  # Hypothesis: 1-2 s of examples
@FUZZ
@given(request=check_requests())
def test_authorizer_turns_any_check_request_into_a_decision(request: pb.CheckRequest) -> None:
    # Round-trip through the wire format, as the gRPC server would receive it.
    request = pb.CheckRequest.FromString(request.SerializeToString())
    decision = asyncio.run(AUTHORIZER.check(to_http_request(request)))
    assert isinstance(decision, Decision)
    assert decision.reason is not Reason.INTERNAL_ERROR, "an input the Authorizer did not foresee"
    response = pb.CheckResponse.FromString(RESPONSES.encode(decision))  # what the server sends
    assert (response.status.code == 0) == (decision.outcome is Outcome.ALLOW)
    for option in [*response.ok_response.headers, *response.denied_response.headers]:
        assert not CONTROL.search(option.header.value), option
