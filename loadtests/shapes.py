"""Traffic shapes: the arrival-rate multiplier over a run's fraction (0..1) for a run of so
many minutes, free of Locust so that seeded schedules (loadtests/arrivals.py) and reports can use
them without its patching."""

from __future__ import annotations

PEAK_MULTIPLIER = 4.0  # the highest any shape goes

# The peak hour's burst, as the issue describing it has it: rising to 4x within two minutes,
# holding, falling back. It lasts these minutes whatever the run's length (a longer run is more
# quiet around the same burst, not a slower burst); a run shorter than 20 minutes compresses it.
BURST_UP_MIN, BURST_HOLD_MIN, BURST_DOWN_MIN = 2.0, 5.0, 2.0
BURST_FULL_LENGTH_RUN_MIN = 20.0  # the shortest run that holds the burst at its full length
QUIET_LEAD = 0.30  # share of the run before the burst starts


def steady(fraction: float, minutes: float = BURST_FULL_LENGTH_RUN_MIN) -> float:
    return 1.0


def ramp(fraction: float, minutes: float = BURST_FULL_LENGTH_RUN_MIN) -> float:
    """From the base rate up to 4x, linearly over the whole run."""
    return 1.0 + (PEAK_MULTIPLIER - 1.0) * fraction


def burst_phases(minutes: float) -> tuple[float, float, float, float]:
    """The peak hour's burst as run fractions: rise starts, peak starts, fall starts, fall ends.
    A 20-minute run: 30 % quiet, 10 % up, 25 % at peak, 10 % down, 25 % quiet."""
    squeeze = min(1.0, minutes / BURST_FULL_LENGTH_RUN_MIN)
    up, hold, down = (m * squeeze / minutes for m in (BURST_UP_MIN, BURST_HOLD_MIN, BURST_DOWN_MIN))
    return QUIET_LEAD, QUIET_LEAD + up, QUIET_LEAD + up + hold, QUIET_LEAD + up + hold + down


def peak_hour(fraction: float, minutes: float = BURST_FULL_LENGTH_RUN_MIN) -> float:
    """Quiet, a 4x burst (2 min up, 5 at peak, 2 down), then quiet again until the run ends."""
    rise, peak, fall, end = burst_phases(minutes)
    if fraction < rise or fraction >= end:
        return 1.0
    if fraction < peak:
        return 1.0 + (PEAK_MULTIPLIER - 1.0) * (fraction - rise) / (peak - rise)
    if fraction < fall:
        return PEAK_MULTIPLIER
    return PEAK_MULTIPLIER - (PEAK_MULTIPLIER - 1.0) * (fraction - fall) / (end - fall)


SHAPES = {"steady": steady, "ramp": ramp, "peak-hour": peak_hour}
