"""Arrival profiles as Locust load shapes, scaled to any duration.

Each user submits jobs at Poisson intervals without waiting for them (an open model: the
arrival rate does not drop when the service slows down, as with real users at peak hour).
The shape sets how many such users exist, so the arrival rate is
`users x per-user rate`, and a profile is just the rate multiplier over the run's fraction.
"""

from __future__ import annotations

import math

from locust import LoadTestShape

from loadtests.shapes import SHAPES

BASE_USERS = 2  # users at multiplier 1; the per-user rate makes up the requested base rate


PROFILES = SHAPES  # the names `--profile` takes


class ArrivalShape(LoadTestShape):
    def __init__(self, profile: str, duration_s: float):
        super().__init__()
        self.multiplier = PROFILES[profile]
        self.duration_s = duration_s

    def users_at(self, seconds: float) -> int:
        fraction = min(seconds / self.duration_s, 1.0)
        return max(1, math.ceil(BASE_USERS * self.multiplier(fraction, self.duration_s / 60.0)))

    def tick(self):
        elapsed = self.get_run_time()
        if elapsed >= self.duration_s:
            return None
        return self.users_at(elapsed), 10.0  # spawn fast: the profile, not the ramp-up, shapes the load
