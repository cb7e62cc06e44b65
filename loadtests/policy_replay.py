"""Replay the Denoiser's autoscaling policy on a seeded arrival schedule in simulated time.

A live experiment (loadtests/experiment.py) takes 15 minutes an arm on this machine; this
replay takes a second, so a policy change can be judged on the same seeded peak before it
is run live, and a test can hold the policy to the peak's shape. It is a model, and says so:

- **What is real:** the policy (serving/autoscaling.py's `StagePolicy`, called with Ray
  Serve's own `AutoscalingContext`) and Serve's delay logic around it (its
  `_apply_scaling_factors` and `_apply_delay_logic`, called with the replay's clock).
- **What is modelled:** one Denoiser stage, one job per replica (the experiment's
  `max_ongoing_requests: 1`), jobs taken first come first served by any free replica; each
  job costs the profile's denoise seconds; a replica is ready `startup_s` after it is asked
  for (the live run measured 18.8-19.5 s against the profile's 11.2 s, so that is the
  default); replicas record their stats every 4 s and push every 10 s, and the controller
  sees the mean over the 20 s look-back (ditserve's and Serve's defaults); jobs waiting are published as
  pending work every 3 s (the Director's 1 s period at the experiment's 3x); scale-down
  stops starting replicas first, then the newest running ones (Serve's order on one node),
  and a stopping replica holds its GPU until its job ends.
- **Not modelled:** the text encoder and VAE decoder, metric jitter, CPU contention.

So its GPU-hours are the Denoiser's alone, in uncompressed seconds, and every figure from it
is SIMULATED twice: no model, and no Serve. **Where it was wrong:** it said that dropping
Serve's 60 s downscale delay saves 11 % of the Denoisers' GPU-hours at a p95 of ~22 s; the
live run (docs/benchmarks.md, 2026-12-04) scaled down mid-peak (14 -> 9) and back up, and its
new replicas took up to 90 s to become healthy, not 19: seven replicas starting at once on
two cores at 3x. It saved 6 % and missed the SLO (p95 61.5 s). A change the replay favours
still has to be run live.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_delay_logic, _apply_scaling_factors
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serving.autoscaling import StagePolicy
from serving.cluster_env import SERVE_METRICS_PUSH_DEFAULT_S
from serving.config import AutoscalingConfig as AutoscalingSettings
from serving.backlog import PendingWork, StageWork

# What ditserve gives Serve: its default look-back, Serve's default push period, and Serve's
# record interval (a fifth of the look-back: RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR).
LOOK_BACK_S = AutoscalingSettings().look_back_period_s
PUSH_S = SERVE_METRICS_PUSH_DEFAULT_S
RECORD_S = min(0.2 * LOOK_BACK_S, PUSH_S)
PENDING_PUBLISH_S = 3.0  # the Director's 1 s, uncompressed at the experiment's 3x


@dataclass(frozen=True)
class ReplaySetup:
    job_s: float = 43.1  # denoise seconds of one job (h100-wan2.1-1.3b, 480p 5 s)
    steps: int = 50
    startup_s: float = 19.0  # until a new replica takes work
    policy_startup_s: float = 11.2  # what the policy is told (the profile's)
    target_s: float = 30.0
    min_replicas: int = 3
    max_replicas: int = 14
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    tick_s: float = 0.5


@dataclass
class Replica:
    index: int
    asked_at: float
    ready_at: float
    job_ends_at: float | None = None
    stopping: bool = False
    samples: list[tuple[float, dict]] = field(default_factory=list)
    published: dict | None = None

    def ready(self, now: float) -> bool:
        return now >= self.ready_at

    def stats(self, now: float, setup: ReplaySetup) -> dict:
        left = max(0.0, self.job_ends_at - now) if self.job_ends_at is not None else 0.0
        running = 1.0 if self.job_ends_at is not None else 0.0
        return {"backlog_seconds": left, "waiting": 0.0, "running": running, "busy": running, "oldest_wait_s": 0.0,
                "seconds_per_job": setup.job_s, "seconds_per_step": setup.job_s / setup.steps,
                "startup_seconds": self.ready_at - self.asked_at}


@dataclass
class ReplayResult:
    waits: list[float]  # queue wait of every job, arrival to denoising start
    gpu_hours: float  # the Denoiser's, from the first arrival until the last job ends
    max_replicas: int
    timeline: list[tuple[float, int, int, int]]  # (seconds, replicas holding a GPU, target, wanted)

    def p95(self) -> float:
        return statistics.quantiles(self.waits, n=100, method="inclusive")[94] if len(self.waits) > 1 else 0.0

    def attainment(self, slo_s: float) -> float:
        return sum(w <= slo_s for w in self.waits) / len(self.waits) if self.waits else 1.0


def replay(offsets: list[float], setup: ReplaySetup = ReplaySetup(), policy: StagePolicy | None = None) -> ReplayResult:
    """Every job of `offsets` (seconds, ascending) through a Denoiser stage scaled by `policy`."""
    policy = policy or StagePolicy("denoiser", setup.target_s, startup_seconds=setup.policy_startup_s)
    deployment = DeploymentID(name="denoiser", app_name="replay")
    config = AutoscalingConfig(min_replicas=setup.min_replicas, max_replicas=setup.max_replicas,
                               upscale_delay_s=setup.upscale_delay_s, downscale_delay_s=setup.downscale_delay_s,
                               look_back_period_s=LOOK_BACK_S)
    replicas = [Replica(i, -setup.startup_s, 0.0) for i in range(setup.min_replicas)]
    next_index, target, state = setup.min_replicas, setup.min_replicas, {}
    queue: list[float] = []  # arrival times of jobs waiting, oldest first
    waits, timeline, gpu_seconds, max_held = [], [], 0.0, 0
    pending = PendingWork()
    policy.read_pending = lambda _app: pending
    arrived, now, wanted = 0, 0.0, target
    while arrived < len(offsets) or queue or any(r.job_ends_at is not None for r in replicas):
        while arrived < len(offsets) and offsets[arrived] <= now:
            queue.append(offsets[arrived])
            arrived += 1
        # Jobs end; a stopping replica goes once it holds none.
        for replica in replicas:
            if replica.job_ends_at is not None and replica.job_ends_at <= now:
                replica.job_ends_at = None
        replicas = [r for r in replicas if not (r.stopping and r.job_ends_at is None)]
        for replica in sorted(replicas, key=lambda r: r.ready_at):
            if queue and replica.ready(now) and not replica.stopping and replica.job_ends_at is None:
                waits.append(now - queue.pop(0))
                replica.job_ends_at = now + setup.job_s
        # What the controller sees: per replica, the mean of its samples over the look-back at its last push.
        for replica in replicas:
            if not replica.ready(now):
                continue
            age = now - replica.ready_at
            if age % RECORD_S < setup.tick_s:
                replica.samples.append((now, replica.stats(now, setup)))
                replica.samples = [s for s in replica.samples if now - s[0] <= LOOK_BACK_S]
            if age % PUSH_S < setup.tick_s and replica.samples:
                names = replica.samples[0][1]
                replica.published = {n: sum(s[1][n] for s in replica.samples) / len(replica.samples) for n in names}
        if now % PENDING_PUBLISH_S < setup.tick_s:
            pending = PendingWork({"denoiser": StageWork(len(queue), len(queue) * setup.steps)}, at=now)
        reporting = [r for r in replicas if r.published is not None and not r.stopping]
        ids = [ReplicaID(unique_id=f"r{r.index}", deployment_id=deployment) for r in reporting]
        metrics: dict[str, dict] = {}
        for replica_id, replica in zip(ids, reporting):
            for name, value in replica.published.items():
                metrics.setdefault(name, {})[replica_id] = value
        running = sum(1 for r in replicas if r.ready(now) and not r.stopping)
        ctx = AutoscalingContext(
            deployment_id=deployment, deployment_name="denoiser", app_name="replay", current_num_replicas=running,
            target_num_replicas=target, running_replicas=ids, total_num_requests=0.0, total_queued_requests=0.0,
            aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=setup.min_replicas,
            capacity_adjusted_max_replicas=setup.max_replicas, policy_state=state, last_scale_up_time=None,
            last_scale_down_time=None, current_time=now, config=config)
        wanted, state = policy(ctx)
        decided = _apply_scaling_factors(wanted, running, config)
        decided, state = _apply_delay_logic(decided, target, config, state, _now=now)
        target = min(setup.max_replicas, max(setup.min_replicas, decided))
        # Serve moves the replicas to the target: new ones start, surplus ones stop (starting ones first).
        active = [r for r in replicas if not r.stopping]
        for _ in range(target - len(active)):
            replicas.append(Replica(next_index, now, now + setup.startup_s))
            next_index += 1
        if len(active) > target:
            order = sorted(active, key=lambda r: (r.ready(now), -r.index))
            for replica in order[:len(active) - target]:
                replica.stopping = True
            replicas = [r for r in replicas if not (r.stopping and r.job_ends_at is None)]
        held = len(replicas)
        max_held = max(max_held, held)
        if offsets and now >= offsets[0]:
            gpu_seconds += held * setup.tick_s
        if now % 5.0 < setup.tick_s:
            timeline.append((now, held, target, int(wanted)))
        now += setup.tick_s
    return ReplayResult(waits, gpu_seconds / 3600.0, max_held, timeline)


def main() -> None:
    """`python -m loadtests.policy_replay`: a table of seeds x Serve downscale delays."""
    import argparse

    from loadtests.arrivals import schedule
    from loadtests.plan import plan
    from serving.simulate.profile import load_profile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="h100-wan2.1-1.3b")
    parser.add_argument("--gpus", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--slo", type=float, default=60.0)
    parser.add_argument("--target-seconds", type=float)
    parser.add_argument("--startup", type=float, default=ReplaySetup.startup_s,
                        help="seconds until a new replica takes work (default: what the live run measured)")
    parser.add_argument("--downscale-delays", type=float, nargs="+", default=[60.0, 0.0],
                        help="Serve's downscale_delay_s values to compare (default: the config's 60, and none)")
    args = parser.parse_args()
    the_plan = plan(load_profile(args.profile), args.gpus, args.slo, args.target_seconds)
    arm, peak = the_plan.arms["autoscaling"], the_plan.arms["fixed-peak"].replicas["denoiser"]
    print(f"SIMULATED: {args.profile}, a model of Serve (loadtests/policy_replay.py); the Denoiser only; "
          "uncompressed seconds")
    print("| seed | jobs | downscale delay s | p95 queue wait s | SLO attainment | most replicas holding a GPU | "
          "Denoiser GPU-h | share of fixed-peak's Denoisers |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        offsets = schedule("peak-hour", args.minutes, the_plan.base_rate_per_min, seed)
        fixed = peak * (offsets[-1] - offsets[0] + the_plan.job.seconds.denoiser) / 3600.0
        for delay in args.downscale_delays:
            setup = ReplaySetup(job_s=the_plan.job.seconds.denoiser, target_s=arm.target_queue_wait_s,
                                min_replicas=arm.replicas["denoiser"], max_replicas=arm.max_replicas["denoiser"],
                                startup_s=args.startup, downscale_delay_s=delay)
            result = replay(offsets, setup)
            print(f"| {seed} | {len(offsets)} | {delay:g} | {result.p95():.1f} | {result.attainment(args.slo):.0%} | "
                  f"{result.max_replicas} | {result.gpu_hours:.2f} | {result.gpu_hours / fixed:.0%} |")


if __name__ == "__main__":
    main()
