"""Transient database faults: which errors they are, and retrying a store method through them.

A database blip (a dropped connection, a failover, a lock held too long) says nothing about
the request; trying again after a short wait usually succeeds. Only methods that are safe to
repeat are retried (reads, conditional updates, inserts that look for their own row).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from typing import Any, Callable, TypeVar

import sqlalchemy as sa

logger = logging.getLogger("ray.serve")

# A database blip (a dropped connection, a failover, a lock held too long) is retried with
# doubling waits for about this long before the caller sees it.
TRANSIENT_RETRY_SECONDS = 10.0
_FIRST_WAIT_SECONDS = 0.1

_T = TypeVar("_T")


def is_transient(exc: BaseException) -> bool:
    """A database error that says nothing about the request: trying again may succeed."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError))


def retry_transient(method: Callable[..., _T]) -> Callable[..., _T]:
    """Run a store method again after a transient database error. Every method so wrapped
    is safe to repeat: reads, conditional updates, and inserts that look for their own row.
    A method with an `_attempt` parameter is told which try it is (0 first)."""
    wants_attempt = "_attempt" in inspect.signature(method).parameters

    @functools.wraps(method)
    def retrying(self, *args: Any, **kwargs: Any) -> _T:
        deadline = time.monotonic() + self.transient_retry_seconds
        wait, attempt = _FIRST_WAIT_SECONDS, 0
        while True:
            try:
                if wants_attempt:
                    kwargs["_attempt"] = attempt
                return method(self, *args, **kwargs)
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + wait > deadline:
                    raise
                logger.warning("job store: %s failed (%s); retrying in %.1f s", method.__name__,
                               type(exc).__name__, wait)
            time.sleep(wait)
            wait, attempt = wait * 2, attempt + 1

    return retrying
