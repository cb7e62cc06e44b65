"""Autoscaling. First the policy's decisions, as plain functions over the AutoscalingContext
Ray Serve builds (its own class): every stage scales up on its backlog in device-seconds,
start-up time decides whether a replica helps, idle stages scale down after the restart
break-even, and work still in the job store counts. Then, live on a second app in the local
cluster ("busy"): the Denoiser scales up during a burst and back down after it; a new job
that does not fit the queue budget is refused with 429 and Retry-After (more:
tests/test_admission.py). (tests/test_autoscaling_live.py runs the whole mechanism on its
own cluster.)"""

from __future__ import annotations

import math
import time

import openai
import pytest
import requests
from ray import serve
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from conftest import Service, wait_ready
from serving.app import _stage_options, build_app
from serving.autoscaling import MAX_UTILIZATION, StagePolicy, replicas_for
from serving.backlog import PendingWork, StageWork
from serving.config import ConfigError, StageConfig, load_config
from serving.cost_model import STAGE_NAMES
from serving.deployments.stage_load import StageLoad
from serving.jobs.records import JobRecord, JobStatus, Stage, new_job_id
from serving.jobs.store import JobStore

APP = "busy"
SLOW_JOB = dict(seconds="1", size="128x128", extra_body={"num_inference_steps": 100})
# Admission counts accelerator-seconds: a few of these fill the queue budget.
LARGE_JOB = {"seconds": "1", "size": "256x256", "num_inference_steps": 100}


# ---- the policy, over Serve's own context ------------------------------------------------


def context(stage: str, replica_stats: list[dict[str, float]], *, running: int | None = None, target: int | None = None,
            queued: float = 0.0, now: float = 1000.0, state: dict | None = None, downscale_delay_s: float = 0.0):
    """What the Serve controller hands a policy: per-replica metrics averaged over the window."""
    deployment = DeploymentID(name=stage, app_name="ditserve")
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=deployment) for i in range(len(replica_stats))]
    metrics: dict[str, dict] = {}
    for replica, stats in zip(replicas, replica_stats):
        for name, value in stats.items():
            metrics.setdefault(name, {})[replica] = value
    running = len(replicas) if running is None else running
    return AutoscalingContext(
        deployment_id=deployment, deployment_name=stage, app_name="ditserve", current_num_replicas=running,
        target_num_replicas=running if target is None else target, running_replicas=replicas,
        total_num_requests=queued + sum(s.get("waiting", 0) + s.get("running", 0) for s in replica_stats),
        total_queued_requests=queued, aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=now,
        config=AutoscalingConfig(min_replicas=1, max_replicas=8, downscale_delay_s=downscale_delay_s))


def policy(stage: str, target: float = 10.0, startup: float | None = 0.0, pending: PendingWork | None = None):
    chosen = StagePolicy(stage, target, startup_seconds=startup, prior_seconds_per_step=0.01)
    chosen.read_pending = lambda _app: pending  # the snapshot a Director would publish
    return chosen


def busy_replica(backlog: float, per_job: float = 2.0, **more: float) -> dict[str, float]:
    return {"backlog_seconds": backlog, "waiting": backlog / per_job, "running": 1.0, "oldest_wait_s": 0.0,
            "seconds_per_job": per_job, "startup_seconds": 0.0, **more}


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_each_stage_scales_up_on_its_own_backlog(stage):
    # 40 s of work held, target 10 s: four replicas would start everything within the target.
    desired, state = policy(stage)(context(stage, [busy_replica(40.0)]))
    assert desired == 4 and state["backlog_seconds"] == pytest.approx(40.0)
    # Calls queued at the handles, in front of the replicas, count at the measured price.
    desired, _ = policy(stage)(context(stage, [busy_replica(10.0, per_job=2.0)], queued=15))
    assert desired == 4  # 10 + 15 x 2 = 40 s
    # Under the target: one replica is enough.
    assert policy(stage)(context(stage, [busy_replica(8.0)]))[0] == 1


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_the_oldest_waiter_past_the_target_adds_a_replica(stage):
    # Little work known (nothing measured yet), but a call has waited longer than the target.
    stats = busy_replica(3.0, oldest_wait_s=12.0)
    assert policy(stage)(context(stage, [stats]))[0] == 2


