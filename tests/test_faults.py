"""Faults on the live app: a killed Director's job is taken over after its lease and finishes
once; an artifact store that fails a write fails the job with a clear, retryable error."""

from __future__ import annotations

import os
import time

import ray
import requests

from conftest import wait_for


def director_actor():
    [actor] = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ditserve#Director#" in a["name"]]
    return ray.get_actor(actor["name"], namespace=actor["namespace"])


def test_killed_director_job_is_taken_over_and_completes_once(service):
    client = service.client()
    video = client.videos.create(prompt="outlives its driver", seconds="1", size="128x128",
                                 extra_body={"num_inference_steps": 100, "seed": 9})
    every = service.config.engine.checkpoint_every
    wait_for(lambda: client.videos.retrieve(video.id).progress >= 5 + 85 * (every + 1) // 100)
    ray.kill(director_actor(), no_restart=False)  # Serve starts a new Director; the lease must run out first

    final = client.videos.poll(video.id, poll_interval_ms=200)
    assert final.status == "completed", final.error
    assert final.model_extra["resumed_from_step"] >= every  # the new driver resumed, not restarted
    listed = [v.id for v in client.videos.list(limit=100) if v.id == video.id]
    assert listed == [video.id]  # one job, finished once
    assert len(client.videos.download_content(video.id).read()) > 0


def test_artifact_write_failure_fails_the_job_retryably(service):
    artifacts = service.config.storage.artifacts_url
    aside = artifacts + ".aside"
    body = {"prompt": "a video with nowhere to go", "seconds": "1", "size": "64x64", "num_inference_steps": 1}
    os.rename(artifacts, aside)
    try:
        with open(artifacts, "w") as blocker:  # a file where the folder was: every write fails
            blocker.write("not a folder")
        job = requests.post(f"{service.url}/v1/videos", json=body).json()
        final = service.client().videos.poll(job["id"], poll_interval_ms=100)
    finally:
        os.remove(artifacts)
        os.rename(aside, artifacts)
    assert final.status == "failed"
    assert final.error.code == "artifact_store_error"
    assert "retryable" in final.error.message
    again = service.client().videos.poll(requests.post(f"{service.url}/v1/videos", json=body).json()["id"],
                                         poll_interval_ms=100)
    assert again.status == "completed"  # the same request succeeds once the store is back
