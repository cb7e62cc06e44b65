"""The clairvoyant bound: the fewest GPU-hours an autoscaler with our sizing rule could hold an
arm's arrivals with (a policy may spend less only by letting replicas run busier than the rule,
and its queue waits grow).

An autoscaler reacts: it sees work only once it has arrived, and a replica it adds holds its GPU
through start-up before it helps. The bound has neither cost. It knows the whole schedule in
advance, and in every second it holds, per stage, exactly the replicas the arrivals of the
window around that second keep busy at most `MAX_UTILIZATION` (the sizing rule of
serving/autoscaling.py's arrival-rate floor), never fewer than the arm's minimum, each ready at
once. What the autoscaling arm spends above it is the price of reacting; what the bound itself
spends against fixed-peak says how much any policy with that sizing rule could save on this
schedule.
"""

from __future__ import annotations

import bisect
import math

from serving.autoscaling import MAX_UTILIZATION
from serving.cost_model import STAGE_NAMES, StageSeconds
from serving.simulate.cluster import STAGE_GPUS

RATE_WINDOW_S = 60.0  # the autoscaler's own default `inflow_window_s`


def clairvoyant_gpu_hours(offsets: list[float], job: StageSeconds, minimum: dict[str, int], span_s: float,
                          window_s: float = RATE_WINDOW_S, utilization: float = MAX_UTILIZATION) -> float:
    """GPU-hours from the first arrival for `span_s` (uncompressed seconds; `offsets` ascending)."""
    if not offsets:
        return 0.0
    start, gpu_seconds = offsets[0], 0.0
    for second in range(math.ceil(span_s)):
        middle = start + second + 0.5
        arrivals = (bisect.bisect_right(offsets, middle + window_s / 2)
                    - bisect.bisect_right(offsets, middle - window_s / 2))
        for stage in STAGE_NAMES:
            busy = arrivals * job.of(stage) / window_s
            replicas = max(minimum[stage], math.ceil(busy / utilization - 1e-9))
            gpu_seconds += replicas * STAGE_GPUS[stage] * min(1.0, span_s - second)
    return gpu_seconds / 3600.0
