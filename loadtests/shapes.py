"""Traffic shapes: the arrival-rate multiplier over a run's fraction (0..1), free of Locust so
that seeded schedules (loadtests/arrivals.py) and reports can use them without its patching."""

from __future__ import annotations


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


SHAPES = {"steady": steady, "ramp": ramp, "peak-hour": peak_hour}
PEAK_MULTIPLIER = 4.0  # the highest any shape goes
