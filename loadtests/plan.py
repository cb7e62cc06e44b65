"""The peak-hour experiment's arms, sized from a cost profile and a GPU budget.

The job is the profile's model's default clip (for h100-wan2.1-1.3b: Wan2.1-1.3B, 832x480,
5 s at 16 fps, 50 steps, CFG), priced per stage by the profile (serving/cost_model.py). A
stage sized for an arrival rate gets enough replicas to be busy at most `UTILIZATION` of the
time (the usual planning headroom: queues grow steeply beyond it). The base rate is chosen so
that the largest fixed-base arm whose 4x peak sizing still fits the budget is exactly sized
for it; then:

- fixed-base: every stage sized for the base rate, no autoscaling;
- fixed-peak: every stage sized for 4x the base rate, no autoscaling;
- autoscaling: each stage from its base size up to what the budget holds (every replica of
  every stage at its max fits the `gpus` at once), on its queue-wait policy
  (serving/autoscaling.py) with target `slo / 2`: the other half of the SLO is for what the
  policy cannot see coming (metric push periods, a replica's start-up);
- fixed-peak-4gpu: fixed-peak with its Denoiser GPUs as replicas of 4 (sequence parallel,
  serving/parallel/; the profile's `parallel.speedup`): fewer, faster replicas on the same GPUs,
  every forward split over its gang;
- fixed-peak-4gpu-by-load: the same gangs laying out each forward by load
  (serving/parallel/layout.py): a gang takes up to 4 jobs at once, splits a lone job across
  its GPUs and gives each GPU whole jobs of its own when it holds several.

The Denoiser runs one job per replica (`engine.max_batch: 1`; a by-load gang one per GPU): at 480p x 81 frames a DiT
forward is compute-bound (the profile's time is linear in rows), so a batch would not raise
throughput, only hide queueing inside slower steps of jobs already "started". The Denoiser and
the VAE decoder, which do one thing at a time, take one call at a time
(`max_ongoing_requests: 1`), so waiting work stays at Serve's handles, where any replica takes
it, a newly added one included, and not inside a busy replica's own queue (with Serve's default
of several, a scale-up left the new replicas idle while the old ones worked through their
queues one by one). A replica's start-up is the profile's (`startup_seconds`), as an operator
who knows the hardware would set it: measured on this machine it would include the CPU's
process start-up, multiplied by the time scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serving.config import GenerationConfig
from serving.cost_model import STAGE_NAMES, StageSeconds, spec_seconds
from serving.models.presets import PRESETS
from serving.pipeline.spec import build_spec
from serving.simulate.cluster import STAGE_GPUS, node_resource
from serving.simulate.profile import CostProfile

from loadtests.shapes import PEAK_MULTIPLIER

UTILIZATION = 0.75
ARM_NAMES = ("fixed-base", "fixed-peak", "autoscaling", "fixed-peak-4gpu", "fixed-peak-4gpu-by-load")
GANG = 4  # fixed-peak-4gpu: fixed-peak's Denoiser GPUs as replicas of this many (serving/parallel/)
AUX_SHARE = 0.01  # of node 0's pinning resource per encoder/decoder replica (100 fit)
ONE_AT_A_TIME = ("denoiser", "vae_decoder")  # stages whose replica runs one call at a time
PROMPT = "a paper boat drifting down a rain-soaked street at dusk"


@dataclass(frozen=True)
class Job:
    body: dict  # the POST /v1/videos body, all but the prompt from the preset's defaults
    seconds: StageSeconds  # uncompressed device seconds per stage, from the profile


@dataclass(frozen=True)
class Arm:
    name: str
    replicas: dict[str, int]  # fixed: the replicas; autoscaling: the minimum
    max_replicas: dict[str, int] = field(default_factory=dict)  # autoscaling only
    target_queue_wait_s: float = 0.0  # autoscaling only
    denoiser_degree: int = 1  # GPUs per Denoiser replica (sequence parallel: stages.denoiser.parallel)
    denoiser_speedup: float = 1.0  # the profile's DiT speed-up on that many
    denoiser_layout: str = "split"  # stages.denoiser.parallel.layout of a gang

    @property
    def autoscaling(self) -> bool:
        return bool(self.max_replicas)

    def gpus(self, replicas: dict[str, float] | None = None) -> float:
        """GPUs `replicas` hold (default: this arm's fixed or minimum replicas)."""
        replicas = self.replicas if replicas is None else replicas
        return sum(STAGE_GPUS[stage] * n * (self.denoiser_degree if stage == "denoiser" else 1)
                   for stage, n in replicas.items())

    @property
    def jobs_per_denoiser(self) -> int:
        """Jobs one Denoiser replica takes at once: one, or one per GPU of a by-load gang."""
        return self.denoiser_degree if self.denoiser_layout == "by_load" else 1

    def busy_gpu_seconds(self, job: "Job") -> float | None:
        """GPU-seconds one video keeps this arm's GPUs busy: a gang's Denoiser holds all its
        GPUs for the shorter, parallel denoise. None for a by-load gang, whose share depends on
        how many jobs each forward held (the report takes the jobs' own usage instead)."""
        if self.denoiser_layout == "by_load":
            return None
        return sum(job.seconds.of(s) * STAGE_GPUS[s] * (self.denoiser_degree / self.denoiser_speedup
                                                          if s == "denoiser" else 1) for s in STAGE_NAMES)

    def config(self, data_dir: str, profile: CostProfile) -> dict:
        """The `ditserve serve --config` YAML (as a dict) of this arm, times uncompressed."""
        stages = {}
        for stage in STAGE_NAMES:
            if self.autoscaling:
                stages[stage] = {"autoscaling": {"min_replicas": self.replicas[stage],
                                                 "max_replicas": self.max_replicas[stage],
                                                 "target_queue_wait_seconds": self.target_queue_wait_s,
                                                 "startup_seconds": profile.startup_seconds(stage)}}
            else:
                stages[stage] = {"num_replicas": self.replicas[stage]}
            if stage in ONE_AT_A_TIME:
                stages[stage]["max_ongoing_requests"] = self.jobs_per_denoiser if stage == "denoiser" else 1
        if self.denoiser_degree > 1:
            stages["denoiser"]["parallel"] = {"ulysses": self.denoiser_degree, "layout": self.denoiser_layout}
            # A gang needs all its GPUs on one node: the encoder and decoder (half a GPU each)
            # share the first node, as the prod-4gpu overlay gives them a worker group of their
            # own; spread by Ray's scheduler they left no node whole for the third gang.
            for stage in ("text_encoder", "vae_decoder"):
                stages[stage]["resources"] = {node_resource(0): AUX_SHARE}
        return {"engine": {"max_batch": self.jobs_per_denoiser}, "stages": stages,
                "storage": {"job_store_url": f"sqlite:///{data_dir}/jobs.db", "artifacts_url": f"{data_dir}/artifacts"}}


@dataclass(frozen=True)
class Plan:
    gpus: int
    base_rate_per_min: float
    job: Job
    arms: dict[str, Arm]


class PlanError(ValueError):
    pass


def default_job(profile: CostProfile, cache: str = "off") -> Job:
    """The experiment's job. With `cache` the requests ask for step caching, while the job's
    `seconds` (which size the arms and the clairvoyant bound) stay those of the uncached job:
    the same fleet, to show what caching does to its capacity."""
    preset = PRESETS[profile.model]
    spec = build_spec(preset, GenerationConfig(), PROMPT, cache=cache)
    body = {"prompt": PROMPT, "size": f"{spec.width}x{spec.height}", "seconds": f"{spec.seconds:g}",
            "num_inference_steps": spec.num_inference_steps}
    if spec.cache_threshold:
        body["cache"] = cache
    return Job(body, spec_seconds(profile, preset.geometry, spec))


def replicas_for(rate_per_s: float, seconds: float) -> int:
    """Replicas busy at most UTILIZATION of the time at this rate (at least one)."""
    return max(1, math.ceil(rate_per_s * seconds / UTILIZATION - 1e-9))


# The autoscaling arm's queue-wait target, as a share of the SLO: the policy drains the whole
# backlog within its target, while the SLO bounds the p95, so the target may sit below it.
TARGET_SHARE_OF_SLO = 0.5


def plan(profile: CostProfile, gpus: int, slo_s: float, target_s: float | None = None, cache: str = "off") -> Plan:
    """`target_s`: the autoscaling arm's target queue wait (default TARGET_SHARE_OF_SLO x SLO);
    `cache`: the step caching the jobs ask for (see `default_job`)."""
    target_s = TARGET_SHARE_OF_SLO * slo_s if target_s is None else target_s
    job = default_job(profile, cache)
    for base_denoisers in range(max(1, gpus // int(PEAK_MULTIPLIER)), 0, -1):
        rate = UTILIZATION * base_denoisers / job.seconds.denoiser  # jobs/s the base Denoisers are sized for
        base = {s: replicas_for(rate, job.seconds.of(s)) for s in STAGE_NAMES}
        peak = {s: replicas_for(PEAK_MULTIPLIER * rate, job.seconds.of(s)) for s in STAGE_NAMES}
        ceiling = {s: max(peak[s], 2) for s in ("text_encoder", "vae_decoder")}
        ceiling["denoiser"] = math.floor((gpus - sum(STAGE_GPUS[s] * n for s, n in ceiling.items()))
                                         / STAGE_GPUS["denoiser"])
        fixed_peak = Arm("fixed-peak", peak)
        if fixed_peak.gpus() <= gpus and ceiling["denoiser"] >= peak["denoiser"]:
            arms = [Arm("fixed-base", base), fixed_peak,
                    Arm("autoscaling", base, {s: ceiling[s] for s in STAGE_NAMES}, target_s)]
            if profile.parallel is not None and str(GANG) in profile.parallel.speedup:
                # The same Denoiser GPUs (rounded up to whole gangs) as fewer, faster replicas.
                gangs = {**peak, "denoiser": math.ceil(peak["denoiser"] / GANG)}
                for name, layout in (("fixed-peak-4gpu", "split"), ("fixed-peak-4gpu-by-load", "by_load")):
                    arms.append(Arm(name, gangs, denoiser_degree=GANG, denoiser_speedup=profile.parallel_speedup(GANG),
                                    denoiser_layout=layout))
            return Plan(gpus, round(rate * 60.0, 4), job, {arm.name: arm for arm in arms})
    raise PlanError(f"{gpus} GPUs cannot hold a fixed-peak arm ({PEAK_MULTIPLIER:g}x one base Denoiser plus the "
                    f"other stages); give --gpus {int(PEAK_MULTIPLIER) + 2} or more")
