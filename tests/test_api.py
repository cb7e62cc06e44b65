"""The OpenAI-compatible Videos API on the live local cluster, through the real `openai` SDK."""

from __future__ import annotations

import io
import json
import time
import warnings

import av
import pytest
import requests
from PIL import Image

warnings.filterwarnings("ignore", category=DeprecationWarning)  # the SDK marks its Videos API deprecated

TINY = dict(seconds="1", size="64x64")


def frames_in(data: bytes) -> tuple[int, float, tuple[int, int]]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, float(stream.average_rate), (stream.width, stream.height)


def test_create_and_poll_then_download(service):
    client = service.client()
    video = client.videos.create_and_poll(prompt="a red fox running through snow", **TINY,
                                          extra_body={"seed": 7, "num_inference_steps": 4}, poll_interval_ms=200)
    assert video.status == "completed", video.error
    assert video.object == "video" and video.id.startswith("video_")
    assert (video.progress, video.seconds, video.size, video.model) == (100, "1", "64x64", "tiny")
    assert video.completed_at is not None and video.completed_at >= video.created_at
    assert video.expires_at is None  # no silent expiry
    extra = video.model_extra
    assert extra["seed"] == 7 and extra["num_inference_steps"] == 4 and extra["fps"] == 16
    stamps = extra["timestamps"]
    for name in ("submitted_at", "text_encoder_started_at", "text_encoder_finished_at", "denoiser_started_at",
                 "denoiser_finished_at", "vae_decoder_started_at", "vae_decoder_finished_at", "completed_at"):
        assert name in stamps, name
    assert stamps["submitted_at"] <= stamps["text_encoder_started_at"] <= stamps["denoiser_started_at"] \
        <= stamps["vae_decoder_started_at"] <= stamps["completed_at"]

    content = client.videos.download_content(video.id)
    assert content.response.headers["content-type"] == "video/mp4"
    assert frames_in(content.read()) == (17, 16.0, (64, 64))


def test_extension_fields_shape_the_video(service):
    client = service.client()
    video = client.videos.create_and_poll(prompt="a blue square moving up", seconds="0.5", size="96x64",
                                          extra_body={"fps": 8, "seed": 3, "guidance_scale": 1.0,
                                                      "num_inference_steps": 2, "negative_prompt": "blur"},
                                          poll_interval_ms=200)
    assert video.status == "completed", video.error
    assert video.model_extra["guidance_scale"] == 1.0 and video.model_extra["negative_prompt"] == "blur"
    assert frames_in(client.videos.download_content(video.id).read()) == (5, 8.0, (96, 64))


def test_same_seed_same_video_through_the_cluster(service, tiny_pipeline):
    """The distributed path makes the reference pipeline's video."""
    client = service.client()
    video = client.videos.create_and_poll(prompt="a green circle", **TINY,
                                          extra_body={"seed": 21, "num_inference_steps": 3}, poll_interval_ms=200)
    served = client.videos.download_content(video.id).read()
    reference = tiny_pipeline.generate(tiny_pipeline.spec("a green circle", seed=21, num_inference_steps=3,
                                                          seconds=1, size="64x64"))
    assert served == reference.mp4


def test_json_body_and_poll_header(service):
    response = requests.post(f"{service.url}/v1/videos", json={"prompt": "a cat", **TINY, "num_inference_steps": 2})
    assert response.status_code == 200, response.text
    assert int(response.headers["openai-poll-after-ms"]) == service.config.server.poll_after_ms
    body = response.json()
    assert body["status"] in ("queued", "in_progress")
    video = service.client().videos.poll(body["id"], poll_interval_ms=200)
    assert video.status == "completed"
    done = requests.get(f"{service.url}/v1/videos/{body['id']}")
    assert "openai-poll-after-ms" not in done.headers  # nothing left to poll for


