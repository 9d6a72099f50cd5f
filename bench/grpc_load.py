"""A small grpc.aio load generator for what h2load cannot do: a distinct token on every Check.

h2load sends one request body (`-d FILE`) over and over, so an "uncached" scenario, where every
Check carries a token the service has never seen, needs its own client. This one reads tokens
(one per line) and sends each exactly once, `--concurrency` in flight over `--channels` HTTP/2
connections, until the tokens run out or `--duration` passes. It prints one JSON line:
{"sent", "ok", "codes": {grpc-status-in-CheckResponse: count}, "errors", "seconds", "rate",
 "p50_ms", "p99_ms"}.

    python bench/grpc_load.py --target 127.0.0.1:9001 --tokens FILE --skip 0 --count 1000 \
        --concurrency 16 --channels 4 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
from checkreq import CHECK_PATH, check_request

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def build_requests(args: argparse.Namespace) -> list[external_auth_pb2.CheckRequest]:
    """Every request, built before the clock starts: the client's own protobuf work is not measured."""
    if args.tokens:
        lines = Path(args.tokens).read_text().split()
        return [check_request(token) for token in lines[args.skip : args.skip + args.count]]
    return [check_request(args.token)] * args.count  # one message, sent count times


async def run(args: argparse.Namespace, requests: list[external_auth_pb2.CheckRequest]) -> dict[str, object]:
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.channels)
    ]
    stubs = [
        channel.unary_unary(
            CHECK_PATH,
            request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
            response_deserializer=external_auth_pb2.CheckResponse.FromString,
        )
        for channel in channels
    ]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 5)
    codes: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    errors = 0
    position = 0
    started = time.perf_counter()
    deadline = started + args.duration

    async def worker(number: int) -> None:
        nonlocal position, errors
        check = stubs[number % len(stubs)]
        while position < len(requests) and time.perf_counter() < deadline:
            request = requests[position]
            position += 1
            sent = time.perf_counter()
            try:
                reply: external_auth_pb2.CheckResponse = await check(request, timeout=args.timeout)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - sent)
            codes[reply.status.code] += 1

    await asyncio.gather(*(worker(n) for n in range(args.concurrency)))
    seconds = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    latencies.sort()
    done = sum(codes.values())
    return {
        "sent": position,
        "ok": codes.get(0, 0),
        "codes": {str(code): count for code, count in sorted(codes.items())},
        "errors": errors,
        "seconds": round(seconds, 3),
        "rate": round(done / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--tokens", help="file with one token per line (each sent once)")
    parser.add_argument("--token", help="without --tokens: this token on every request (none if absent)")
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args, build_requests(args)))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
