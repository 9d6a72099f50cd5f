# ruff: noqa: E501  (the templates quote proxy config lines as the proxies want them)
"""`authz-service proxy-config nginx|envoy-http|envoy-grpc|traefik -c FILE`: a proxy config for
one service config.

A proxy in front of the service must know two things only the service config says: the identity
headers the service sets (`response.user_id_header`, `claims_header`, every `claim_headers`
entry), which the proxy removes from every client request and copies from an allow, and the query
parameters that may carry a token (`from_params`), which never reach the application. The shipped
files (envoy/envoy.yaml, envoy/envoy-http.yaml, deploy/nginx/nginx.conf,
deploy/traefik/dynamic.yaml) are this module's output for examples/demo.yaml, compared by
tests/unit/test_proxyconfig.py; everything else in them is the same for every config.

Each template is the file as shipped with `@NAME@` lines (or words) where a config-dependent block
goes; a block is a list of lines, indented like the marker. The two Envoy configs share one
template, `_ENVOY`, whose gRPC and HTTP parts are filled in first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from authz_service.config.model import Config
from authz_service.denials import Responses

KINDS: Final = ("nginx", "envoy-http", "envoy-grpc", "traefik")
# RFC 6750 2.3's parameter: always removed, also when no introspector reads it, so an upstream
# never sees a bearer token someone put in a link.
DEFAULT_TOKEN_PARAM: Final = "access_token"
_MARKER = re.compile(r"@([A-Z_]+)@")


@dataclass(frozen=True, slots=True)
class ProxyNeeds:
    """What a proxy config takes from the service config."""

    identity_headers: tuple[str, ...]  # lower case: removed from client requests, copied from an allow
    user_id_header: str
    token_params: tuple[str, ...]  # query parameters removed before the application
    # Headers of the `responses` block's deny answers (location, its templated headers): passed to
    # the client by a proxy that filters them.
    deny_headers: tuple[str, ...] = ()
    # sender_constraints.client_certificate_header: a client's own copy never reaches the check.
    client_certificate_header: str | None = None

    @classmethod
    def of(cls, config: Config) -> ProxyNeeds:
        """The identity headers and token parameters of a validated config."""
        params = [DEFAULT_TOKEN_PARAM, *(name for i in config.introspectors for name in i.from_params)]
        return cls(
            identity_headers=tuple(dict.fromkeys(h.lower() for h in config.response.identity_headers)),
            user_id_header=config.response.user_id_header.lower(),
            token_params=tuple(dict.fromkeys(params)),
            deny_headers=config.responses.header_names() if isinstance(config.responses, Responses) else (),
            client_certificate_header=config.sender_constraints.client_certificate_header,
        )


def render(kind: str, config: Config) -> str:
    """The proxy config of one kind (see KINDS) for a service config."""
    renderers: Mapping[str, Callable[[ProxyNeeds], str]] = {
        "nginx": nginx,
        "envoy-http": envoy_http,
        "envoy-grpc": envoy_grpc,
        "traefik": traefik,
    }
    try:
        renderer = renderers[kind]
    except KeyError:
        raise ValueError(f"unknown proxy {kind!r}: one of {', '.join(KINDS)}") from None
    return renderer(ProxyNeeds.of(config))


def _fill(template: str, blocks: Mapping[str, Sequence[str] | str], *, partial: bool = False) -> str:
    """The template with each `@NAME@` replaced: a line that is only the marker by the block's
    lines at its indentation, a marker inside a line by the (string) value. With `partial`, a
    marker that blocks does not name stays, for a later fill."""
    used: set[str] = set()
    out: list[str] = []
    for line in template.splitlines():
        stripped = line.strip()
        whole = _MARKER.fullmatch(stripped)
        if whole is not None and not isinstance(blocks.get(whole.group(1), ""), str):
            used.add(whole.group(1))
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + block_line if block_line else "" for block_line in blocks[whole.group(1)])
            continue

        def word(match: re.Match[str]) -> str:
            if partial and match.group(1) not in blocks:
                return match.group(0)
            used.add(match.group(1))
            value = blocks[match.group(1)]
            if not isinstance(value, str):
                raise ValueError(f"block @{match.group(1)}@ must stand on its own line")
            return value

        out.append(_MARKER.sub(word, line))
    unused = set(blocks) - used
    if unused:
        raise ValueError(f"template has no marker for {sorted(unused)}")
    return "\n".join(out) + "\n"


def _title(header: str) -> str:
    """x-user-id -> X-User-Id (how nginx and Traefik configs usually spell header names)."""
    return "-".join(part[:1].upper() + part[1:] for part in header.split("-"))


def _nginx_var(header: str) -> str:
    """The nginx variable part of a header name: x-user-id -> x_user_id."""
    return re.sub(r"[^a-z0-9]", "_", header.lower())


def _encoded_name(name: str) -> str:
    """A regex matching a parameter name as written or with any of its characters as %XX (the
    service percent-decodes names: `access%5Ftoken` is `access_token` to it). Used with `~*`:
    hex digits in either case, and a name in another case is removed too (harmless)."""
    return "".join(f"(?:{re.escape(char)}|%{ord(char):02x})" for char in name)


# -- nginx ----------------------------------------------------------------------------------------


def nginx(needs: ProxyNeeds) -> str:
    """deploy/nginx/nginx.conf for these needs."""
    maps: list[str] = []
    source = "$args"
    for index, param in enumerate(needs.token_params, start=1):
        last = index == len(needs.token_params)
        target = "$authz_upstream_args" if last else f"$authz_args_{index}"
        name = _encoded_name(param)
        maps += [
            f"# {param} (also %-encoded, in any case): the first parameter, or one after an `&`",
            f"map {source} {target} {{",
            f"    default {source};",
            f'    "~*^{name}=[^&]*(?:&(?<authz_rest_{index}>.*))?$" $authz_rest_{index};',
            f'    "~*^(?<authz_head_{index}>.*?)&{name}=[^&]*(?<authz_tail_{index}>(?:&.*)?)$" $authz_head_{index}$authz_tail_{index};',
            "}",
        ]
        source = target
    names = ", ".join(f"`{p}`" for p in needs.token_params)
    auth_set = [
        f"auth_request_set $authz_{_nginx_var(h)} $upstream_http_{_nginx_var(h)};" for h in needs.identity_headers
    ]
    upstream_set = [f"proxy_set_header {_title(h)} $authz_{_nginx_var(h)};" for h in needs.identity_headers]
    authz_clear = [f'proxy_set_header {_title(h)} "";' for h in needs.identity_headers]
    if needs.client_certificate_header is not None:
        # The client certificate a certificate-bound token is checked against: nginx's own (empty,
        # so not sent, without a verified TLS client), never a client's copy of the header.
        authz_clear.append(f"proxy_set_header {_title(needs.client_certificate_header)} $ssl_client_escaped_cert;")
    return _fill(
        _NGINX,
        {
            "IDENTITY_LIST": ", ".join(_title(h) for h in needs.identity_headers),
            "TOKEN_PARAMS": names,
            "TOKEN_MAPS": maps,
            "AUTH_REQUEST_SET": auth_set,
            "UPSTREAM_IDENTITY": upstream_set,
            "AUTHZ_IDENTITY": authz_clear,
            "USER_ID_VAR": f"$authz_{_nginx_var(needs.user_id_header)}",
        },
    )


_NGINX = r"""# nginx in front of an application, with authz-service (HTTP mode, `server.http_address`)
# deciding every request through `auth_request`. Generated by
#   authz-service proxy-config nginx -c examples/demo.yaml
# Regenerate it for your config: the identity headers and token parameters below come from it.
# Loopback addresses and fixed ports for local runs:
#   listener 127.0.0.1:8080, authz-service HTTP 127.0.0.1:9003, application 127.0.0.1:8000.
# What it guarantees, each tested with the real nginx (tests/e2e/test_proxies.py, test_seams.py):
#   - the request authz-service judges is the request the application gets: nginx's own
#     normalized path ($uri: dot segments resolved, `//` merged, %XX decoded), never the client's
#     raw one; a path whose decoding would change its meaning (an encoded / \ % ? #, a control
#     character, a backslash) is refused with 400, as authz-service refuses it;
#   - method, URI, host and scheme reach authz-service only as nginx sets them: a client's own
#     X-Forwarded-* and X-Original-* headers are overwritten;
#   - the application (and authz-service's policies) see @IDENTITY_LIST@
#     only as authz-service set them: a client's copies are removed;
#   - denials reach the client with authz-service's status, JSON body and one WWW-Authenticate;
#   - a browser that `responses.unauthenticated.redirect` sends to a login page gets that 302;
#   - the token parameters (@TOKEN_PARAMS@) never reach the application nor the access log;
#   - authz-service unreachable or broken: 503, never an allow;
#   - every file nginx writes is under its prefix, so it runs as any user (docs/proxies.md):
#       nginx -p /var/lib/authz-nginx/ -c /etc/authz-nginx/nginx.conf
worker_processes auto;
pid nginx.pid;
error_log stderr warn;

