"""Wait estimates and admission control.

How long would a new job wait to start denoising? The Director knows the denoise steps
still to run (jobs it drives, plus jobs queued in the store) and measures the steps per
second the Denoisers actually complete. Their ratio is the live wait estimate: it is what
the API uses to answer 429 + Retry-After instead of queueing a job for twenty minutes, and
what a queued job's `estimated_start_at` comes from.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass


class Throughput:
    """Denoise steps completed per second, over a sliding window of recent work."""

    def __init__(self, fallback_steps_per_second: float, window_seconds: float = 30.0):
        self.fallback = fallback_steps_per_second
        self.window = window_seconds
        self.events: deque[float] = deque()
        self.last_rate: float | None = None

    def record(self, now: float | None = None) -> None:
        self.events.append(time.monotonic() if now is None else now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.events and self.events[0] < now - self.window:
            self.events.popleft()
        if len(self.events) >= 2:
            span = max(now - self.events[0], 1.0)
            self.last_rate = len(self.events) / span
        # Idle: the last measured rate still describes the Denoisers best.
        return self.last_rate or self.fallback


@dataclass
class WaitEstimate:
    steps_per_second: float
    running_steps: int  # steps left in the jobs being driven now
    queued_steps: int  # steps of the jobs waiting for a driver

    @property
    def wait_seconds(self) -> float:
        """Expected wait for a job submitted now (behind everything already accepted)."""
        return (self.running_steps + self.queued_steps) / self.steps_per_second

    def start_in(self, queued_steps_ahead: int) -> float:
        return (self.running_steps + queued_steps_ahead) / self.steps_per_second

    def retry_after(self, max_wait_seconds: float) -> int:
        """Seconds until the estimate should fall back under the limit (at least 1)."""
        return max(1, math.ceil(self.wait_seconds - max_wait_seconds))

    def to_dict(self) -> dict:
        return asdict(self)
