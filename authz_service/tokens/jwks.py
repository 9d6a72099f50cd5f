"""Keys from a JWKS URI: cached for cache_ttl, refreshed ahead of expiry, single flight.

State machine, per introspector:
- nothing usable (cold start, or expired beyond max_stale): the request waits for one fetch
  (shared by all concurrent requests); failure = UpstreamUnavailable (503).
- fresh: keys served from memory; past 80% of the TTL a background refresh starts, so no
  request waits on a refetch while the IdP is healthy.
- expired but within max_stale: the old keys are served (counted) while refreshes retry in
  the background (at most every min(5 s, ttl/5) after a failure), whether the IdP is down or
  not: with the IdP up they answer only the requests that arrive while that one refresh runs.
- a token with an unknown `kid`: one refetch, at most once per `unknown_kid_interval`, so a
  flood of invented kids costs the IdP one request per interval. A token whose kid names no
  published key but that a key *without* kid was tried for (such a key stands in for every kid)
  and failed, or a token without kid that no key verifies, is the same case once the signature
  fails: the same rate-limited refetch (`keys_after_bad_signature`), else a rotation would stay
  invisible (401 bad_signature) until the next refresh.
- no keys yet (the IdP was down at start-up, or the introspector came with a reload): besides
  the fetches requests cause, `retry_in_background` fetches with backoff (0.5 s doubling, capped
  at `RETRY_CAP`) until keys arrive; `keys_arrived` is set then (readiness waits on it).

A verified-token cache hit never asks for keys: it pokes `refresh_in_background` once
`refresh_due_at` has passed (tokens/base.KeyRefresh), so tokens served from memory still start the
refresh ahead of expiry. A failed fetch is logged with the introspector's id and the URL without
its userinfo or query: at once when the failure is new, else at most every `FAILURE_LOG_EVERY`
seconds with the count of those not logged (without keys every request fetches: no log flood).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from authz_service.errors import TokenRejected, UpstreamUnavailable
from authz_service.model import Reason
from authz_service.singleflight import SingleFlight
from authz_service.tokens.base import IdpClient
from authz_service.tokens.discovery import FixedJwksUri, JwksLocation, public_url
from authz_service.tokens.keys import EC_ALGS, OKP_ALGS, RSA_ALGS, SkippedKey, VerificationKey, read_jwk

log = logging.getLogger(__name__)

_FETCH = "jwks"  # the one key of the fetches in flight: one at a time per key source
REFRESH_AHEAD = 0.8  # fraction of cache_ttl after which a background refresh starts
# What a key from a JWKS can verify: asymmetric algorithms only (oct keys are never taken from one).
JWKS_ALGORITHMS = RSA_ALGS | EC_ALGS | OKP_ALGS
# Retries of a key source that has no keys yet: the first after RETRY_FIRST s, doubling up to RETRY_CAP
# s, each shortened by up to RETRY_JITTER of itself so that replicas started together spread out.
RETRY_FIRST = 0.5
RETRY_CAP = 5.0
RETRY_JITTER = 0.2
FAILURE_LOG_EVERY = 30.0  # seconds between two log lines of the same ongoing failure


def retry_delay(attempt: int, jitter: float) -> float:
    """Seconds before retry number `attempt` (0-based); `jitter` in [0, 1) shortens it, never lengthens it."""
    return min(RETRY_CAP, RETRY_FIRST * 2.0 ** min(attempt, 16)) * (1.0 - RETRY_JITTER * jitter)


@dataclass(frozen=True, slots=True)
class KeySet:
    """One fetched JWKS, indexed for lookup."""

    keys: tuple[VerificationKey, ...]
    fetched_at: float
    expires_at: float
    by_kid: dict[str, tuple[VerificationKey, ...]] = field(default_factory=dict)
    without_kid: tuple[VerificationKey, ...] = ()
    identity: frozenset[tuple[str | None, str]] = frozenset()  # (kid, key fingerprint) of every key

    @classmethod
    def build(cls, keys: Sequence[VerificationKey], fetched_at: float, ttl: float) -> KeySet:
        by_kid: dict[str, list[VerificationKey]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        return cls(
            tuple(keys),
            fetched_at,
            fetched_at + ttl,
            {k: tuple(v) for k, v in by_kid.items()},
            tuple(k for k in keys if k.kid is None),
            frozenset((k.kid, k.fingerprint) for k in keys),
        )

    def knows(self, kid: str | None) -> bool:
        """Whether a token with this kid has candidate keys here (a key without kid fits any kid)."""
        return kid is None or kid in self.by_kid or bool(self.without_kid)

    def lookup(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        """The keys that may verify a token with this kid and alg (as Envoy's jwt_authn: a key
        without kid is a candidate for every token)."""
        candidates = self.keys if kid is None else self.by_kid.get(kid, ()) + self.without_kid
        return tuple(k for k in candidates if alg in k.verifiers)


def parse_jwks(document: Any, on_skipped: Callable[[SkippedKey], None] | None = None) -> list[VerificationKey]:
    """The usable signing keys of a JWKS document; raise UpstreamUnavailable if there are none.

    Every entry not used is handed to `on_skipped` with its reason (before the raise, too: a key
    set whose only key is unusable is exactly when the operator needs to know why)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise UpstreamUnavailable("jwks", "invalid_document")
    keys: list[VerificationKey] = []
    for raw in document["keys"]:
        verdict = read_jwk(raw) if isinstance(raw, dict) else SkippedKey(None, "malformed")
        if isinstance(verdict, VerificationKey):
            keys.append(verdict)
        elif on_skipped is not None:
            on_skipped(verdict)
    if not keys:
        # Replacing good keys with an empty set would turn an IdP mistake into an outage of ours.
        raise UpstreamUnavailable("jwks", "no_usable_keys")
    return keys


