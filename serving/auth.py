"""API keys: who a request is, and whether it may go on now.

A client sends `Authorization: Bearer KEY` (what the openai SDK sends from `api_key`). The
config keeps only each key's SHA-256 (keys are 32 random bytes, so a fast hash is enough,
and a lookup stays one dict access). The key's name is the tenant: it owns the videos made
with the key. Rate limits are a moving window per key (the `limits` library), kept in the
Gateway replica's memory: with N Gateway replicas a key may get up to N times its rate.
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

from serving.config import AuthConfig

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
    requests_per_minute: int
    max_concurrent_jobs: int
    rate: RateLimitItem  # the limiter's form of requests_per_minute


class ApiKeys:
    def __init__(self, config: AuthConfig):
        self.enabled = config.enabled
        self._by_digest = {}
        for key in config.keys:
            per_minute = key.requests_per_minute or config.requests_per_minute
            self._by_digest[key.sha256] = Caller(key.name, per_minute,
                                                 key.max_concurrent_jobs or config.max_concurrent_jobs,
                                                 RateLimitItemPerMinute(per_minute))
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

    def retry_after(self, caller: Caller) -> int | None:
        """Count one request against the caller's rate; None if allowed, else seconds to wait."""
        if self._limiter.hit(caller.rate, caller.name):
            return None
        reset = self._limiter.get_window_stats(caller.rate, caller.name).reset_time
        return max(1, math.ceil(reset - time.time()))