events {
    worker_connections 1024;
}

http {
    # Under the prefix (-p): no root needed, nothing written to /var/lib/nginx.
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    fastcgi_temp_path fastcgi_temp;
    uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;

    # The path without its query (a query may carry a token), and who was allowed.
    log_format authz escape=json
        '{"time": "$time_iso8601", "request_id": "$request_id", "client": "$remote_addr", '
        '"method": "$request_method", "path": "$uri", "status": "$status", '
        '"authz_status": "$authz_status", "user_id": "@USER_ID_VAR@", '
        '"duration_s": "$request_time", "upstream": "$upstream_addr"}';
    access_log access.log authz;

    # What the application gets as the query: without the token parameters, leaving no stray `&`.
    # (Two copies of one, or a disguised spelling, are refused by authz-service with 400 anyway.)
    @TOKEN_MAPS@

    upstream authz_service {
        server 127.0.0.1:9003;
        keepalive 32;
    }

    upstream application {
        server 127.0.0.1:8000;
        keepalive 32;
    }

    server {
        listen 127.0.0.1:8080;
        default_type application/json;
        # `//admin` is `/admin` in $uri, as in authz-service and Envoy (nginx's default, written out).
        merge_slashes on;

        # nginx decodes %XX in the path it routes and proxies. Where decoding changes the meaning (an
        # encoded / \ % ? #, a control character) or a backslash may be a separator to the
        # application, there are two readings of one path: refuse it, as authz-service does.
        if ($request_uri ~* "^[^?]*(%(2f|5c|25|3f|23|[01][0-9a-f]|7f)|\\\\)") {
            return 400 '{"error": "invalid_request", "error_description": "the request path can be read more than one way"}';
        }

        location / {
            # What authz-service judges: nginx's normalized path and the query as the client sent
            # it (token parameters included: they are credentials). Taken before the query loses
            # its tokens; the application gets the same path (proxy_pass below) and that query
            # without them.
            set $authz_request_uri "$uri$is_args$args";
            set $args $authz_upstream_args;
            auth_request /_authz;
            # What authz-service answered, for the application and for denials.
            auth_request_set $authz_status $upstream_status;
            @AUTH_REQUEST_SET@
            auth_request_set $authz_challenge $upstream_http_www_authenticate;
            auth_request_set $authz_error $upstream_http_x_authz_error;
            auth_request_set $authz_error_description $upstream_http_x_authz_error_description;
            # A login redirect (`responses.unauthenticated.redirect`): auth_request cannot pass a 302
            # on, so /_authz asks for it as a 401 naming the target (X-Authz-Redirect-As below).
            auth_request_set $authz_location $upstream_http_x_authz_location;

            # Replace (or, when empty, remove) whatever identity headers the client sent.
            @UPSTREAM_IDENTITY@
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-ID $request_id;
            proxy_http_version 1.1;
            proxy_set_header Connection "";

            # With a URI part (`/`), nginx sends its normalized path (re-escaped: `%20` stays `%20`)
            # and $args; without one it would send the client's raw request target, `..` and all.
            proxy_pass http://application/;

            error_page 401 = @authz_unauthorized;
            error_page 403 = @authz_forbidden;
            error_page 500 = @authz_failed;
        }

        location = /_authz {
            internal;
            proxy_pass http://authz_service/forward_auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            # Every header /forward_auth reads about the original request, from nginx's own
            # variables: a client's copy never gets through. Both URI headers carry the same value.
            proxy_set_header X-Forwarded-Uri $authz_request_uri;
            proxy_set_header X-Original-URI $authz_request_uri;
            proxy_set_header X-Forwarded-Method $request_method;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto $scheme;
            # authz-service reads the last entry, the one nginx appends: a client cannot forge it.
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Request-ID $request_id;
            # A redirect comes back as 401 + X-Authz-Location; @authz_unauthorized sends the 302.
            proxy_set_header X-Authz-Redirect-As 401;
            # Policies never see a client's identity headers either.
            @AUTHZ_IDENTITY@
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Above the service's own IdP timeout (2 s), so the service answers 503 itself.
            proxy_read_timeout 3s;
            proxy_connect_timeout 1s;
        }

        # auth_request has already copied authz-service's WWW-Authenticate onto a 401 (a redirect's
        # 401 carries none: the client gets a plain 302 to the login page).
        location @authz_unauthorized {
            if ($authz_location) {
                return 302 $authz_location;
            }
            return 401 '{"error": "$authz_error", "error_description": "$authz_error_description"}';
        }

        location @authz_forbidden {
            return 403 '{"error": "$authz_error", "error_description": "$authz_error_description"}';
        }

        # auth_request turns every answer but 2xx, 401 and 403 into a 500 (and copies no header):
        # give the client what authz-service said (400 or 503), and 503 when it could not be asked.
        location @authz_failed {
            if ($authz_status = 400) {
                add_header WWW-Authenticate $authz_challenge always;
                return 400 '{"error": "$authz_error", "error_description": "$authz_error_description"}';
            }
            if ($authz_error) {
                return 503 '{"error": "$authz_error", "error_description": "$authz_error_description"}';
            }
            return 503 '{"error": "temporarily_unavailable", "error_description": "authorization service unavailable"}';
        }
    }
}
"""


# -- Envoy ----------------------------------------------------------------------------------------


def _strip_identity_filter(needs: ProxyNeeds) -> list[str]:
    """A header_mutation filter, first in the chain, removing every identity header a client sent."""
    return [
        "# First: a client's own identity headers never reach the check nor the upstream (only",
        "# authz-service's answer sets them). From `response` in the service config.",
        "- name: strip_client_identity_headers",
        "  typed_config:",
        '    "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation',
        "    mutations:",
        "      request_mutations:",
        *(f"        - remove: {h}" for h in (*needs.identity_headers, *_client_certificate_header(needs))),
    ]


def _client_certificate_header(needs: ProxyNeeds) -> tuple[str, ...]:
    """The certificate header to strip from a client's request: none for x-forwarded-client-cert,
    which Envoy's connection manager itself sanitizes (forward_client_cert_details) before any filter."""
    header = needs.client_certificate_header
    return () if header is None or header == "x-forwarded-client-cert" else (header,)