def test_start_up_time_decides_whether_a_new_replica_helps():
    # 30 s of work, target 10 s, one replica running.
    assert replicas_for(30.0, 1, 10.0, 0.0, 0.0) == 3  # instant replicas: ceil(30 / 10)
    # Ready in 5 s: the running one drains 5 s meanwhile; 25 s must go in the 5 s left of the target.
    assert replicas_for(30.0, 1, 10.0, 5.0, 0.0) == 5
    # Ready in 40 s: the running replica is done before a new one could start: none is added,
    # not even for a waiter past the target.
    assert replicas_for(30.0, 1, 10.0, 40.0, 0.0) == 1
    assert replicas_for(30.0, 1, 10.0, 40.0, 25.0) == 1
    # Ready in 20 s (target already lost): the 10 s still waiting then is what new replicas are for.
    assert replicas_for(30.0, 1, 10.0, 20.0, 0.0) == 2

    # The policy takes the start-up the replicas measured when none is configured ...
    slow_start = busy_replica(30.0, startup_seconds=40.0)
    assert policy("denoiser", startup=None)(context("denoiser", [slow_start]))[0] == 1
    assert policy("denoiser", startup=None)(context("denoiser", [busy_replica(30.0)]))[0] == 3
    # ... and the configured one over it.
    assert policy("denoiser", startup=0.0)(context("denoiser", [slow_start]))[0] == 3


def over_a_window(chosen: StagePolicy, replicas: int, busy: float, backlog_at, seconds: float = 60.0,
                  tick: float = 1.0) -> tuple[int, dict]:
    """Tick the policy for `seconds`: `replicas` each `busy`, holding `backlog_at(t)` device-seconds in all."""
    state: dict = {}
    for i in range(int(seconds / tick) + 1):
        t = i * tick
        stats = [busy_replica(backlog_at(t) / replicas, per_job=43.0, busy=busy) for _ in range(replicas)]
        desired, state = chosen(context("denoiser", stats, now=1000.0 + t, state=state))
    return desired, state


def test_a_stage_keeps_the_replicas_its_arriving_work_keeps_busy():
    """Steady peak traffic: 12 replicas, each busy 80 % of the time, the backlog steady (each job
    half done, 43 s a job). Priced by its backlog alone against a 30 s target the stage would want
    8; the work arriving keeps 9.6 replicas busy, so it keeps ceil(9.6 / 0.85) = 12."""
    assert replicas_for(12 * 21.5, 12, 30.0, 0.0, 0.0, job_s=43.0) == 8  # the backlog rule alone
    desired, state = over_a_window(policy("denoiser", target=30.0), 12, 0.8, lambda t: 12 * 21.5)
    assert state["inflow_replicas"] == pytest.approx(9.6)
    assert desired == math.ceil(9.6 / MAX_UTILIZATION) == 12
    # Before half a window is seen there is no rate yet, and the backlog rule alone decides.
    desired, state = over_a_window(policy("denoiser", target=30.0), 12, 0.8, lambda t: 12 * 21.5, seconds=20.0)
    assert (desired, state["inflow_replicas"]) == (8, 0.0)


def test_a_draining_queue_is_not_mistaken_for_arriving_work():
    """After a burst: 14 replicas all busy working off a queue that shrinks by 5 device-seconds a
    second. Work arrives for 14 - 5 = 9 replicas, so the stage may shrink to ceil(9 / 0.85) = 11
    while the queue drains; a floor on `busy` alone would ask for ceil(14 / 0.85) = 17, the
    maximum, until the queue was empty."""
    desired, state = over_a_window(policy("denoiser", target=30.0), 14, 1.0, lambda t: 600.0 - 5.0 * t)
    assert state["inflow_replicas"] == pytest.approx(9.0)
    assert desired == 11 < 14
    # A queue that grows while every replica works means more arrives than they do.
    desired, state = over_a_window(policy("denoiser", target=300.0), 12, 1.0, lambda t: 100.0 + 3.0 * t)
    assert state["inflow_replicas"] == pytest.approx(15.0)
    assert desired == math.ceil(15.0 / MAX_UTILIZATION)


