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

import argparse
import bisect
import math

from serving.autoscaling import MAX_UTILIZATION
from serving.cost_model import STAGE_NAMES, StageSeconds
from serving.simulate.cluster import STAGE_GPUS
from serving.simulate.profile import load_profile

from loadtests.arrivals import schedule
from loadtests.plan import plan
from loadtests.shapes import burst_phases

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


def main() -> None:
    """The bound's share of fixed-peak's GPU-hours on seeded peak hours of several lengths: the
    burst is the same in each (loadtests/shapes.py), so this is what the run's quiet share alone
    does to the ratio the experiment's goal is stated in."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--profile", default="h100-wan2.1-1.3b")
    parser.add_argument("--gpus", type=int, default=16)
    parser.add_argument("--slo", type=float, default=60.0)
    parser.add_argument("--minutes", type=float, nargs="+", default=[20.0, 30.0, 40.0, 60.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    args = parser.parse_args()
    the_plan = plan(load_profile(args.profile), args.gpus, args.slo)
    auto, peak = the_plan.arms["autoscaling"], the_plan.arms["fixed-peak"]
    job = the_plan.job.seconds
    print(f"SIMULATED: {args.profile}, {args.gpus} GPUs; fixed-peak holds {peak.gpus():g} GPUs; the span is the first "
          "arrival to the last one plus one job's device time (the experiment's window ends at the last job's end)")
    print("| run minutes | burst share of the run | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|---|" + "---|" * len(args.seeds))
    for minutes in args.minutes:
        shares = []
        for seed in args.seeds:
            offsets = schedule("peak-hour", minutes, the_plan.base_rate_per_min, seed)
            span = offsets[-1] - offsets[0] + job.total
            bound = clairvoyant_gpu_hours(offsets, job, auto.replicas, span)
            shares.append(bound / (peak.gpus() * span / 3600.0))
        rise, _, _, end = burst_phases(minutes)
        print(f"| {minutes:g} | {end - rise:.0%} | " + " | ".join(f"{share:.1%}" for share in shares) + " |")


if __name__ == "__main__":
    main()
