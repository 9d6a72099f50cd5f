"""DPoP replay detection on a real Redis: shared by every replica, atomic, and closed when Redis fails."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as redis
from jwcrypto import jwk, jws  # type: ignore[import-untyped]  # no type information shipped

from authz_service.model import Confirmation
from authz_service.tokens.dpop import (
    DEFAULT_PROOF_LEEWAY,
    DEFAULT_PROOF_WINDOW,
    REDIS_OPERATION_TIMEOUT,
    REPLAY_KEY_PREFIX,
    InvalidDPoPProof,
    RedisReplayCache,
    ReplayCacheUnavailable,
    SenderConstraints,
    access_token_hash,
    replay_key,
    replay_ttl,
)
from tests.conftest import free_port

TOKEN = "an-access-token-bound-to-the-key"
URL = "https://api.example.com/fhir/Patient"
TTL = replay_ttl(DEFAULT_PROOF_WINDOW, DEFAULT_PROOF_LEEWAY)


@pytest_asyncio.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[redis.Redis, redis.Redis]]:
    """Two Redis clients, as two service replicas would hold them."""
    first, second = redis.from_url(redis_url), redis.from_url(redis_url)
    yield first, second
    await first.aclose()
    await second.aclose()


async def test_replicas_share_what_they_have_seen(replicas: tuple[redis.Redis, redis.Redis]) -> None:
    first, second = (RedisReplayCache(client) for client in replicas)
    jti = f"jti-{uuid.uuid4()}"
    key = replay_key("thumbprint-of-the-key", jti)
    assert await first.seen(key, TTL) is False
    assert await second.seen(key, TTL) is True  # another replica: the same proof is a replay
    assert await first.seen(key, TTL) is True
    assert await first.seen(replay_key("another-key", jti), TTL) is False  # the jti of another key

    client = replicas[0]
    stored = REPLAY_KEY_PREFIX + key
    assert await client.get(stored) == b"1"
    assert 0 < await client.pttl(stored) <= TTL * 1000  # Redis forgets it once no proof could pass
    names = [name.decode() async for name in client.scan_iter(REPLAY_KEY_PREFIX + "*")]
    assert stored in names
    assert not any(jti in name for name in names)  # keys are hashes, never the jti or the key


async def test_one_of_many_concurrent_uses_of_a_proof_passes(replicas: tuple[redis.Redis, redis.Redis]) -> None:
    # A generous deadline: 20 commands at once open 20 connections, which a loaded machine may take
    # longer than the production deadline to do; atomicity, not speed, is what this test is about.
    caches = [RedisReplayCache(client, timeout=10) for client in replicas]
    key = replay_key("thumbprint-of-the-key", f"jti-{uuid.uuid4()}")
    answers = await asyncio.gather(*(caches[i % 2].seen(key, TTL) for i in range(20)))
    assert answers.count(False) == 1


async def test_a_proof_replayed_at_another_replica_is_refused(replicas: tuple[redis.Redis, redis.Redis]) -> None:
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    claims = {
        "jti": str(uuid.uuid4()),
        "htm": "GET",
        "htu": URL,
        "iat": int(time.time()),
        "ath": access_token_hash(TOKEN),
    }
    signed = jws.JWS(json.dumps(claims))
    signed.add_signature(
        key,
        alg="ES256",
        protected=json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": key.export_public(as_dict=True)}),
    )
    proof = signed.serialize(compact=True)
    bound = Confirmation(jkt=key.thumbprint())
    request = {"required": True, "scheme": "dpop", "token": TOKEN, "proof": proof, "method": "GET", "url": URL}
    first, second = (SenderConstraints(RedisReplayCache(client)) for client in replicas)
    await first.verify(bound, certificate=None, **request)
    with pytest.raises(InvalidDPoPProof) as caught:
        await second.verify(bound, certificate=None, **request)
    assert caught.value.detail == "replayed"


async def test_an_unreachable_redis_fails_closed() -> None:
    client = redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(ReplayCacheUnavailable) as caught:
            await RedisReplayCache(client).seen(replay_key("k", "j"), TTL)
        assert caught.value.outcome == "ConnectionError"
    finally:
        await client.aclose()


async def test_a_redis_that_never_answers_fails_closed_at_the_deadline() -> None:
    connected = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # accepted, read from, never answered
        connected.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        started = time.monotonic()
        with pytest.raises(ReplayCacheUnavailable) as caught:
            await RedisReplayCache(client).seen(replay_key("k", "j"), TTL)
        elapsed = time.monotonic() - started
        assert connected.is_set()
        assert caught.value.outcome == "timeout"
        assert REDIS_OPERATION_TIMEOUT <= elapsed < REDIS_OPERATION_TIMEOUT + 1
    finally:
        await client.aclose()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
