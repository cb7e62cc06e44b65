"""What one stage replica reports to its autoscaler (see serving/autoscaling.py).

Every model stage reports the same few numbers from `record_autoscaling_stats`, so one
policy scales all three: the device-seconds of work the replica holds (`backlog_seconds`),
its calls `waiting` and `running`, the share of its capacity in use (`busy`), how long the oldest waiter has waited, what one call
costs here (`seconds_per_job`, measured), and how long this replica took to start
(`startup_seconds`, measured: a simulated replica waits its profile's start-up in its
constructor, so the same measurement carries the profile's figure).
"""

from __future__ import annotations

import itertools
import time

# When this replica began to start: its constructor marks it (`mark_replica_start`, first
# thing, before it imports torch or loads weights). Until then, when this module was imported.
_started_at = time.monotonic()
_startup_seconds: float | None = None


def mark_replica_start() -> None:
    global _started_at
    _started_at = time.monotonic()


def replica_age_seconds() -> float:
    """Seconds since this replica began to start (its imports and weights load included)."""
    return time.monotonic() - _started_at


def startup_seconds() -> float:
    """This replica's start-up: its constructor's start to its first stats report (which Serve
    makes only once the constructor has returned), so imports and weights loading are in it."""
    global _startup_seconds
    if _startup_seconds is None:
        _startup_seconds = replica_age_seconds()
    return _startup_seconds


class StageLoad:
    """Calls one replica holds, waiting for its accelerator or running on it, and the
    device-seconds each call costs (a moving average of measured calls)."""

    def __init__(self):
        self._ids = itertools.count()
        self.arrived: dict[int, float] = {}  # call -> monotonic arrival (waiting or running)
        self.started: dict[int, float] = {}  # call -> monotonic start on the accelerator
        self.charged: dict[int, float] = {}  # call -> device seconds the call itself measured
        self.seconds_per_call = 0.0
        self.measured = False

    def arrive(self) -> int:
        call = next(self._ids)
        self.arrived[call] = time.monotonic()
        return call

    def start(self, call: int) -> None:
        self.started[call] = time.monotonic()

    def charge(self, call: int, device_seconds: float) -> None:
        """The call's device time when wall time overstates it (a batched forward's share)."""
        self.charged[call] = self.charged.get(call, 0.0) + device_seconds

    def finish(self, call: int) -> None:
        self.arrived.pop(call, None)
        started = self.started.pop(call, None)
        seconds = self.charged.pop(call, None)
        if seconds is None:
            if started is None:
                return  # never reached the accelerator (cancelled while waiting)
            seconds = time.monotonic() - started
        self.seconds_per_call = seconds if not self.measured else 0.8 * self.seconds_per_call + 0.2 * seconds
        self.measured = True

    def stats(self) -> dict[str, float]:
        now = time.monotonic()
        waiting = [now - t for c, t in self.arrived.items() if c not in self.started]
        running = [now - t for t in self.started.values()]
        # Until a call has finished, the longest-running one says at least what a call costs.
        per_call = self.seconds_per_call if self.measured else max(running, default=0.0)
        backlog = len(waiting) * per_call + sum(max(per_call - elapsed, 0.0) for elapsed in running)
        # A call on the accelerator keeps this replica busy (concurrent calls share its forwards).
        return {"backlog_seconds": backlog, "waiting": float(len(waiting)), "running": float(len(running)),
                "busy": 1.0 if running else 0.0,
                "oldest_wait_s": max(waiting, default=0.0), "seconds_per_job": per_call,
                "startup_seconds": startup_seconds()}


class ReplicaLoad:
    """A class attribute that gives each replica object its own `StageLoad`, made on first
    use (picklable with the deployment class; `functools.cached_property` holds a lock)."""

    def __set_name__(self, owner, name: str) -> None:
        self.key = f"_{name}"

    def __get__(self, replica, owner=None):
        if replica is None:
            return self
        load = replica.__dict__.get(self.key)
        if load is None:
            load = replica.__dict__[self.key] = StageLoad()
        return load