def envoy_grpc(needs: ProxyNeeds) -> str:
    """envoy/envoy.yaml (ext_authz over gRPC) for these needs."""
    return _fill(_ENVOY_GRPC, {"STRIP_IDENTITY": _strip_identity_filter(needs)})


def envoy_http(needs: ProxyNeeds) -> str:
    """envoy/envoy-http.yaml (ext_authz http_service) for these needs."""
    return _fill(
        _ENVOY_HTTP,
        {
            "STRIP_IDENTITY": _strip_identity_filter(needs),
            "UPSTREAM_HEADERS": [f"- {{exact: {h}}}" for h in needs.identity_headers],
            "DENY_HEADERS": [f"- {{exact: {h}}}" for h in needs.deny_headers],
            "USER_ID_HEADER": needs.user_id_header,
            "TOKEN_PARAMS": [f"- remove: {p}" for p in needs.token_params],
        },
    )


# What both Envoy configs share: the file as shipped with a marker where gRPC and HTTP mode differ
# (filled by _ENVOY_GRPC and _ENVOY_HTTP) and where the service config does (filled by
# envoy_grpc and envoy_http).
_ENVOY = """\
@ABOUT@
admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: 9901}

static_resources:
  listeners:
    - name: ingress
      address:
        socket_address: {address: 127.0.0.1, port_value: 8080}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
                codec_type: AUTO
                @REMOTE_ADDRESS_WHY@
                use_remote_address: true
                # Policies match on the path Envoy routes and forwards: dot segments resolved, `//`
                # merged. An encoded / or \\ (%2F, %5C) has two readings (a separator or not): 400,
                # as authz-service answers it, rather than a guess (UNESCAPE_AND_REDIRECT would
                # change what applications that use %2F in names receive).
                normalize_path: true
                merge_slashes: true
                path_with_escaped_slashes_action: REJECT_REQUEST
                common_http_protocol_options:
                  @UNDERSCORES_WHY@
                  headers_with_underscores_action: REJECT_REQUEST
                access_log:
                  - name: envoy.access_loggers.stdout
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
                      log_format:
                        json_format:
                          time: "%START_TIME%"
                          request_id: "%REQ(X-REQUEST-ID)%"
                          # W3C trace context as it came (a client's, a mesh's): the decision log's
                          # trace_id and span_id are read from the same header.
                          traceparent: "%REQ(TRACEPARENT)%"
                          method: "%REQ(:METHOD)%"
                          # Without the query: a query may carry a token (from_params).
                          path: "%PATH(NQ)%"
                          authority: "%REQ(:AUTHORITY)%"
                          status: "%RESPONSE_CODE%"
                          flags: "%RESPONSE_FLAGS%"
                          details: "%RESPONSE_CODE_DETAILS%"
                          duration_ms: "%DURATION%"
                          upstream: "%UPSTREAM_HOST%"
                          client: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
                          @DECISION_LOG_FIELDS@
                route_config:
                  name: local
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        @ADMIN_ROUTE@
                        - match: {prefix: /}
                          route: {cluster: upstream}
                http_filters:
                  @STRIP_IDENTITY@
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      # Fail closed: an unreachable, slow or broken authz service never lets a request through.
                      failure_mode_allow: false
                      status_on_error: {code: ServiceUnavailable}
                      @AUTHZ_SERVICE@
                  @QUERY_TOKEN_FILTER@
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router

  clusters:
    - name: @AUTHZ_CLUSTER@
      type: STRICT_DNS
      dns_lookup_family: V4_ONLY
      connect_timeout: 1s
      @AUTHZ_CONNECTIONS@
      common_lb_config:
        healthy_panic_threshold: {value: 0}
      health_checks:
        - timeout: 1s
          interval: 1s
          @NO_TRAFFIC_WHY@
          no_traffic_interval: 1s
          unhealthy_threshold: 2
          healthy_threshold: 1
          @HEALTH_CHECK@
      load_assignment:
        cluster_name: @AUTHZ_CLUSTER@
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: 127.0.0.1, port_value: @AUTHZ_PORT@}

    - name: upstream
      type: STRICT_DNS
      dns_lookup_family: V4_ONLY
      connect_timeout: 1s
      load_assignment:
        cluster_name: upstream
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: 127.0.0.1, port_value: 8000}
"""

