"""Hang detection for stage calls: how long one call may take before it counts as hung.

The same `StageClock` serves both sides of a call. The Director gives up on a call whose
work (from the replica's `STARTED`, not from the request: waiting in front of a busy stage
is not hanging) runs past its timeout and hands the job back for another attempt (it resumes
from its last checkpoint); the replica's `check_health` fails while one of its own calls is past the same
bound, so Ray Serve replaces a replica that is alive but stuck (a hung kernel, a deadlock)
and the retry runs elsewhere. Without this a hung call kept its job in progress forever,
since the Director's heartbeat went on renewing the job's lease.
"""

from __future__ import annotations

import itertools
import time

# With no configured timeout a call may take this many times its measured average...
TIMEOUT_MULTIPLE = 10.0
# ...but never less than this (the first calls of a replica warm caches and compile kernels).
MIN_TIMEOUT_SECONDS = 60.0

# Before a stage has measured anything: generous guesses (a Wan2.1-14B replica on one GPU).
PRIOR_ENCODE_SECONDS = 30.0  # one text-encoder call
PRIOR_DECODE_SECONDS_PER_MEGAPIXEL_FRAME = 1.0  # VAE decode, per frame x megapixel


# The first thing a streamed stage call yields: the replica has begun the work. The Director
# times a call from here, so its wait in Serve's router and behind the replica's other calls
# (load, not a hang) never counts against the timeout; then the call yields its result.
STARTED = {"started": True}


def decode_units(num_frames: int, width: int, height: int) -> float:
    """A decode's work in megapixel-frames: a 10 s 720p clip is not timed like a 2 s 480p one."""
    return num_frames * width * height / 1e6


class StageTimeout(Exception):
    """A stage call ran past its timeout; the job is retried, the replica checked."""

    def __init__(self, stage: str, seconds: float):
        super().__init__(f"{stage} did not answer within {seconds:.0f} s")
        self.stage, self.seconds = stage, seconds


class StageClock:
    """Moving average of one stage's call time per unit of work (a call, a denoise step)."""

    def __init__(self, stage: str, configured_seconds: float | None, prior_seconds: float):
        self.stage = stage
        self.configured = configured_seconds
        self.average = prior_seconds
        self.measured = False
        self._ids = itertools.count()
        self.in_flight: dict[int, tuple[float, float]] = {}  # call id -> (monotonic start, units)

    def timeout(self, units: float = 1.0) -> float:
        """Seconds a call of `units` work may take: the configured bound, else a multiple of
        the measured time per unit (the preset's prior until something is measured)."""
        if self.configured is not None:  # the operator's bound is for a whole call
            return self.configured
        return max(MIN_TIMEOUT_SECONDS, TIMEOUT_MULTIPLE * self.average * units)

    def observe(self, seconds: float, units: float = 1.0) -> None:
        per_unit = seconds / max(units, 1e-9)
        self.average = per_unit if not self.measured else 0.8 * self.average + 0.2 * per_unit
        self.measured = True

    def start(self, units: float = 1.0) -> int:
        call = next(self._ids)
        self.in_flight[call] = (time.monotonic(), units)
        return call

    def finish(self, call: int) -> None:
        started, units = self.in_flight.pop(call, (None, 1.0))
        if started is not None:
            self.observe(time.monotonic() - started, units)

    def overdue(self) -> str | None:
        """Why a call in flight counts as hung (it ran past its timeout), or None."""
        now = time.monotonic()
        for started, units in list(self.in_flight.values()):
            if now - started > self.timeout(units):
                return f"a {self.stage} call has run {now - started:.0f} s, over its {self.timeout(units):.0f} s timeout"
        return None
