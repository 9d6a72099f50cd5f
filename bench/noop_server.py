"""The floor: a grpc.aio ext_authz server whose Check answers a fixed OK CheckResponse.

Same stack as the service (grpc.aio on the same event loop, the generated classes in
authz_service._pb, grpc.health.v1) and nothing else, so `checks/s of a scenario / checks/s of this` is the share of the gRPC
ceiling the service keeps.

    python bench/noop_server.py --port 0     # prints {"port": N} once SERVING
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"

_OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK),
    ok_response=external_auth_pb2.OkHttpResponse(),
)


async def check(
    request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> external_auth_pb2.CheckResponse:
    """The whole handler: a fixed OK."""
    return _OK


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    # What the generated add_AuthorizationServicer_to_server registers, written out (it is untyped).
    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
        check,
        request_deserializer=external_auth_pb2.CheckRequest.FromString,
        response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AUTHORIZATION_SERVICE, {"Check": handler}),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"noop_server: cannot bind {host}:{port}")
    await server.start()
    for name in ("", AUTHORIZATION_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    sys.stdout.write(json.dumps({"port": bound}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        # The same event loop the service picks (uvloop when installed, AUTHZ_EVENT_LOOP=asyncio
        # opts out), so the floor and the service differ only in the Check handler.
        from authz_service.loop import run
    except ImportError:
        run = asyncio.run
    run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
