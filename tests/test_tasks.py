"""The task-style routes hosted video APIs use (POST /v1/videos/generations, GET /v1/tasks/{id}):
a hosted-API client's own snippet runs unchanged against the live cluster with a real key;
the translation onto our jobs (duration, resolution, aspect ratio, language, callback) and its
refusals are checked on the Gateway's app alone (real HTTP and SQLite; the test plays the
Director through the job store)."""

from __future__ import annotations

import time

import pytest
import requests

from conftest import KEYS, WEBHOOK_SECRET
from live_api import DRIVER, config_for, live_api
from serving.jobs.records import JobStatus


def hosted_api_client(BASE_URL: str, KEY: str, prompt: str, duration, resolution: str) -> tuple[dict, bytes]:
    """The issue's client, as such clients are written; only the inputs are parameters."""
    response = requests.post(f"{BASE_URL}/videos/generations", json={"prompt": prompt,
        "duration": duration, "resolution": resolution, "language": "en"}, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]                      # on status 200
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + 120
    while True:
        poll = requests.get(f"{BASE_URL}/tasks/{task_id}", headers=headers).json()
        if poll["status"] in ("completed", "failed"):
            break
        assert poll["status"] in ("queued", "processing"), poll
        assert time.monotonic() < deadline, poll
        time.sleep(0.2)
    assert poll["status"] == "completed", poll.get("error")
    video = requests.get(poll["result_url"], headers=headers)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    return poll, video.content


def test_a_hosted_api_clients_snippet_runs_unchanged(secure):
    service, _ = secure
    poll, mp4 = hosted_api_client(f"{service.url}/v1", KEYS["alpha"], "a red ball rolling left", 1, "64x64")
    assert poll["progress"] == 100 and poll["error"] is None
    assert (poll["duration"], poll["resolution"], poll["language"]) == (1.0, "64x64", "en")
    assert poll["result_url"] == f"{service.url}/v1/videos/{poll['task_id']}/content"
    assert mp4[4:8] == b"ftyp"
    assert poll["usage"]["denoiser_seconds"] > 0  # measured by the Denoiser, not estimated
    # A task is a video: the OpenAI routes see the same job; another key sees nothing.
    video = requests.get(f"{service.url}/v1/videos/{poll['task_id']}",
                         headers={"Authorization": f"Bearer {KEYS['alpha']}"}).json()
    assert video["status"] == "completed" and video["language"] == "en"
    for url in (f"{service.url}/v1/tasks/{poll['task_id']}", poll["result_url"]):
        assert requests.get(url, headers={"Authorization": f"Bearer {KEYS['beta']}"}).status_code == 404
        assert requests.get(url).status_code == 401


@pytest.fixture
def api(tmp_path):
    with live_api(config_for(tmp_path, webhooks__secret=WEBHOOK_SECRET)) as live:
        yield live


def create(api, **body):
    return requests.post(f"{api.url}/v1/videos/generations", json={"prompt": "a blue square", **body})


def test_a_task_moves_through_its_states(api):
    response = create(api, duration=1, resolution="64x64", aspect_ratio="1:1", seed=5, negative_prompt="blur")
    assert response.status_code == 200, response.text
    task = response.json()
    assert task["status"] == "queued" and task["object"] == "video.task" and task["result_url"] is None
    assert int(response.headers["openai-poll-after-ms"]) > 0
    task_id = task["task_id"]
    video = requests.get(f"{api.url}/v1/videos/{task_id}").json()
    assert (video["size"], video["seconds"], video["seed"], video["negative_prompt"]) == ("64x64", "1", 5, "blur")

    store = api.jobs.store
    assert [job.id for job in store.claim(DRIVER, 60, 10)] == [task_id]
    store.update(task_id, DRIVER, status=JobStatus.IN_PROGRESS, progress=40)
    running = requests.get(f"{api.url}/v1/tasks/{task_id}").json()
    assert (running["status"], running["progress"]) == ("processing", 40)

    store.update(task_id, DRIVER, status=JobStatus.FAILED, error_code="generation_failed",
                 error_message="generating the video failed")
    failed = requests.get(f"{api.url}/v1/tasks/{task_id}").json()
    assert failed["status"] == "failed" and failed["result_url"] is None
    assert failed["error"] == {"code": "generation_failed", "message": "generating the video failed"}


