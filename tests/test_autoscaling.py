"""Autoscaling and admission control on a second app in the local cluster ("busy"): the
Denoiser scales up during a burst and back down after it; a new job that does not fit the
queue budget is refused with 429 and Retry-After (more: tests/test_admission.py)."""

from __future__ import annotations

import time

import openai
import pytest
import requests
from ray import serve

from conftest import Service, wait_ready
from serving.app import build_app
from serving.config import load_config

APP = "busy"
SLOW_JOB = dict(seconds="1", size="128x128", extra_body={"num_inference_steps": 100})
# Admission counts accelerator-seconds: a few of these fill the queue budget.
LARGE_JOB = {"seconds": "1", "size": "256x256", "num_inference_steps": 100}


@pytest.fixture(scope="module")
def busy(service, tmp_path_factory):
    data = tmp_path_factory.mktemp("busy")
    small = "{num_cpus: 0.1}"
    config = load_config(None, environ={
        "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{data}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": str(data / "artifacts"),
        "DITSERVE_SERVER__DIRECTOR_POLL_SECONDS": "0.2",
        "DITSERVE_SERVER__MAX_RUNNING_JOBS": "8",  # beyond eight, jobs wait in the store's queue
        "DITSERVE_SERVER__GATEWAY_NUM_CPUS": "0.05", "DITSERVE_SERVER__DIRECTOR_NUM_CPUS": "0.05",
        "DITSERVE_STAGES__TEXT_ENCODER": small, "DITSERVE_STAGES__VAE_DECODER": small,
        "DITSERVE_STAGES__DENOISER": "{num_cpus: 0.1, autoscaling: {min_replicas: 1, max_replicas: 2, "
                                     "target_queue_wait_seconds: 2, upscale_delay_s: 0, downscale_delay_s: 10, "
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