_ENVOY_GRPC = _fill(
    _ENVOY,
    {
        "ABOUT": """\
# Front proxy: every request is checked by authz-service (ext_authz over gRPC) before it
# reaches the upstream. Generated by `authz-service proxy-config envoy-grpc -c examples/demo.yaml`:
# regenerate it for your config (the identity headers below come from it).
# Loopback addresses and fixed ports for local runs:
#   listener 127.0.0.1:8080, admin 127.0.0.1:9901, authz 127.0.0.1:9001, upstream 127.0.0.1:8000.
# See envoy/README.md for what each safety setting is for, docs/proxies.md for the path rules.
# For throughput prefer envoy/envoy-http.yaml (authz-service's HTTP mode): the same decisions, and
# through Envoy about twice the checks per second of this gRPC hop (docs/performance.md). Use this
# file when you need per-route context_extensions (the HTTP service does not carry them) or the
# allowing policy in dynamic_metadata.""".splitlines(),
        "REMOTE_ADDRESS_WHY": """\
# The edge: Envoy makes its own x-request-id for every external request (a client's
# is never kept, so it can neither forge the decision log's join key nor plant a
# token in it) and appends the client's address to X-Forwarded-For.""".splitlines(),
        "UNDERSCORES_WHY": ["# `x_user_id` must not be able to stand in for `x-user-id` anywhere behind us."],
        "DECISION_LOG_FIELDS": [
            'user_id: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:user_id)%"',
            'introspector: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:introspector)%"',
            'policy: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:policy)%"',
        ],
        "ADMIN_ROUTE": """\
- match: {path_separated_prefix: /admin}   # /admin and /admin/..., not /administrator
  route: {cluster: upstream}
  # Reaches the policies as `context_extensions` in the request context.
  typed_per_filter_config:
    envoy.filters.http.ext_authz:
      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
      check_settings:
        context_extensions: {route: admin}""".splitlines(),
        "AUTHZ_SERVICE": """\
# The client's TLS certificate (on a TLS listener), for certificate-bound tokens (RFC 8705).
include_peer_certificate: true
grpc_service:
  envoy_grpc: {cluster_name: authz}
  # Above the service's own IdP timeout (2 s), so the service answers 503 itself.
  timeout: 3s""".splitlines(),
        "QUERY_TOKEN_FILTER": [],
        "AUTHZ_CLUSTER": "authz",
        "AUTHZ_CONNECTIONS": """\
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: {http2_protocol_options: {}}
# Never send checks to a host that failed its health checks, even when all of them did
# (the default 50% panic threshold would route to unhealthy hosts); no host is a 503.""".splitlines(),
        "NO_TRAFFIC_WHY": ["# Also while no request has used the cluster yet (the default would be 60 s)."],
        "HEALTH_CHECK": ["grpc_health_check: {service_name: envoy.service.auth.v3.Authorization}"],
        "AUTHZ_PORT": "9001",
    },
    partial=True,
)

