"""Faults on the live app: a killed Director's job is taken over after its lease and finishes
once; a storage blip is ridden out and a storage outage fails the job cleanly only after its
retries; a stage that hangs while its replica stays alive is timed out, its replica replaced,
and the job finished by a later attempt."""

from __future__ import annotations

import os
import threading
import time

import ray
import requests

from conftest import wait_for
from serving import failpoints


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


class StorageOutage:
    """The artifact folder replaced by a plain file: every write fails until it is put back."""

    def __init__(self, artifacts: str):
        self.artifacts, self.aside = artifacts, artifacts + ".aside"

    def __enter__(self):
        os.rename(self.artifacts, self.aside)
        with open(self.artifacts, "w") as blocker:
            blocker.write("not a folder")
        return self

    def end(self):
        if os.path.isfile(self.artifacts):
            os.remove(self.artifacts)
            os.rename(self.aside, self.artifacts)

    def __exit__(self, *_):
        self.end()


BODY = {"prompt": "a video with nowhere to go", "seconds": "1", "size": "64x64", "num_inference_steps": 2}


def test_a_storage_blip_is_ridden_out(service):
    with StorageOutage(service.config.storage.artifacts_url) as outage:
        job = requests.post(f"{service.url}/v1/videos", json={**BODY, "seed": 1}).json()
        # Back within about a second, as a storage node restart would be: no job should pay for it.
        wait_for(lambda: requests.get(f"{service.url}/v1/videos/{job['id']}").json()["stage"] == "vae_decoder",
                 timeout=120, interval=0.01)
        threading.Timer(1.0, outage.end).start()
        final = service.client().videos.poll(job["id"], poll_interval_ms=100)
    assert final.status == "completed", final.error
    assert len(service.client().videos.download_content(job["id"]).read()) > 0


def test_a_storage_outage_fails_the_job_only_after_its_retries_and_says_nothing_of_the_store(service):
    artifacts = service.config.storage.artifacts_url
    with StorageOutage(artifacts):
        job = requests.post(f"{service.url}/v1/videos", json={**BODY, "seed": 2}).json()
        final = service.client().videos.poll(job["id"], poll_interval_ms=200)
    assert final.status == "failed"
    assert final.error.code == "too_many_attempts"
    assert "video store" in final.error.message and "retryable" in final.error.message
    assert artifacts not in final.error.message and "/" not in final.error.message  # no paths for clients
    again = service.client().videos.poll(requests.post(f"{service.url}/v1/videos", json={**BODY, "seed": 2}).json()["id"],
                                         poll_interval_ms=100)
    assert again.status == "completed"  # the same request succeeds once the store is back


def test_decodes_queued_behind_slow_ones_are_not_taken_for_hung(service):
    """One VAE decoder, decodes one at a time, each made 8 s slower; three jobs finish
    denoising together. The third's decode waits ~16 s behind the others, so from its request
    to its result ~24 s pass, past the 20 s decode timeout, while its own work takes ~8 s: only
    the work is timed, so no attempt is retried."""
    folder = os.environ[failpoints.ENV]
    assert service.config.stages.vae_decoder.num_replicas == 1
    timeout = service.config.stages.vae_decoder.timeout_seconds
    slow = 0.4 * timeout
    client = service.client()
    failpoints.arm(folder, "vae_decoder.decode", f"slow:{slow:g}:3")  # armed first: no decode slips past it
    started = time.monotonic()
    videos = [client.videos.create(prompt=f"a decode in a queue {i}", seconds="1", size="64x64",
                                   extra_body={"num_inference_steps": 10, "seed": 40 + i}) for i in range(3)]
    finals = [client.videos.poll(v.id, poll_interval_ms=250) for v in videos]
    assert not os.path.exists(os.path.join(folder, "vae_decoder.decode"))  # all three decodes were slow
    assert time.monotonic() - started > timeout  # the last one waited past the timeout
    for final in finals:
        assert final.status == "completed", final.error
        assert final.model_extra["resumed_from_step"] is None, "an attempt was retried: a queued decode timed out"


def test_a_hung_decode_is_timed_out_and_the_job_finishes_on_a_new_replica(service):
    folder = os.environ[failpoints.ENV]
    failpoints.arm(folder, "vae_decoder.decode", "hang")  # the next decode anywhere blocks for a day
    client = service.client()
    started = time.monotonic()
    video = client.videos.create(prompt="a decode that hangs", seconds="1", size="64x64",
                                 extra_body={"num_inference_steps": 10, "seed": 3})
    final = client.videos.poll(video.id, poll_interval_ms=250)
    assert not os.path.exists(os.path.join(folder, "vae_decoder.decode"))  # the hang really happened
    assert final.status == "completed", final.error
    # A later attempt ran it, from the Denoiser's checkpoint, after the 20 s decode timeout.
    assert final.model_extra["resumed_from_step"] == service.config.engine.checkpoint_every
    assert time.monotonic() - started >= service.config.stages.vae_decoder.timeout_seconds
    assert [v.id for v in client.videos.list(limit=100) if v.id == video.id] == [video.id]
    assert len(client.videos.download_content(video.id).read()) > 0


def test_serve_is_told_how_long_each_stages_stopping_replica_may_drain(service):
    """What a scale-down or an update gives a busy replica before it is killed, as Serve's
    controller holds it (the figure itself: tests/test_config.py)."""
    from ray.serve.context import _get_global_client

    from serving.app import APP_NAME, graceful_shutdown_seconds

    deployments = _get_global_client().get_serve_details()["applications"][APP_NAME]["deployments"]
    for stage, deployment in (("text_encoder", "TextEncoder"), ("denoiser", "Denoiser"), ("vae_decoder", "VAEDecoder")):
        drain = deployments[deployment]["deployment_config"]["graceful_shutdown_timeout_s"]
        assert drain == graceful_shutdown_seconds(service.config, stage), stage
