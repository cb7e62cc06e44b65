"""Seeded arrival schedules: the same jobs at the same offsets for every arm of an experiment.

A shape (loadtests/shapes.py) times a base rate is an inhomogeneous Poisson process; it is
sampled by thinning (draw at the peak rate, keep each arrival with probability rate/peak), so
one seed gives one schedule, whatever service it is later replayed against.
"""

from __future__ import annotations

import random

from loadtests.shapes import PEAK_MULTIPLIER, SHAPES


def schedule(shape: str, minutes: float, base_rate_per_min: float, seed: int) -> list[float]:
    """Arrival offsets in seconds since the start (uncompressed), ascending."""
    multiplier, duration = SHAPES[shape], minutes * 60.0
    rng = random.Random(seed)
    peak_per_s = base_rate_per_min * PEAK_MULTIPLIER / 60.0
    offsets, t = [], 0.0
    while True:
        t += rng.expovariate(peak_per_s)
        if t >= duration:
            return offsets
        if rng.random() * PEAK_MULTIPLIER < multiplier(t / duration, minutes):
            offsets.append(t)