class JwksKeySource:
    """A JWKS URI's keys, cached per introspector."""

    def __init__(
        self,
        location: str | JwksLocation,
        client: IdpClient,
        *,
        ttl: float,
        max_stale: float = 0.0,
        timeout: float = 2.0,
        unknown_kid_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        name: str = "",
        on_skipped_key: Callable[[str], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.location = FixedJwksUri(location) if isinstance(location, str) else location
        self._client = client
        self._ttl = ttl
        self._max_stale = max_stale
        self._timeout = timeout
        self._unknown_kid_interval = unknown_kid_interval
        self._clock = clock  # monotonic: expiry and rate limits
        self.clock = clock  # the same, for a verified-token hit comparing it with refresh_due_at
        self._wall_clock = wall_clock  # epoch seconds, for trusted_until (compared with token exp)
        self._keyset: KeySet | None = None
        self._inflight: SingleFlight[str, KeySet] = SingleFlight()
        # Monotonic seconds from which a background refresh may start (tokens.base.KeyRefresh): 80%
        # of the TTL after a fetch, a little later after a failure. A verified-token hit reads it.
        self.refresh_due_at = 0.0
        self._last_unknown_kid_fetch = -float("inf")
        self.fetch_attempts = 0
        self.stale_answers = 0
        self.generation = 0  # bumped whenever the key set changes (rotation)
        self.name = name  # the introspector's id, for logs
        # Called with the reason of every unusable key of every fetched document (a metric).
        self._on_skipped_key = on_skipped_key
        self.skipped: frozenset[SkippedKey] = frozenset()  # the unusable keys of the last document
        # "<outcome> from <url>" of the last fetch when it failed (None once one succeeds): /readyz.
        self.last_failure: str | None = None
        self._failure_logged_at = -math.inf  # monotonic time of the last failure line
        self._failures_not_logged = 0
        self.keys_arrived = asyncio.Event()  # set by the first fetch that succeeds
        self._sleep = sleep  # the retry loop's waits (a test steps them)
        self._jitter = jitter
        self._retry: asyncio.Task[None] | None = None

    @property
    def keyset(self) -> KeySet | None:
        return self._keyset

    def trusted_until(self) -> float:
        """Epoch seconds until which the cached keys may verify tokens (0 when there are none)."""
        keyset = self._keyset
        if keyset is None:
            return 0.0
        return self._wall_clock() + (keyset.expires_at + self._max_stale - self._clock())

    def staleness(self) -> float:
        """Seconds past expiry of the keys being served (0 when fresh or none)."""
        keyset = self._keyset
        return max(0.0, self._clock() - keyset.expires_at) if keyset else 0.0

    def status(self) -> str:
        """What /readyz says about these keys: "ready", or why not, naming the failure and its URL."""
        keyset = self._keyset
        failure = self.last_failure
        if keyset is None:
            return f"no keys yet: {failure}" if failure else "no keys yet: first fetch under way"
        now = self._clock()
        if now < keyset.expires_at:
            return f"ready (last refresh failed: {failure})" if failure else "ready"
        past = f"{math.ceil(now - keyset.expires_at)} s past cache_ttl"
        if now < keyset.expires_at + self._max_stale:
            return f"serving stale keys, {past}: {failure or 'refresh under way'}"
        return f"keys expired, {past}: {failure or 'refresh under way'}"

    async def keys_for(self, kid: str | None, alg: str) -> Sequence[VerificationKey]:
        if alg not in JWKS_ALGORITHMS:
            # No key a JWKS can give us verifies it (`none`, HMAC, anything unknown): refuse before
            # any lookup, so such a token never makes us fetch.
            raise TokenRejected(Reason.BAD_ALGORITHM)
        now = self._clock()
        keyset = self._keyset
        if keyset is None or now >= keyset.expires_at + self._max_stale:
            keyset = await self._fetch()
        elif now >= keyset.fetched_at + self._ttl * REFRESH_AHEAD:
            if now >= keyset.expires_at:
                self.stale_answers += 1
            self._refresh_in_background(now)
        keys = keyset.lookup(kid, alg)
        if keys:
            return keys
        if not keyset.knows(kid):
            keyset = await self._refetch_for_unknown_kid(keyset, kid)
            keys = keyset.lookup(kid, alg)
            if keys:
                return keys
        if not any(alg in k.verifiers for k in keyset.keys):
            raise TokenRejected(Reason.BAD_ALGORITHM)
        raise TokenRejected(Reason.UNKNOWN_KEY)

    async def keys_after_bad_signature(
        self, kid: str | None, alg: str, tried: Sequence[VerificationKey]
    ) -> Sequence[VerificationKey]:
        """Keys not yet tried that a rotation may have published, after `tried` failed to verify.

        Only when the token's kid named none of the published keys (a key without kid stood in for
        it, as it does for every kid, or the token has no kid): that is a rotation we cannot see
        yet, exactly like an unknown kid, so it gets the same one rate-limited refetch. A token
        whose kid is published and whose signature fails is a forgery: no fetch.
        """
        keyset = self._keyset
        if keyset is None or (kid is not None and kid in keyset.by_kid):
            return ()
        keyset = await self._refetch_for_unknown_kid(keyset, kid, after_bad_signature=True)
        seen = {key.fingerprint for key in tried}
        return tuple(key for key in keyset.lookup(kid, alg) if key.fingerprint not in seen)

    async def _refetch_for_unknown_kid(
        self, keyset: KeySet, kid: str | None, *, after_bad_signature: bool = False
    ) -> KeySet:
        """The key set a token with an unknown kid is decided on (a rotation may have published it).

        Every such request joins the fetch in flight, if there is one. Otherwise one refetch starts,
        at most once per unknown_kid_interval: the rate limit bounds fetches, never answers, so
        a burst of valid tokens signed with a just-published key all wait for the same refetch.
        """
        if _FETCH in self._inflight:
            joined = await self._fetch()
            # A fetch that was already under way may predate the key; after a bad signature only
            # a new key set (another generation) can help, so its answer alone does not do.
            if joined.knows(kid) and not (after_bad_signature and joined.identity == keyset.identity):
                return joined
            keyset = joined
        now = self._clock()
        if now - self._last_unknown_kid_fetch >= self._unknown_kid_interval:
            self._last_unknown_kid_fetch = now
            return await self._fetch()
        return keyset

    async def warm_up(self) -> bool:
        """Fetch once at start-up so the first request does not wait; False if that failed (logged)."""
        try:
            await self._fetch()
        except UpstreamUnavailable:
            return False
        return True

    def retry_in_background(self) -> None:
        """Until keys arrive, fetch again and again, with backoff (see `retry_delay`); no-op with keys."""
        if self._keyset is None and (self._retry is None or self._retry.done()):
            self._retry = asyncio.ensure_future(self._retry_until_keys())

    @property
    def retrying(self) -> bool:
        """Whether the background retries run (no keys yet, and not stopped)."""
        return self._retry is not None and not self._retry.done()

    def stop_retrying(self) -> None:
        """Cancel the retries (the introspector was replaced, or the process stops)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    async def _retry_until_keys(self) -> None:
        attempt = 0
        while self._keyset is None:
            await self._sleep(retry_delay(attempt, self._jitter()))
            attempt += 1
            if self._keyset is not None:
                break  # a request's fetch brought them meanwhile
            try:
                await self._fetch()
            except UpstreamUnavailable:
                pass  # logged by _download; try again later
            except Exception as err:  # a bug here must not end the retries (and readiness) for good
                log.error(
                    "JWKS fetch failed unexpectedly",
                    extra={"fields": {"introspector": self.name, "error": type(err).__name__}},
                )

    def refresh_in_background(self) -> None:
        """Start the due background refresh (tokens.base.KeyRefresh): a verified-token hit calls it."""
        self._refresh_in_background(self._clock())

    def _refresh_in_background(self, now: float) -> None:
        if _FETCH not in self._inflight and now >= self.refresh_due_at:
            # The result lands in self._keyset; a failure is retried on a later request. Started in
            # an empty context: the request that pokes it does not wait for it, so the fetch is
            # not part of that request's trace (tracing.py: a root span of its own).
            contextvars.Context().run(self._inflight.start, _FETCH, self._download)

    async def _fetch(self) -> KeySet:
        # The fetch in flight, or a new one; one waiter being cancelled (Envoy gave up) does not
        # cancel the shared fetch.
        return await self._inflight.run(_FETCH, self._download)

    async def _download(self) -> KeySet:
        self.fetch_attempts += 1
        started = self._clock()
        url = self.location.url  # the document a failure is about: discovery's, then the JWKS
        try:
            url = await self.location.jwks_uri()
            document = await self._client.get_json("jwks", url, timeout=self._timeout)
            skipped: list[SkippedKey] = []
            try:
                keys = parse_jwks(document, skipped.append)
            finally:
                self._report_skipped(skipped)
        except UpstreamUnavailable as err:
            # Retry in the background soon, but not on every request.
            self.refresh_due_at = self._clock() + min(self._unknown_kid_interval, max(self._ttl * 0.2, 0.1))
            self._report_failure(err, public_url(url))
            raise
        keyset = KeySet.build(keys, started, self._ttl)
        previous = self._keyset
        if previous is None or previous.identity != keyset.identity:
            self.generation += 1
        self._keyset = keyset
        self.refresh_due_at = started + self._ttl * REFRESH_AHEAD
        if self.last_failure is not None:
            log.info("JWKS fetch recovered", extra={"fields": {"introspector": self.name, "url": public_url(url)}})
        self.last_failure = None
        self._failure_logged_at = -math.inf
        self._failures_not_logged = 0
        self.keys_arrived.set()
        return keyset

    def _report_failure(self, err: UpstreamUnavailable, url: str) -> None:
        """Log a failed fetch (the introspector and the URL, never its userinfo or query, where
        secrets travel): a new failure at once, the same one again at most every FAILURE_LOG_EVERY s."""
        failure = f"{err.outcome} from {url}"
        now = self._clock()
        repeated = failure == self.last_failure
        self.last_failure = failure
        if repeated and now - self._failure_logged_at < FAILURE_LOG_EVERY:
            self._failures_not_logged += 1
            return
        log.warning(
            "JWKS fetch failed",
            extra={
                "fields": {
                    "introspector": self.name,
                    "endpoint": err.endpoint,
                    "url": url,
                    "outcome": err.outcome,
                    "keys": "none" if self._keyset is None else "kept",
                    "unlogged_failures": self._failures_not_logged,  # failed fetches since the last line
                }
            },
        )
        self._failure_logged_at = now
        self._failures_not_logged = 0

    def _report_skipped(self, skipped: list[SkippedKey]) -> None:
        """Count every unusable key of a fetched document; log them when they differ from the last fetch's."""
        problems = [key for key in skipped if not key.expected]
        if self._on_skipped_key is not None:
            for key in problems:
                self._on_skipped_key(key.reason)
        unusable = frozenset(problems)
        for key in sorted(unusable - self.skipped, key=lambda k: (k.kid or "", k.reason)):
            # The kid and a reason label only: never the key material.
            log.warning(
                "JWKS key skipped",
                extra={"fields": {"introspector": self.name, "kid": key.kid, "reason": key.reason}},
            )
        self.skipped = unusable