_ENVOY_HTTP = _fill(
    _ENVOY,
    {
        "ABOUT": """\
# Front proxy using authz-service in HTTP mode (ext_authz `http_service`, `server.http_address`):
# every request is checked with a plain HTTP/1.1 request to /ext_authz/<original path> before it
# reaches the upstream. Generated by `authz-service proxy-config envoy-http -c examples/demo.yaml`:
# regenerate it for your config (the identity headers and token parameters below come from it).
# Loopback addresses and fixed ports for local runs:
#   listener 127.0.0.1:8080, admin 127.0.0.1:9901, authz HTTP 127.0.0.1:9003, upstream 127.0.0.1:8000.
# The same decisions as envoy.yaml (gRPC), at a fraction of the CPU per check: see
# docs/performance.md. envoy/README.md explains each safety setting, docs/proxies.md the path rules.""".splitlines(),
        "REMOTE_ADDRESS_WHY": """\
# Append the client's address to X-Forwarded-For: the service reads the last entry as
# `remote-addr`, so an X-Forwarded-For the client sends itself is never believed.""".splitlines(),
        "UNDERSCORES_WHY": [],
        "DECISION_LOG_FIELDS": ['user_id: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:@USER_ID_HEADER@)%"'],
        "ADMIN_ROUTE": [],
        "AUTHZ_SERVICE": """\
# Every request header goes to the service (policies may read any of them), as
# in gRPC mode; list fewer to save bytes per check.
allowed_headers:
  patterns: [{safe_regex: {regex: ".*"}}]
http_service:
  server_uri:
    uri: http://authz-http
    cluster: authz_http
    # Above the service's own IdP timeout (2 s), so the service answers 503 itself.
    timeout: 3s
  path_prefix: /ext_authz
  authorization_response:
    # Set on the upstream request from an allow; the service lists the identity
    # headers it did not set in x-envoy-auth-headers-to-remove (and the first
    # filter already removed a client's copies).
    allowed_upstream_headers:
      patterns:
        @UPSTREAM_HEADERS@
    # What a denied client sees besides the status and JSON body.
    allowed_client_headers:
      patterns:
        - {exact: www-authenticate}
        - {exact: content-type}
        @DENY_HEADERS@
    dynamic_metadata_from_headers:
      patterns: [{exact: @USER_ID_HEADER@}]""".splitlines(),
        "QUERY_TOKEN_FILTER": """\
# A token may come in the query (from_params): the upstream never sees it.
# Checked first (the filter above saw it), removed before routing.
- name: strip_query_tokens
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
    mutations:
      query_parameter_mutations:
        @TOKEN_PARAMS@""".splitlines(),
        "AUTHZ_CLUSTER": "authz_http",
        "AUTHZ_CONNECTIONS": ["# Keep-alive HTTP/1.1 connections; Envoy opens more as checks run in parallel."],
        "NO_TRAFFIC_WHY": [],
        "HEALTH_CHECK": [
            "# 503 while draining after SIGTERM: Envoy moves checks away before the listener closes.",
            "http_health_check: {path: /readyz}",
        ],
        "AUTHZ_PORT": "9003",
    },
    partial=True,
)


