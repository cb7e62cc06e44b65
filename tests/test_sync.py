"""POST /v1/videos/sync on the live cluster: the same body as POST /v1/videos (JSON or
multipart), answered with the MP4 itself and the timings peers' benchmark clients read
(`Server-Timing`, `x-inference-time-s`); the job is durable (a client that hangs up does not
lose it, and the same Idempotency-Key gets it back)."""

from __future__ import annotations

import re
import uuid

import pytest
import requests

from conftest import wait_for
from test_api import frames_in

BODY = {"prompt": "a yellow circle moving right", "seconds": "1", "size": "64x64", "num_inference_steps": 3,
        "seed": 11}


def timings(header: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"([a-z]+);dur=([0-9.]+)", header)}


def test_sync_answers_with_the_mp4_and_its_timings(service):
    response = requests.post(f"{service.url}/v1/videos/sync", json=BODY, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    assert frames_in(response.content) == (17, 16.0, (64, 64))
    video_id = response.headers["x-video-id"]
    assert response.headers["location"] == f"/v1/videos/{video_id}"
    spans = timings(response.headers["server-timing"])
    assert {"generation", "denoise", "total", "queue", "encode", "decode"} <= set(spans), spans
    assert 0 < spans["denoise"] <= spans["generation"] <= spans["total"]
    assert float(response.headers["x-inference-time-s"]) == pytest.approx(spans["generation"] / 1000, abs=1e-3)
    # An ordinary job: the OpenAI routes know it, with the same bytes; the download carries the
    # same timings (where TensorRT-LLM's benchmark client reads them, after polling).
    video = service.client().videos.retrieve(video_id)
    assert video.status == "completed"
    download = requests.get(f"{service.url}/v1/videos/{video_id}/content")
    assert download.content == response.content
    assert timings(download.headers["server-timing"]) == spans


def test_sync_takes_the_multipart_body_the_sdk_sends(service):
    fields = {name: (None, str(value)) for name, value in BODY.items()}
    response = requests.post(f"{service.url}/v1/videos/sync", files=fields, timeout=120)
    assert response.status_code == 200, response.text
    assert frames_in(response.content)[0] == 17


def test_a_vllm_omni_style_client_runs_unchanged(service):
    """The form vLLM-Omni's sync clients post (width, height, num_frames, and the model id as
    GET /v1/models names it), answered with the MP4 they write to disk."""
    model = requests.get(f"{service.url}/v1/models").json()["data"][0]["id"]
    form = {"model": model, "prompt": "a red circle moving up", "width": "64", "height": "64", "num_frames": "17",
            "num_inference_steps": "3", "guidance_scale": "5.0", "seed": "42"}
    response = requests.post(f"{service.url}/v1/videos/sync", files={k: (None, v) for k, v in form.items()},
                             timeout=120)
    assert response.status_code == 200, response.text[:500]
    assert frames_in(response.content) == (17, 16.0, (64, 64))
    assert float(response.headers["x-inference-time-s"]) > 0
    both = requests.post(f"{service.url}/v1/videos/sync", json={**BODY, "num_frames": 17}, timeout=30)
    assert both.status_code == 400 and both.json()["error"]["param"] == "num_frames"


def test_sync_refuses_bad_input_like_create(service):
    response = requests.post(f"{service.url}/v1/videos/sync", json={**BODY, "size": "65x64"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "size"


def test_a_client_that_hangs_up_loses_nothing(service):
    """The wait is dropped by the client; the video is made anyway, and the same request with
    the same Idempotency-Key answers with it."""
    key = f"sync-{uuid.uuid4().hex}"
    slow = {**BODY, "num_inference_steps": 60, "size": "128x128"}
    with pytest.raises(requests.ReadTimeout):
        requests.post(f"{service.url}/v1/videos/sync", json=slow, headers={"Idempotency-Key": key}, timeout=1.0)
    # The dropped request's job exists and goes on.
    [first] = wait_for(lambda: [v for v in service.client().videos.list(limit=20)
                                if v.prompt == slow["prompt"] and v.size == "128x128"], timeout=30)
    again = requests.post(f"{service.url}/v1/videos/sync", json=slow, headers={"Idempotency-Key": key}, timeout=180)
    assert again.status_code == 200, again.text
    video_id = again.headers["x-video-id"]
    assert video_id == first.id  # the same job, answered
    assert service.client().videos.retrieve(video_id).status == "completed"
    assert sum(1 for v in service.client().videos.list(limit=20) if v.prompt == slow["prompt"]
               and v.size == "128x128") == 1  # one job, not two
