"""API keys on a second app in the local cluster ("secure", auth on): requests without a
known key get 401; one key cannot see, list, download, cancel or delete another key's
videos (404, as if they did not exist); per-key rate limits and concurrent-job quotas are
answered with 429 and Retry-After; the store keeps no key in the clear."""

from __future__ import annotations

import openai
import pytest
import requests

from conftest import KEYS, wait_for

SLOW_JOB = dict(seconds="1", size="128x128", extra_body={"num_inference_steps": 100})


def client_for(secure, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{secure[0].url}/v1", api_key=KEYS[name], max_retries=0)


def test_requests_need_a_known_key(secure):
    url = f"{secure[0].url}/v1/videos"
    for headers in [{}, {"Authorization": "Bearer dsk-not-a-key"}, {"Authorization": "Basic YTpi"}]:
        response = requests.get(url, headers=headers)
        assert response.status_code == 401, response.text
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{secure[0].url}/v1", api_key="dsk-wrong", max_retries=0).videos.list()
    assert requests.get(f"{secure[0].url}/healthz").status_code == 200  # probes need no key


def test_one_key_cannot_reach_another_keys_videos(secure):
    alpha, beta = client_for(secure, "alpha"), client_for(secure, "beta")
    video = alpha.videos.create_and_poll(prompt="alpha's secret video", poll_interval_ms=200)
    assert video.status == "completed"
    assert video.id in [v.id for v in alpha.videos.list()]
    assert video.id not in [v.id for v in beta.videos.list()]
    for attempt in (lambda: beta.videos.retrieve(video.id), lambda: beta.videos.download_content(video.id),
                    lambda: beta.videos.delete(video.id),
                    lambda: beta.post(f"/videos/{video.id}/cancel", cast_to=object)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    response = requests.get(f"{secure[0].url}/v1/videos/{video.id}/events",
                            headers={"Authorization": f"Bearer {KEYS['beta']}"})
    assert response.status_code == 404
    # A list cursor from another tenant is refused like an unknown id.
    response = requests.get(f"{secure[0].url}/v1/videos", params={"after": video.id},
                            headers={"Authorization": f"Bearer {KEYS['beta']}"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "after"
    # The same Idempotency-Key from two tenants makes two videos, not a shared one.
    key = {"Idempotency-Key": "same-key-for-both"}
    a = alpha.videos.create(prompt="mine", extra_headers=key)
    b = beta.videos.create(prompt="mine", extra_headers=key)
    assert a.id != b.id
    assert alpha.videos.retrieve(video.id).status == "completed"  # untouched by beta's attempts
    # Only hashes are kept: no key appears in the job store or the config.
    db = (secure[1] / "jobs.db").read_bytes()
    assert all(k.encode() not in db for k in KEYS.values())
    assert all(k not in secure[0].config.model_dump_json() for k in KEYS.values())


def test_concurrent_job_quota_is_429_with_retry_after(secure):
    beta = client_for(secure, "beta")
    settle(beta)  # earlier tests' videos must not hold beta's slots
    running = [beta.videos.create(prompt=f"slow {i}", **SLOW_JOB) for i in range(2)]
    response = requests.post(f"{secure[0].url}/v1/videos", json={"prompt": "one too many"},
                             headers={"Authorization": f"Bearer {KEYS['beta']}"})
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "concurrent_jobs_exceeded"
    assert 1 <= int(response.headers["Retry-After"]) <= 600
    alpha = client_for(secure, "alpha")
    assert alpha.videos.create(prompt="other tenants are not held back").status == "queued"
    beta.post(f"/videos/{running[0].id}/cancel", cast_to=object)
    wait_for(lambda: beta.videos.retrieve(running[0].id).status == "failed", timeout=60)
    assert beta.videos.create(prompt="a slot came free").status == "queued"
    settle(beta)


def settle(client: openai.OpenAI) -> None:
    """Cancel the key's unfinished videos and wait until they are finished."""
    for video in client.videos.list():
        if video.status in ("queued", "in_progress"):
            client.post(f"/videos/{video.id}/cancel", cast_to=object)
    wait_for(lambda: all(v.status in ("completed", "failed") for v in client.videos.list()), timeout=60)


def test_rate_limit_is_429_with_retry_after(secure):
    headers = {"Authorization": f"Bearer {KEYS['gamma']}"}
    codes = [requests.get(f"{secure[0].url}/v1/videos", headers=headers).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    response = requests.get(f"{secure[0].url}/v1/videos", headers=headers)
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    # Another key's budget is its own.
    assert requests.get(f"{secure[0].url}/v1/videos",
                        headers={"Authorization": f"Bearer {KEYS['alpha']}"}).status_code == 200
