"""The gRPC shell: ext_authz Check, grpc.health.v1 and server reflection on one grpc.aio server.

Check only hands bytes over: `envoy.decode_check` reads them, the `CheckRunner` decides, counts
and logs, `ResponseBuilder.encode` gives the answer's bytes. Everything that decides lives in
decide.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2
from authz_service.config.model import TlsConfig
from authz_service.engine import Engine
from authz_service.envoy import decode_check, encode_denial
from authz_service.errors import bind_failure, bind_problem
from authz_service.model import Decision, HttpRequest, Outcome, Reason
from authz_service.server.runner import INTERNAL_ERROR, CheckMetrics, CheckRunner, DecisionLog

AUTHORIZATION_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
HEALTH_SERVICES = ("", AUTHORIZATION_SERVICE)
PROTOCOL = "grpc"
_DEADLINE_EXCEEDED = Decision(Outcome.UNAVAILABLE, Reason.DEADLINE_EXCEEDED)


def _encode(engine: Engine, decision: Decision, request: HttpRequest) -> bytes:
    return engine.responses.encode(decision, request)


class AuthorizationServicer:
    """envoy.service.auth.v3.Authorization: bytes in, bytes out, never raises."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        metrics: CheckMetrics,
        *,
        log_decision: DecisionLog,
        log_internal_error: Callable[[BaseException], None],
    ) -> None:
        # No bound of its own: grpc's maximum_concurrent_rpcs sheds past max_concurrent_checks.
        self.runner = CheckRunner(
            PROTOCOL,
            engine,
            metrics,
            log_decision,
            log_internal_error,
            answer=_encode,
            internal_error=encode_denial(INTERNAL_ERROR.outcome, INTERNAL_ERROR.reason),
        )

    async def Check(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """The answer, already serialized (see ResponseBuilder.encode).

        The request arrives as bytes and is decoded by `envoy.decode_check`, not by grpc: a
        CheckRequest that does not decode (invalid UTF-8 in a string field, a truncated message)
        is then a 400 answer with a logged reason, where grpc's own deserializer would have ended
        the call UNKNOWN.
        """
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # The caller has given up (Envoy answered 503 at its timeout): under overload,
            # computing it would only take time from checks someone still waits for.
            return self.runner.refuse(_DEADLINE_EXCEEDED)
        return await self.runner.check(decode_check, raw)


MIN_PENDING = 1024


def pending_bound(max_concurrent_checks: int | None) -> int:
    """The bound of grpc core's queue of calls not yet taken by Python: max_concurrent_checks, and
    at least MIN_PENDING (grpc's own default is 1,000)."""
    return max(MIN_PENDING, max_concurrent_checks or 0)


def create_server(
    servicer: AuthorizationServicer,
    health_servicer: health.aio.HealthServicer,
    *,
    reuse_port: bool,
    max_concurrent_checks: int | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with Check, health and reflection registered (not yet bound)."""
    pending = pending_bound(max_concurrent_checks)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            # The queue in grpc core ahead of Python (calls the busy loop has not taken yet). Past
            # it grpc cancels new calls at once (Envoy: status_on_error, a 503). Long enough for a
            # burst of max_concurrent_checks on one connection; short enough that a check admitted
            # under 5x overload waits about half a second, not until Envoy's 3 s timeout.
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", pending),
        ],
        # Bounded queueing: past this many checks in flight grpc answers RESOURCE_EXHAUSTED at
        # once, which Envoy turns into its status_on_error (503): a fast, retryable no, never an
        # allow, and the checks already admitted keep their latency.
        maximum_concurrent_rpcs=max_concurrent_checks,
    )
    # Registered by hand rather than with the generated add_..._to_server: the same method path,
    # but no response_serializer, because Check returns bytes it has already encoded.
    check: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=None,  # bytes: Check decodes them itself (see its docstring)
        response_serializer=None,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AUTHORIZATION_SERVICE, {"Check": check}),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            AUTHORIZATION_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server


def bind(
    server: grpc.aio.Server, addresses: Sequence[str], tls: TlsConfig | None, *, reuse_port: bool = False
) -> list[int]:
    """Listen on each address, with TLS (and client certificates) when configured; the bound ports."""
    ports = []
    for address in addresses:
        problem = bind_problem(address, reuse_port)
        if problem is not None:
            raise problem  # before grpc tries: it would log a C++ error line of its own first
        try:
            if tls is None:
                port = server.add_insecure_port(address)
            else:
                credentials = grpc.ssl_server_credentials(
                    [(tls.key, tls.cert)],
                    root_certificates=tls.client_ca,
                    require_client_auth=tls.client_ca is not None,
                )
                port = server.add_secure_port(address, credentials)
        except RuntimeError as err:  # grpc's "Failed to bind to address": it gives no reason
            raise bind_failure(address) from err
        if port == 0:
            raise bind_failure(address)
        ports.append(port)
    return ports