def test_the_last_waiter_waits_only_for_the_work_ahead_of_it():
    """11 replicas each half-way through a 43 s job, 3 more jobs waiting: the last of them starts
    once the 236.5 s running and the two jobs before it (86 s) are done, (236.5 + 86) / 11 = 29 s,
    within a 30 s target, so 11 replicas are enough. Counting its own job too asked for 13."""
    backlog = 11 * 21.5 + 3 * 43.0
    assert replicas_for(backlog, 11, 30.0, 0.0, 0.0, job_s=43.0) == 11
    assert math.ceil(backlog / 30.0) == 13
    stats = [busy_replica(21.5, per_job=43.0)] * 10 + [busy_replica(21.5 + 3 * 43.0, per_job=43.0)]
    assert policy("denoiser", target=30.0)(context("denoiser", stats))[0] == 11


def test_idle_stage_scales_down_after_the_restart_break_even():
    idle = {"backlog_seconds": 0.0, "waiting": 0.0, "running": 0.0, "oldest_wait_s": 0.0, "seconds_per_job": 2.0,
            "startup_seconds": 0.0}
    # No start-up cost: an idle stage wants its minimum at once (Serve's downscale delay follows).
    assert policy("vae_decoder")(context("vae_decoder", [idle] * 3))[0] == 0
    # Replicas that take 30 s to start are kept 30 s in all: 20 s here, then Serve's 10 s delay.
    slow = policy("vae_decoder", startup=30.0)
    state: dict = {}
    for now, expected in ((1000.0, 3), (1019.0, 3), (1021.0, 0)):
        desired, state = slow(context("vae_decoder", [idle] * 3, now=now, state=state, downscale_delay_s=10.0))
        assert desired == expected, now
    # Work coming back resets the clock.
    desired, state = slow(context("vae_decoder", [busy_replica(30.0)] + [idle] * 2, now=1022.0, state=state,
                                  downscale_delay_s=10.0))
    assert desired == 3 and "fewer_since" not in state


def queued_job(steps: int, status: JobStatus = JobStatus.QUEUED, stage: Stage | None = None) -> JobRecord:
    now = time.time()
    spec = {"prompt": "p", "width": 64, "height": 64, "num_frames": 17, "fps": 16}
    return JobRecord(id=new_job_id(), created_at=now, status=status, model="tiny", spec=spec, stage=stage,
                     timestamps={"submitted_at": now}, num_steps=steps)


def test_work_in_the_job_store_reaches_every_stage_autoscaler(tmp_path):
    # Six jobs wait in the store (beyond the Director's window), one is being encoded, one
    # denoised: none is at a stage's replicas or handles yet, except where it is now.
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    for _ in range(6):
        store.create(queued_job(50))
    store.create(queued_job(50, JobStatus.IN_PROGRESS, Stage.TEXT_ENCODER))
    store.create(queued_job(50, JobStatus.IN_PROGRESS, Stage.DENOISER))
    pending = PendingWork.from_store(store)
    store.close()
    assert pending.of("text_encoder") == StageWork(jobs=6, steps=300)
    assert pending.of("denoiser") == StageWork(jobs=7, steps=350)
    assert pending.of("vae_decoder") == StageWork(jobs=8, steps=400)
    published = PendingWork.from_json(pending.to_json())  # what the policy reads back
    assert published == pending and published.fresh()

    # Every stage is idle, so only the store's work can make it scale up.
    def idle(**prices):
        return [{"backlog_seconds": 0.0, "waiting": 0.0, "running": 0.0, "oldest_wait_s": 0.0,
                 "startup_seconds": 0.0, **prices}]

    # Denoiser: 350 steps x 0.2 s = 70 s against a 10 s target.
    assert policy("denoiser", pending=published)(context("denoiser", idle(seconds_per_step=0.2)))[0] == 7
    assert policy("denoiser", pending=None)(context("denoiser", idle(seconds_per_step=0.2)))[0] == 0
    # VAE decoder: 8 decodes x 5 s = 40 s; text encoder: 6 encodes x 5 s = 30 s.
    assert policy("vae_decoder", pending=published)(context("vae_decoder", idle(seconds_per_job=5.0)))[0] == 4
    assert policy("text_encoder", pending=published)(context("text_encoder", idle(seconds_per_job=5.0)))[0] == 3
    # A snapshot no Director has refreshed for a while is not trusted.
    assert not PendingWork(pending.stages, at=time.time() - 60).fresh()


