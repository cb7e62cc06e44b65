"""The batching engine inside the live cluster: a killed Denoiser replica's job resumes from
its checkpoint on the restarted replica; a high-priority job overtakes queued ones."""

from __future__ import annotations

import ray

from conftest import wait_for


def test_killed_denoiser_replica_resumes_from_checkpoint(service):
    client = service.client()
    every = service.config.engine.checkpoint_every
    video = client.videos.create(prompt="a job that survives", seconds="1", size="128x128",
                                 extra_body={"num_inference_steps": 100, "seed": 5})
    # Past the second checkpoint (progress runs 5..90 over the denoise steps).
    wait_for(lambda: client.videos.retrieve(video.id).progress >= 5 + 85 * (2 * every + 1) // 100)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ditserve#Denoiser#" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    final = client.videos.poll(video.id, poll_interval_ms=200)
    assert final.status == "completed", final.error
    assert final.model_extra["resumed_from_step"] >= every  # not from step 0
    assert final.model_extra["resumed_from_step"] % every == 0
    # Same seed, same video: the resumed job equals an uninterrupted one.
    again = client.videos.create_and_poll(prompt="a job that survives", seconds="1", size="128x128",
                                          extra_body={"num_inference_steps": 100, "seed": 5}, poll_interval_ms=200)
    assert again.model_extra["resumed_from_step"] is None
    first_bytes = client.videos.download_content(video.id).read()
    assert first_bytes == client.videos.download_content(again.id).read()


def test_high_priority_job_starts_before_queued_low_ones(service):
    client = service.client()
    batch = service.config.engine.max_batch
    long = dict(seconds="1", size="128x128")  # slow enough steps that no slot frees up meanwhile
    low = [client.videos.create(prompt=f"low {i}", **long, extra_body={"num_inference_steps": 100}).id
           for i in range(batch + 3)]
    # The engine's batch is full (`batch` jobs are stepping; which ones depends on the order
    # they reached the Denoiser); the other three wait in it for a slot.
    wait_for(lambda: sum(client.videos.retrieve(i).progress > 5 for i in low) >= batch)
    waiting = [i for i in low if client.videos.retrieve(i).progress <= 5]
    assert len(waiting) == 3
    high = client.videos.create(prompt="urgent", **long, extra_body={"num_inference_steps": 100, "priority": 10}).id
    videos = {i: client.videos.poll(i, poll_interval_ms=200) for i in low + [high]}
    assert all(v.status == "completed" for v in videos.values())
    started = {i: v.model_extra["timestamps"]["denoiser_started_at"] for i, v in videos.items()}
    # The urgent job arrives within a second, long before a batch boundary frees a slot for
    # the waiting low-priority jobs: it must start before any of them.
    assert started[high] < min(started[i] for i in waiting), started


def test_unreadable_checkpoint_makes_the_denoiser_start_over(service):
    """A checkpoint that cannot be read (truncated, or from another version) costs the job its
    progress, not the job itself."""
    import dataclasses

    from ray import serve

    from serving.deployments.denoiser import checkpoint_key
    from serving.models.loading import preset_of
    from serving.pipeline.spec import build_spec
    from serving.storage import ArtifactStore

    config = service.config
    spec = build_spec(preset_of(config.model), config.generation, "a damaged checkpoint", size="128x128",
                      seconds=1, num_inference_steps=3, guidance_scale=1.0, seed=1)
    job_id = "video_damagedcheckpoint0001"
    ArtifactStore(config.storage.artifacts_url).put(checkpoint_key(job_id), b"\x80\x02truncated")
    encoder = serve.get_deployment_handle("TextEncoder", "ditserve").options(stream=True)
    embeddings = list(encoder.encode.remote([spec.prompt], spec.max_sequence_length))[-1]["embeddings"]
    denoiser = serve.get_deployment_handle("Denoiser", "ditserve")
    events = list(denoiser.options(stream=True).denoise.remote(job_id, dataclasses.asdict(spec), embeddings, 0, True))
    assert events[:2] == [{"accepted": True}, {"started": True, "step": 0}]
    assert events[-1]["latents"].shape[0] == 1