# -- Traefik --------------------------------------------------------------------------------------


def traefik(needs: ProxyNeeds) -> str:
    """deploy/traefik/dynamic.yaml for these needs."""
    return _fill(
        _TRAEFIK,
        {
            "STRIP_HEADERS": [
                f'{_title(h)}: ""' for h in (*needs.identity_headers, *filter(None, [needs.client_certificate_header]))
            ],
            "RESPONSE_HEADERS": [f"- {_title(h)}" for h in needs.identity_headers],
            "TOKEN_PARAMS": ", ".join(needs.token_params),
        },
    )


_TRAEFIK = """\
# Traefik (v2 and v3) in front of an application, with authz-service (HTTP mode,
# `server.http_address`) deciding every request through the forwardAuth middleware. Generated by
#   authz-service proxy-config traefik -c examples/demo.yaml
# Regenerate it for your config: the identity headers below come from it.
# Load it with the file provider:  traefik --providers.file.filename=deploy/traefik/dynamic.yaml \\
#   --entryPoints.web.address=:8080
#
# What Traefik does with it (from Traefik's documentation; Traefik itself is not run by this
# project's tests, see docs/proxies.md):
#   - `authz-strip-client-headers` first removes (an empty value removes) the identity headers and
#     the X-Original-URI / X-Original-Method a client sent: neither a policy nor the application
#     ever sees a client's copy, and authz-service never reads an original-request header Traefik
#     did not write;
#   - forwardAuth asks GET http://127.0.0.1:9003/forward_auth with the client's headers plus
#     X-Forwarded-Method, X-Forwarded-Proto, X-Forwarded-Host, X-Forwarded-Uri and X-Forwarded-For,
#     which with trustForwardHeader: false it sets itself (a client cannot choose them, nor its
#     address);
#   - on 2xx it copies each header in authResponseHeaders from the answer onto the request,
#     replacing any the client sent (and removing it when the answer has none);
#   - otherwise the client gets authz-service's answer as it is: status, JSON body, WWW-Authenticate.
# Traefik has no middleware that removes a query parameter: do not let tokens travel in the query
# (@TOKEN_PARAMS@) behind Traefik, or add a plugin that strips them.
http:
  middlewares:
    authz-strip-client-headers:
      headers:
        customRequestHeaders:
          X-Original-Uri: ""
          X-Original-Method: ""
          @STRIP_HEADERS@
    authz-service:
      forwardAuth:
        address: http://127.0.0.1:9003/forward_auth
        trustForwardHeader: false
        authResponseHeaders:
          @RESPONSE_HEADERS@

  routers:
    application:
      entryPoints: [web]
      rule: PathPrefix(`/`)
      middlewares: [authz-strip-client-headers, authz-service]
      service: application

  services:
    application:
      loadBalancer:
        servers:
          - url: http://127.0.0.1:8000
"""
