"""The policy replay (loadtests/policy_replay.py): the Denoiser's real autoscaling policy, and
Serve's delay logic around it, on the experiment's seeded peak in simulated time. No Ray
cluster: a second a run, so CI holds the policy to the peak's shape on every change."""

from __future__ import annotations

import pytest

from loadtests.arrivals import schedule
from loadtests.plan import plan
from loadtests.policy_replay import ReplaySetup, replay
from serving.simulate.profile import load_profile

SLO_S = 60.0


@pytest.fixture(scope="module")
def peak():
    """The live experiment's plan and arrivals (16 GPUs, 20 minutes, seed 0: 130 jobs)."""
    the_plan = plan(load_profile("h100-wan2.1-1.3b"), 16, SLO_S)
    return the_plan, schedule("peak-hour", 20.0, the_plan.base_rate_per_min, 0)


def setup_of(the_plan) -> ReplaySetup:
    arm = the_plan.arms["autoscaling"]
    return ReplaySetup(job_s=the_plan.job.seconds.denoiser, target_s=arm.target_queue_wait_s,
                       min_replicas=arm.replicas["denoiser"], max_replicas=arm.max_replicas["denoiser"])


def test_the_denoiser_follows_the_peak_up_and_back_down(peak):
    the_plan, offsets = peak
    setup = setup_of(the_plan)
    result = replay(offsets, setup)
    assert len(result.waits) == len(offsets) == 130  # every job ran
    targets = {t: target for t, _held, target, _wanted in result.timeline}
    burst = [target for t, target in targets.items() if 8 * 60 <= t <= 13 * 60]  # the 4x plateau
    quiet = [target for t, target in targets.items() if t <= 5 * 60]
    assert max(quiet) <= 5 and min(burst) >= 2 * setup.min_replicas
    assert max(burst) == setup.max_replicas  # the ramp's backlog takes it to the ceiling
    assert result.timeline[-1][2] == setup.min_replicas  # back at the base after the burst
    assert result.p95() <= SLO_S and result.attainment(SLO_S) >= 0.95


def test_a_replica_asked_for_holds_its_gpu_through_start_up():
    """One job at t=0 on one replica that cannot scale: GPU-seconds are the replica's for the
    job's length; a slower start of replicas added later is paid for while they start."""
    one = replay([0.0], ReplaySetup(job_s=40.0, min_replicas=1, max_replicas=1))
    assert one.waits == [0.0] and one.gpu_hours * 3600 == pytest.approx(40.0, abs=1.0)
    # Ten jobs at once, room for ten replicas starting in 20 s: the nine extra replicas hold
    # their GPUs from the moment they are asked for, starting included.
    burst = replay([0.0] * 10, ReplaySetup(job_s=40.0, min_replicas=1, max_replicas=10, startup_s=20.0,
                                           policy_startup_s=5.0, target_s=10.0, upscale_delay_s=0.0))
    assert burst.max_replicas == 10
    assert max(burst.waits) >= 20.0  # the last jobs waited for a replica to start
    assert burst.gpu_hours * 3600 >= 40.0 * 10 + 20.0 * 9 * 0.9