def test_a_replica_reports_what_it_holds():
    load = StageLoad()
    first, second, third = load.arrive(), load.arrive(), load.arrive()
    load.start(first)
    time.sleep(0.05)
    load.finish(first)  # measured: ~0.05 s a call
    load.start(second)
    stats = load.stats()
    assert stats["waiting"] == 1 and stats["running"] == 1
    assert stats["oldest_wait_s"] >= 0.05
    assert stats["seconds_per_job"] == pytest.approx(0.05, abs=0.04)
    assert 0 < stats["backlog_seconds"] <= 2 * stats["seconds_per_job"]
    assert stats["startup_seconds"] > 0
    load.charge(third, 0.01)  # a batched call is charged its share of the forward, not its wait
    load.finish(third)
    assert load.seconds_per_call < stats["seconds_per_job"]


def test_every_autoscaled_stage_gets_the_queue_wait_policy():
    for name in STAGE_NAMES:
        stage = StageConfig(autoscaling={"max_replicas": 3, "target_queue_wait_seconds": 7})
        scaling = _stage_options(name, stage)["autoscaling_config"]
        assert scaling["policy"]["policy_function"] == "serving.autoscaling:StagePolicy"
        assert scaling["policy"]["policy_kwargs"]["stage"] == name
        assert scaling["policy"]["policy_kwargs"]["target_queue_wait_s"] == 7
        assert "target_ongoing_requests" not in scaling  # not Serve's request-count default


def test_director_window_must_feed_every_replica_at_max_scale():
    with pytest.raises(ConfigError) as raised:
        load_config(None, environ={"DITSERVE_SERVER__MAX_RUNNING_JOBS": "16",
                                   "DITSERVE_STAGES__DENOISER__AUTOSCALING": "{max_replicas: 4}",
                                   "DITSERVE_STAGES__VAE_DECODER__NUM_REPLICAS": "2"})
    assert "server.max_running_jobs (16)" in str(raised.value) and "= 19" in str(raised.value)
    load_config(None, environ={"DITSERVE_SERVER__MAX_RUNNING_JOBS": "19",
                               "DITSERVE_STAGES__DENOISER__AUTOSCALING": "{max_replicas: 4}",
                               "DITSERVE_STAGES__VAE_DECODER__NUM_REPLICAS": "2"})


# ---- live: a second app on the session's cluster -------------------------------------------


@pytest.fixture(scope="module")
def busy(service, tmp_path_factory):
    data = tmp_path_factory.mktemp("busy")
    small = "{num_cpus: 0.1}"
    config = load_config(None, environ={
        "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{data}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": str(data / "artifacts"),
        "DITSERVE_SERVER__DIRECTOR_POLL_SECONDS": "0.2",
        "DITSERVE_SERVER__MAX_RUNNING_JOBS": "10",  # 2 x 4 + 1 + 1; beyond, jobs wait in the store's queue
        "DITSERVE_SERVER__GATEWAY_NUM_CPUS": "0.05", "DITSERVE_SERVER__DIRECTOR_NUM_CPUS": "0.05",
        "DITSERVE_STAGES__TEXT_ENCODER": small, "DITSERVE_STAGES__VAE_DECODER": small,
        "DITSERVE_STAGES__DENOISER": "{num_cpus: 0.1, autoscaling: {min_replicas: 1, max_replicas: 2, "
                                     "target_queue_wait_seconds: 2, startup_seconds: 0, upscale_delay_s: 0, "
                                     "downscale_delay_s: 10, "
                                     "look_back_period_s: 2}}",
        # The queue budget holds the burst's eight slow jobs at the preset's prior (~8 s each).
        "DITSERVE_ADMISSION__MAX_QUEUE_WAIT_SECONDS": "120",
    })
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    url = f"{service.url}/{APP}"
    wait_ready(url)
    yield Service(url, config, 0)
    serve.delete(APP)