def test_a_completed_tasks_result_url_downloads_the_video(api):
    task_id = create(api, duration=1, resolution="64x64").json()["task_id"]
    api.finish(task_id, b"\x00\x00\x00\x18ftypisom-test-bytes")
    done = requests.get(f"{api.url}/v1/tasks/{task_id}").json()
    assert done["status"] == "completed" and done["progress"] == 100
    assert done["result_url"] == f"{api.url}/v1/videos/{task_id}/content"
    assert requests.get(done["result_url"]).content == b"\x00\x00\x00\x18ftypisom-test-bytes"


def test_result_url_is_under_the_operators_public_url(tmp_path):
    with live_api(config_for(tmp_path, server__public_url="https://video.example.com/api")) as api:
        task_id = create(api, duration=1, resolution="64x64").json()["task_id"]
        api.finish(task_id, b"mp4")
        task = requests.get(f"{api.url}/v1/tasks/{task_id}").json()
        assert task["result_url"] == f"https://video.example.com/api/v1/videos/{task_id}/content"


def test_a_cancelled_task_is_failed_with_the_reason(api):
    task_id = create(api, duration=1, resolution="64x64").json()["task_id"]
    requests.post(f"{api.url}/v1/videos/{task_id}/cancel")
    task = requests.get(f"{api.url}/v1/tasks/{task_id}").json()
    assert task["status"] == "failed" and task["error"]["code"] == "cancelled"


@pytest.mark.parametrize(("body", "param", "words"), [
    (dict(resolution="4K", aspect_ratio="16:9"), "resolution", "4K is 3840x2160"),
    (dict(resolution="4K"), "resolution", "4K is 2160x2160"),  # the tiny model's own shape is 1:1
    (dict(resolution="1080p", aspect_ratio="16:9"), "resolution", "1080p is 1920x1080"),
    (dict(resolution="huge"), "resolution", "expected one of 360p, 480p"),
    (dict(resolution="66x64"), "resolution", "not a multiple of 16"),
    (dict(aspect_ratio="wide"), "aspect_ratio", "expected width:height"),
    (dict(duration=1.1), "duration", "the nearest that work at 16 fps: 1 s and 1.25 s"),
    (dict(duration=60), "duration", "over the limit"),
    (dict(language="not a language"), "language", "language tag"),
    (dict(language="abcdefgh-abcdefgh-abcdefgh-abcdefgh-abcd"), "language", "language tag"),  # 40 > 35 characters
    (dict(aspect_ratio="999:1"), "aspect_ratio", "pixels"),  # no resolution asked: the shape is what is wrong
    (dict(callback_url="http://127.0.0.1:9/hook"), "callback_url", "not an address this server calls"),
    (dict(fps=24), "fps", "unknown parameter"),
    (dict(seed=True), "seed", "expected a number, found true"),
    (dict(model="sora-2"), "model", "is not served here"),
])
def test_what_the_model_cannot_make_is_a_400_naming_the_field(api, body, param, words):
    response = create(api, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_refused_resolution_says_which_ones_the_model_makes(tmp_path):
    """Under the default pixel limit (1280x720) 4K is refused with the named sizes that fit."""
    with live_api(config_for(tmp_path)) as api:
        response = create(api, resolution="4K", duration=1)
        message = response.json()["error"]["message"]
        assert response.status_code == 400
        # 360 and 540 lines are not multiples of 16; 1080p and up pass the pixel limit.
        assert "at 1:1 it makes 480p (480x480), 720p (720x720), or WIDTHxHEIGHT in multiples of 16" in message, message
        wide = create(api, resolution="480p", aspect_ratio="16:9", duration=1)
        assert wide.status_code == 200, wide.text
        assert requests.get(f"{api.url}/v1/videos/{wide.json()['task_id']}").json()["size"] == "848x480"


def test_named_resolutions_follow_the_aspect_ratio(tmp_path):
    with live_api(config_for(tmp_path)) as api:
        sizes = {}
        for aspect in ("9:16", "1:1", "4:3"):
            task = create(api, resolution="480p", aspect_ratio=aspect, duration=1).json()
            sizes[aspect] = requests.get(f"{api.url}/v1/videos/{task['task_id']}").json()["size"]
        assert sizes == {"9:16": "480x848", "1:1": "480x480", "4:3": "640x480"}
