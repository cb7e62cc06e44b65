"""API keys: who a request is, and whether it may go on now.

A client sends `Authorization: Bearer KEY` (what the openai SDK sends from `api_key`). The
config keeps only each key's SHA-256 (keys are 32 random bytes, so a fast hash is enough,
and a lookup stays one dict access). The key's name is the tenant: it owns the videos made
with the key. Rate limits are a moving window per key (the `limits` library), kept in the
Gateway replica's memory: with N Gateway replicas a key may get up to N times its rate.
Reads and writes are counted apart: polling is how the SDK waits for a video, so the read
rate defaults to twice what polling the key's whole job quota at the advertised interval needs.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from serving.config import AuthConfig, ServerConfig

KEY_PREFIX = "dsk-"


class AuthError(Exception):
    """No key, or a key this server does not know (answered 401)."""


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """The tenant behind a request: its name and its limits."""

    name: str
    requests_per_minute: int  # writes: creates, cancels, deletes
    reads_per_minute: int
    max_concurrent_jobs: int
    max_event_streams: int
    max_priority: int
    operator: bool = False  # sees every key's usage


def _pick(own: int | None, default: int) -> int:
    return own if own is not None else default


class ApiKeys:
    def __init__(self, config: AuthConfig, poll_after_ms: int = ServerConfig().poll_after_ms):
        self.enabled = config.enabled
        self._by_digest = {}
        for key in config.keys:
            jobs = _pick(key.max_concurrent_jobs, config.max_concurrent_jobs)
            polling = 2 * jobs * math.ceil(60_000 / poll_after_ms)  # twice the polls a full quota makes
            self._by_digest[key.sha256] = Caller(
                key.name, _pick(key.requests_per_minute, config.requests_per_minute),
                _pick(key.reads_per_minute, _pick(config.reads_per_minute, polling)), jobs,
                _pick(key.max_event_streams, config.max_event_streams), _pick(key.max_priority, config.max_priority),
                key.operator)
        # The limiter's form of each key's two rates, by `read`.
        self._rates: dict[str, dict[bool, RateLimitItem]] = {
            c.name: {False: RateLimitItemPerMinute(c.requests_per_minute), True: RateLimitItemPerMinute(c.reads_per_minute)}
            for c in self._by_digest.values()}
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def authenticate(self, authorization: str | None) -> Caller:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("this server needs an API key: send `Authorization: Bearer KEY` "
                            "(the openai SDK's api_key)")
        # Comparing digests, not keys, leaks nothing through timing about a valid key.
        caller = self._by_digest.get(key_digest(key.strip()))
        if caller is None:
            raise AuthError("the API key is not known to this server")
        return caller

    def retry_after(self, caller: Caller, read: bool) -> int | None:
        """Count one read or write against the caller's rate; None if allowed, else seconds to wait."""
        rate, kind = self._rates[caller.name][read], "read" if read else "write"
        if self._limiter.hit(rate, caller.name, kind):
            return None
        reset = self._limiter.get_window_stats(rate, caller.name, kind).reset_time
        return max(1, math.ceil(reset - time.time()))
