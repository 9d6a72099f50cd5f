"""The overload scenario's probe: Checks at a steady, open-loop rate, each answer classified.

h2load drives the overload but sees only HTTP 200 for every gRPC answer (the decision and
RESOURCE_EXHAUSTED are in the body and trailers). This probe sends its own Checks through the same
service while that happens: every `1/rate` seconds one Check, whether or not earlier ones were
answered (open loop: a slow answer does not slow the probe down), a share of them with invalid
tokens. Each answer is recorded with the time it was sent (time.monotonic, the same clock in
every process on the machine, so the harness can place it before, during or after the load):

    [sent, kind ("valid" | "invalid"), outcome, latency_ms]

outcome: "allow" (OK with an x-user-id header), "deny:<code>:<reason>" (a CheckResponse that
refuses), "rpc:<StatusCode>" (the call itself failed: RESOURCE_EXHAUSTED when the service shed it,
DEADLINE_EXCEEDED when --timeout passed first, as Envoy's own timeout would).

    python bench/overload_probe.py --target 127.0.0.1:9001 --valid TOKEN --invalid T1,T2 \
        --rate 200 --seconds 20 --out probe.json
    # prints {"t0": <monotonic>} once connected, writes the records to --out at the end
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
from checkreq import CHECK_PATH, check_request

from authz_service._pb.envoy.service.auth.v3 import external_auth_pb2

VALID_ID = "bench-overload-probe-valid"
INVALID_ID = "bench-overload-probe-invalid"

Record = tuple[float, str, str, float]


def classify(reply: external_auth_pb2.CheckResponse) -> str:
    if reply.status.code == 0 and reply.HasField("ok_response"):
        names = {option.header.key for option in reply.ok_response.headers}
        return "allow" if "x-user-id" in names else "ok-without-identity"
    return f"deny:{reply.status.code}:{reply.status.message}"


async def probe(args: argparse.Namespace) -> list[Record]:
    # The marker goes in attributes.request.http.id, which the service logs as the decision's request_id.
    valid = check_request(args.valid, stream_id=VALID_ID)
    invalid = [check_request(token, stream_id=INVALID_ID) for token in args.invalid.split(",") if token]
    every = round(1 / args.invalid_share) if args.invalid_share > 0 and invalid else 0
    channel = grpc.aio.insecure_channel(args.target)
    check = channel.unary_unary(
        CHECK_PATH,
        request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
        response_deserializer=external_auth_pb2.CheckResponse.FromString,
    )
    await asyncio.wait_for(channel.channel_ready(), 10)
    records: list[Record] = []

    async def one(number: int) -> None:
        if every and number % every == every - 1:
            kind, request = "invalid", invalid[(number // every) % len(invalid)]
        else:
            kind, request = "valid", valid
        sent = time.monotonic()
        try:
            reply: external_auth_pb2.CheckResponse = await check(request, timeout=args.timeout)
            outcome = classify(reply)
        except grpc.aio.AioRpcError as err:
            outcome = f"rpc:{err.code().name}"
        records.append((sent, kind, outcome, 1000 * (time.monotonic() - sent)))

    t0 = time.monotonic()
    sys.stdout.write(json.dumps({"t0": t0}) + "\n")
    sys.stdout.flush()
    tasks = []
    total = int(args.rate * args.seconds)
    for number in range(total):
        delay = t0 + number / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(number)))
    await asyncio.gather(*tasks)
    await channel.close()
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--valid", required=True, help="a token the service allows")
    parser.add_argument("--invalid", default="", help="comma-separated tokens it must refuse")
    parser.add_argument("--invalid-share", type=float, default=0.2)
    parser.add_argument("--rate", type=float, default=200.0, help="Checks per second, open loop")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=3.0, help="per-Check deadline (grpc-timeout)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = asyncio.run(probe(args))
    args.out.write_text(json.dumps({"records": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