def denoiser_replicas() -> int:
    """Replicas the autoscaler has asked for and not retired: starting or running."""
    states = serve.status().applications[APP].deployments["Denoiser"].replica_states
    return states.get("STARTING", 0) + states.get("RUNNING", 0)


def test_serve_holds_the_metric_push_period_the_app_was_built_with(busy):
    """The Denoiser's replicas push their backlog at the cluster's period (conftest: 1 s), not
    Serve's 10 s default, which would be five times the test's 2 s look-back."""
    from ray.serve.context import _get_global_client

    from serving.cluster_env import serve_metrics_push_seconds

    deployment = _get_global_client().get_serve_details()["applications"][APP]["deployments"]["Denoiser"]
    scaling = deployment["deployment_config"]["autoscaling_config"]
    assert scaling["metrics_interval_s"] == serve_metrics_push_seconds() == 1.0
    assert scaling["look_back_period_s"] == 2.0


def test_denoiser_scales_up_in_a_burst_and_down_after(busy):
    client = busy.client()
    assert denoiser_replicas() == 1
    burst = [client.videos.create(prompt=f"burst {i}", **SLOW_JOB).id for i in range(8)]
    peak, deadline = 1, time.monotonic() + 240
    while True:
        peak = max(peak, denoiser_replicas())
        videos = [client.videos.retrieve(i) for i in burst]
        if all(v.status in ("completed", "failed") for v in videos):
            break
        assert time.monotonic() < deadline, "the burst did not finish"
        time.sleep(0.5)
    assert all(v.status == "completed" for v in videos)
    assert peak == 2, "the Denoiser never scaled up during the burst"
    deadline = time.monotonic() + 90
    while denoiser_replicas() != 1:
        assert time.monotonic() < deadline, "the Denoiser did not scale back down after the burst"
        time.sleep(1)
    # The stopped replica tells the Director on its way out: /readyz lists one Denoiser within
    # 1.5 report periods, while its last report would lapse only 2-3 periods after the stop.
    from serving.deployments.denoiser import DENOISER_REPORT_SECONDS

    stopped, listed = time.monotonic(), None
    while time.monotonic() - stopped < 1.5 * DENOISER_REPORT_SECONDS:
        listed = requests.get(f"{busy.url}/readyz", timeout=30).json()["denoisers"]
        if len(listed) == 1:
            break
        time.sleep(0.5)
    assert listed is not None and len(listed) == 1, listed


def test_overload_is_429_with_retry_after_and_queued_jobs_show_their_start(busy):
    client = busy.client()
    accepted, refused = [], None
    for i in range(60):  # bounded: each job adds several seconds of denoising to the queue
        response = requests.post(f"{busy.url}/v1/videos", json={"prompt": f"load {i}", **LARGE_JOB})
        if response.status_code == 429:
            refused = response
            break
        assert response.status_code == 200, response.text
        accepted.append(response.json()["id"])
    try:
        assert refused is not None, "60 large jobs never filled the 120 s queue budget"
        retry_after = int(refused.headers["Retry-After"])
        error = refused.json()["error"]
        assert retry_after >= 1 and error["code"] == "queue_full" and "120 s" in error["message"]
        with pytest.raises(openai.RateLimitError):
            client.videos.create(prompt="one more", seconds="1", size="256x256",
                                 extra_body={"num_inference_steps": 100})
        print("accepted before 429:", len(accepted))
        # (Queued jobs' queue_position and estimated_start_at: tests/test_admission.py.)
    finally:
        for video_id in accepted:
            requests.post(f"{busy.url}/v1/videos/{video_id}/cancel")