def test_range_requests_and_thumbnail(service):
    client = service.client()
    video = client.videos.create_and_poll(prompt="a yellow triangle", **TINY,
                                          extra_body={"num_inference_steps": 2}, poll_interval_ms=200)
    url = f"{service.url}/v1/videos/{video.id}/content"
    whole = requests.get(url)
    assert whole.headers["accept-ranges"] == "bytes"
    part = requests.get(url, headers={"Range": "bytes=10-109"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 10-109/{len(whole.content)}"
    assert part.content == whole.content[10:110]
    tail = requests.get(url, headers={"Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == whole.content[-16:]
    bad = requests.get(url, headers={"Range": f"bytes={len(whole.content) + 5}-"})
    assert bad.status_code == 416 and bad.json()["error"]["param"] == "Range"

    thumbnail = client.videos.download_content(video.id, variant="thumbnail")
    assert thumbnail.response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(thumbnail.read())).size == (64, 64)


def test_list_pages_with_cursor(service):
    client = service.client()
    made = [client.videos.create(prompt=f"list test {i}", **TINY, extra_body={"num_inference_steps": 1}).id
            for i in range(3)]
    first = client.videos.list(limit=2, order="desc")
    assert [v.id for v in first.data] == made[::-1][:2]
    assert first.has_more is True
    second = first.get_next_page()
    assert second.data[0].id == made[0]
    ascending = [v.id for v in client.videos.list(limit=100, order="asc")]
    assert ascending.index(made[0]) < ascending.index(made[1]) < ascending.index(made[2])
    every = [v.id for v in client.videos.list(limit=1)]  # auto-pagination follows last_id
    assert set(made) <= set(every)
    for video_id in made:
        client.videos.poll(video_id, poll_interval_ms=200)


def test_delete_removes_job_and_files(service):
    client = service.client()
    video = client.videos.create_and_poll(prompt="to be deleted", **TINY, extra_body={"num_inference_steps": 1},
                                          poll_interval_ms=200)
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    import openai

    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    assert requests.delete(f"{service.url}/v1/videos/{video.id}").status_code == 404


def test_cancel_a_running_job(service):
    client = service.client()
    video = client.videos.create(prompt="a long job", **TINY, extra_body={"num_inference_steps": 100})
    cancelled = requests.post(f"{service.url}/v1/videos/{video.id}/cancel")
    assert cancelled.status_code == 200
    final = client.videos.poll(video.id, poll_interval_ms=100)
    assert final.status == "failed"
    assert final.error.code == "cancelled"
    assert final.progress < 100


def test_progress_stream(service):
    client = service.client()
    # 128x128: long enough (a few seconds) that several progress writes (>= 0.5 s apart) happen
    video = client.videos.create(prompt="a streamed job", seconds="1", size="128x128",
                                 extra_body={"num_inference_steps": 100})
    events = []
    with requests.get(f"{service.url}/v1/videos/{video.id}/events", stream=True, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
    names = [name for name, _ in events]
    assert names[-1] == "video.completed" and set(names[:-1]) == {"video.progress"}
    progress = [body["progress"] for _, body in events]
    assert progress == sorted(progress) and progress[-1] == 100
    assert len(set(progress)) >= 4  # steps are reported as they happen, not only the end


def test_idempotency_key(service):
    body = {"prompt": "idempotent", **TINY, "num_inference_steps": 1}
    first = requests.post(f"{service.url}/v1/videos", json=body, headers={"Idempotency-Key": "key-1"})
    again = requests.post(f"{service.url}/v1/videos", json=body, headers={"Idempotency-Key": "key-1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = requests.post(f"{service.url}/v1/videos", json={**body, "prompt": "changed"},
                          headers={"Idempotency-Key": "key-1"})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"


def test_health_and_readiness(service):
    assert requests.get(f"{service.url}/healthz").json() == {"status": "ok"}
    ready = requests.get(f"{service.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"storage": True, "text_encoder": True, "denoiser": True, "vae_decoder": True}


def test_readyz_and_metrics_say_which_attention_each_denoiser_runs(service):
    """Each Denoiser replica self-checks its attention at start-up and reports the backend:
    here the CPU default, diffusers' own SDPA attention (serving/kernels/dispatch.py)."""
    deadline = time.monotonic() + 60
    while not (denoisers := requests.get(f"{service.url}/readyz", timeout=10).json()["denoisers"]):
        assert time.monotonic() < deadline, "no Denoiser replica reported its attention backend"
        time.sleep(1)
    assert len({d["replica"] for d in denoisers}) == len(denoisers)
    for denoiser in denoisers:
        assert denoiser["attention"] == {"backend": "sdpa", "requested": "auto", "device": "cpu", "dtype": "float32",
                                         "head_dim": 32, "passed_over": [], "via": "diffusers' attention processor"}
    def reported(text: str) -> bool:
        return any(line.startswith("ray_ditserve_attention_backend{") and 'backend="sdpa"' in line
                   and 'deployment="Denoiser"' in line and line.endswith(" 1.0") for line in text.splitlines())

    deadline = time.monotonic() + 120
    while not reported(requests.get(service.metrics_url, timeout=10).text):
        assert time.monotonic() < deadline, "ray_ditserve_attention_backend never reached the metrics endpoint"
        time.sleep(1)
    # Every /readyz ping is timed per stage and outcome (a stage called down can be traced).
    def pinged(text: str) -> set[str]:
        return {stage for stage in ("text_encoder", "denoiser", "vae_decoder") for line in text.splitlines()
                if line.startswith("ray_ditserve_readiness_ping_seconds_count{") and f'stage="{stage}"' in line
                and 'outcome="ok"' in line}

    deadline = time.monotonic() + 120
    while pinged(requests.get(service.metrics_url, timeout=10).text) != {"text_encoder", "denoiser", "vae_decoder"}:
        assert time.monotonic() < deadline, "ray_ditserve_readiness_ping_seconds never reached the metrics endpoint"
        requests.get(f"{service.url}/readyz", timeout=10)
        time.sleep(1)


def test_readyz_counts_a_denoiser_with_every_slot_taken_as_ready(service):
    """A readiness ping waits in Serve's router like any call: once every Denoiser slot
    (max_ongoing_requests) holds a job and more wait, it cannot answer within its 5 s. That
    is a busy stage, not a down one: Serve's health checks say its replica works."""
    slots = service.config.stages.denoiser.max_ongoing_requests * service.config.stages.denoiser.num_replicas
    ids = []
    try:
        for i in range(slots + 2):  # each ~1 min here: the Denoiser is full while the test looks
            created = requests.post(f"{service.url}/v1/videos", timeout=30, json={
                "prompt": f"a busy denoiser {i}", "seconds": "1", "size": "256x256", "num_inference_steps": 100})
            assert created.status_code == 200, created.text
            ids.append(created.json()["id"])

        def busy_pings() -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in requests.get(service.metrics_url, timeout=10).text
                       .splitlines() if line.startswith("ray_ditserve_readiness_ping_seconds_count{")
                       and 'stage="denoiser"' in line and 'outcome="busy"' in line)

        before, deadline = busy_pings(), time.monotonic() + 150
        while True:
            ready = requests.get(f"{service.url}/readyz", timeout=30)
            assert ready.status_code == 200 and ready.json()["checks"]["denoiser"] is True, ready.text
            if busy_pings() > before:  # the ping did time out behind the jobs, and was answered by Serve's view
                break
            assert time.monotonic() < deadline, "the Denoiser's slots never filled: the test proved nothing"
            time.sleep(0.5)
    finally:
        for video_id in ids:
            requests.delete(f"{service.url}/v1/videos/{video_id}", timeout=30)


def test_held_out_prompts_over_http_show_what_the_model_makes(service):
    """The semantic check once end to end: the MP4s the service returns for held-out prompts
    meet issue #10's 80 % and are judged as the same model's frames are in-process
    (tests/test_tiny_model.py)."""
    import io

    import av
    import numpy as np
    import torch

    from serving.models import semantic
    from serving.pipeline.local import LocalPipeline

    client = service.client()
    prompts = semantic.held_out_prompts()
    jobs = [(client.videos.create(prompt=prompt, extra_body={"seed": 0}), colour, direction)
            for prompt, colour, _, direction in prompts]
    over_http = []
    for video, colour, direction in jobs:
        assert client.videos.poll(video.id, poll_interval_ms=200).status == "completed"
        with av.open(io.BytesIO(client.videos.download_content(video.id).read())) as mp4:
            frames = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in mp4.decode(video=0)]))
        over_http.append(semantic.judge(frames, colour, direction).ok)
    in_process = [r["ok"] for r in semantic.score_pipeline(LocalPipeline(service.config), prompts, seeds=(0,)).results]
    print(f"\nheld-out prompts, seed 0: {sum(over_http)}/{len(prompts)} over HTTP, {sum(in_process)}/{len(prompts)} in process")
    assert sum(a == b for a, b in zip(over_http, in_process)) >= len(prompts) - 1  # H.264 may tip one borderline clip
    assert sum(over_http) / len(prompts) >= 0.8  # issue #10's goal, here through the live API
