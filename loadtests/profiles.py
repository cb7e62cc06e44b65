"""Arrival profiles as Locust load shapes, scaled to any duration.

Each user submits jobs at Poisson intervals without waiting for them (an open model: the
arrival rate does not drop when the service slows down, as with real users at peak hour).
The shape sets how many such users exist, so the arrival rate is
`users x per-user rate`, and a profile is just the rate multiplier over the run's fraction.
"""

from __future__ import annotations

import math

from locust import LoadTestShape

BASE_USERS = 2  # users at multiplier 1; the per-user rate makes up the requested base rate


def steady(fraction: float) -> float:
    return 1.0


def ramp(fraction: float) -> float:
    """From the base rate up to 4x, linearly over the whole run."""
    return 1.0 + 3.0 * fraction


def peak_hour(fraction: float) -> float:
    """Quiet, a 4x burst, then quiet again: 30% quiet, 10% up, 25% at peak, 10% down, 25% quiet."""
    if fraction < 0.30:
        return 1.0
    if fraction < 0.40:
        return 1.0 + 3.0 * (fraction - 0.30) / 0.10
    if fraction < 0.65:
        return 4.0
    if fraction < 0.75:
        return 4.0 - 3.0 * (fraction - 0.65) / 0.10
    return 1.0


PROFILES = {"steady": steady, "ramp": ramp, "peak-hour": peak_hour}


class ArrivalShape(LoadTestShape):
    def __init__(self, profile: str, duration_s: float):
        super().__init__()
        self.multiplier = PROFILES[profile]
        self.duration_s = duration_s

    def users_at(self, seconds: float) -> int:
        return max(1, math.ceil(BASE_USERS * self.multiplier(min(seconds / self.duration_s, 1.0))))

    def tick(self):
        elapsed = self.get_run_time()
        if elapsed >= self.duration_s:
            return None
        return self.users_at(elapsed), 10.0  # spawn fast: the profile, not the ramp-up, shapes the load
