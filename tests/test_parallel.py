"""A Denoiser across a gang of devices (serving/parallel/): with 2 ranks on gloo, Ulysses 2
and CFG 2 each give the single-device latents within fp32 tolerance, alone and batched, for
a token count that does not divide by the degree, with and without step caching."""

from __future__ import annotations

import os
from functools import partial

import pytest
import requests
import torch

from serving.engine.scheduler import DenoiseEngine, EngineRequest
from serving.parallel.layout import choose_layout
from serving.parallel.processes import run_gang
from serving.parallel.ulysses import shard_sizes
from serving.pipeline.denoise import start_denoise

from test_engine import BATCH_ATOL

# 48x48 pixels, 9 frames: 3 latent frames x 3 x 3 patches = 27 tokens, uneven over 2 ranks.
REQUESTS = [
    dict(rid="guided", prompt="a red circle moving left", seed=3, size="64x64", steps=6),
    dict(rid="unguided", prompt="a blue square moving up", seed=4, size="64x64", steps=6, guidance_scale=1.0),
    dict(rid="cached", prompt="a green circle moving right", seed=5, size="64x64", steps=12, cache="balanced"),
    dict(rid="odd", prompt="a yellow square moving down", seed=6, size="48x48", steps=6, num_frames=9),
]


def _engine_run(pipeline, blocks, requests, max_batch):
    """Denoise `requests` with one engine (a batch of up to max_batch); final latents by id."""
    engine = DenoiseEngine(pipeline.transformer, max_batch=max_batch, blocks=blocks)
    for r in requests:
        r = dict(r)
        rid, prompt, seed, steps = r.pop("rid"), r.pop("prompt"), r.pop("seed"), r.pop("steps")
        spec = pipeline.spec(prompt, seed=seed, num_inference_steps=steps, **r)
        cond, neg = pipeline.encode(spec)
        state = start_denoise(spec, pipeline.scheduler_config, pipeline.transformer.config.in_channels,
                              pipeline.preset.geometry)
        engine.add(EngineRequest(id=rid, state=state, prompt_embeds=cond, negative_embeds=neg))
    finished = {}
    for _ in range(1000):
        if engine.idle:
            break
        for event in engine.step_batch():
            if event.kind == "failed":
                raise event.error
            if event.kind == "finished":
                finished[event.request_id.split("/")[0]] = (event.latents, event.computed_steps)
    return finished


def _alone_and_batched(pipeline, blocks):
    """Each request alone, then all of them in one engine (same-shape ones share forwards)."""
    alone = {}
    for r in REQUESTS:
        alone.update(_engine_run(pipeline, blocks, [r], max_batch=1))
    return alone, _engine_run(pipeline, blocks, REQUESTS, max_batch=4)


def _with_layouts(pipeline, blocks):
    alone, batched = _alone_and_batched(pipeline, blocks)
    return alone, batched, dict(blocks.forwards)


@pytest.fixture(scope="module")
def single_device(tiny_pipeline):
    return _alone_and_batched(tiny_pipeline, None)


@pytest.fixture(scope="module")
def sdpa_config(tiny_config):
    # Both sides run SDPA: the comparison is about the split, not about attention backends.
    return tiny_config.model_copy(update={"model": tiny_config.model.model_copy(update={"attention_backend": "sdpa"})})


def test_the_layout_follows_the_rows():
    """Few rows: split each across the gang (latency); many: whole rows per device
    (throughput); in between, whichever leaves the busiest device least to do."""
    assert choose_layout(1, 4, 1) == "split"  # one unguided request
    assert choose_layout(2, 4, 1) == "split"  # one guided request: 2 rows on 4 devices
    assert choose_layout(4, 4, 1) == "rows"  # two guided requests: one row per device
    assert choose_layout(5, 4, 1, split_efficiency=0.8) == "split"  # 2 rows on one device vs 5/4/0.8
    assert choose_layout(8, 4, 1) == "rows"
    assert choose_layout(2, 2, 1) == "rows"  # a guided request on 2 devices: CFG-parallel for free
    assert choose_layout(2, 1, 2) == "rows"
    assert choose_layout(8, 4, 1, policy="split") == "split"
    assert choose_layout(8, 1, 1) == "split"  # one device: nothing to choose
    # A perfect split (efficiency 1) never loses: rows only where they tie.
    assert choose_layout(5, 4, 1, split_efficiency=1.0) == "split"
    assert choose_layout(4, 4, 1, split_efficiency=1.0) == "rows"


def test_uneven_slices_cover_the_sequence():
    assert shard_sizes(27, 2) == [14, 13]
    assert shard_sizes(5, 4) == [2, 1, 1, 1]
    assert sum(shard_sizes(32760, 8)) == 32760


@pytest.mark.parametrize("ulysses,cfg,policy", [(2, 1, "split"), (1, 2, "split"), (2, 1, "by_load")],
                         ids=["ulysses2", "cfg2", "ulysses2-by-load"])
def test_a_gang_of_two_gives_the_single_device_latents(single_device, sdpa_config, ulysses, cfg, policy):
    expected_alone, expected_batched = single_device
    alone, batched, forwards = run_gang(sdpa_config, ulysses, cfg, _with_layouts, timeout_s=300, policy=policy)
    for name, expected, found in (("alone", expected_alone, alone), ("batched", expected_batched, batched)):
        assert found.keys() == expected.keys()
        for rid, (latents, computed) in expected.items():
            got, got_computed = found[rid]
            assert got.shape == latents.shape
            difference = (got - latents).abs().max().item()
            assert difference <= BATCH_ATOL, (name, rid, difference)
            # Step caching decides on the leader from the same inputs: the same steps run.
            assert got_computed == computed, (name, rid)
    assert expected_alone["cached"][1] < 12  # the cached request did skip steps
    if policy == "split":
        assert forwards["rows"] == 0 and forwards["split"] > 0
    else:
        # The unguided request alone (one row) ran split; guided ones and the batches (two
        # rows or more) ran whole rows per rank: both layouts, the same latents.
        assert forwards["rows"] > 0 and forwards["split"] > 0, forwards


def _each_alone(requests, pipeline, blocks):
    """Work for run_gang (module-level so that spawned ranks can unpickle it)."""
    found = {}
    for r in requests:
        found.update(_engine_run(pipeline, blocks, [r], max_batch=1))
    return found


def _alone(requests):
    return partial(_each_alone, requests)


def _backends_then_alone(requests, pipeline, blocks):
    """The attention backends the gang installed, and the requests denoised one by one."""
    from serving.kernels.wan import KernelAttnProcessor

    processors = {type(p).__name__: p.backend for p in pipeline.transformer.attn_processors.values()
                  if isinstance(p, KernelAttnProcessor)}
    return processors, _each_alone(requests, pipeline, blocks)


def test_both_dimensions_at_once_on_four_ranks(single_device, sdpa_config):
    """Ulysses 2 x CFG 2: the (cfg, ulysses) mesh with both dimensions split."""
    expected, _ = single_device
    chosen = [REQUESTS[0], REQUESTS[3]]  # guided, and the uneven token count
    found = run_gang(sdpa_config, 2, 2, _alone(chosen), timeout_s=300)
    for r in chosen:
        difference = (found[r["rid"]][0] - expected[r["rid"]][0]).abs().max().item()
        assert difference <= BATCH_ATOL, (r["rid"], difference)


def test_our_triton_kernel_runs_under_the_split(tiny_pipeline, tiny_config):
    """The attention backend stays pluggable: Ulysses 2 around our Triton kernel (under
    TRITON_INTERPRET=1 here) gives the single-device (SDPA) latents."""
    config = tiny_config.model_copy(update={"model": tiny_config.model.model_copy(update={"attention_backend": "triton"})})
    request = dict(REQUESTS[0], steps=2)  # the interpreter is slow
    processors, found = run_gang(config, 2, 1, partial(_backends_then_alone, [request]), timeout_s=600)
    assert processors == {"KernelAttnProcessor": "triton"}
    [(reference, _)] = _engine_run(tiny_pipeline, None, [request], max_batch=1).values()
    assert (found["guided"][0] - reference).abs().max().item() <= BATCH_ATOL


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL puts one rank on each)")
def test_a_gang_on_two_gpus_over_nccl(tiny_config):
    """The same split over NCCL, one GPU per rank, against one GPU."""
    config = tiny_config.model_copy(update={"model": tiny_config.model.model_copy(
        update={"device": "cuda", "attention_backend": "sdpa"})})
    chosen = [REQUESTS[0], REQUESTS[3]]
    expected = run_gang(config, 1, 1, _alone(chosen), timeout_s=300)
    for ulysses, cfg in ((2, 1), (1, 2)):
        found = run_gang(config, ulysses, cfg, _alone(chosen), timeout_s=300)
        for r in chosen:
            difference = (found[r["rid"]][0] - expected[r["rid"]][0]).abs().max().item()
            assert difference <= BATCH_ATOL, (ulysses, cfg, r["rid"], difference)


# ---- a gang in the live cluster: Ray places it, Serve replaces it --------------------------

GANG_APP = "gang"


@pytest.fixture(scope="module")
def gang_service(service, tmp_path_factory):
    """The service's app again at /gang, its Denoiser replica a gang of 2 ranks (Ulysses 2)
    in a placement group of 2 bundles."""
    from ray import serve

    from conftest import Service, wait_ready
    from serving.app import build_app
    from serving.config import load_config

    data = tmp_path_factory.mktemp("gang")
    small = "{num_cpus: 0.05}"
    config = load_config(None, environ={
        "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{data}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": str(data / "artifacts"),
        "DITSERVE_SERVER__DIRECTOR_POLL_SECONDS": "0.2",
        "DITSERVE_SERVER__LEASE_SECONDS": "6",
        "DITSERVE_SERVER__GATEWAY_NUM_CPUS": "0.05", "DITSERVE_SERVER__DIRECTOR_NUM_CPUS": "0.05",
        "DITSERVE_STAGES__TEXT_ENCODER": small, "DITSERVE_STAGES__VAE_DECODER": small,
        # split: every forward through the all-to-all (by_load would run these two-row jobs as rows)
        "DITSERVE_STAGES__DENOISER": "{num_cpus: 0.05, parallel: {ulysses: 2, layout: split}}",
        "DITSERVE_ENGINE__CHECKPOINT_EVERY": "5",
    })
    serve.run(build_app(config), name=GANG_APP, route_prefix=f"/{GANG_APP}")
    url = f"{service.url}/{GANG_APP}"
    wait_ready(url)
    yield Service(url, config, 0)
    serve.delete(GANG_APP)


def _gang_reports(url: str) -> list[dict]:
    """What each Denoiser replica reports of its gang (a dead replica's report lingers a
    while: the Director forgets it after three report periods)."""
    return [d["parallel"] for d in requests.get(f"{url}/readyz").json()["denoisers"]]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    return True


def _frames(mp4: bytes) -> torch.Tensor:
    import io

    import av
    import numpy as np

    with av.open(io.BytesIO(mp4)) as container:
        return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])).float()


def test_a_gang_replica_serves_the_single_device_video(gang_service, tiny_pipeline):
    from conftest import wait_for

    wait_for(lambda: requests.get(f"{gang_service.url}/readyz").json()["denoisers"], timeout=60)
    [gang] = _gang_reports(gang_service.url)
    assert (gang["ulysses"], gang["cfg"], gang["ranks"]) == (2, 1, 2)
    assert len(gang["worker_pids"]) == 1

    client = gang_service.client()
    video = client.videos.create_and_poll(prompt="a green circle", seconds="1", size="64x64",
                                          extra_body={"seed": 21, "num_inference_steps": 4}, poll_interval_ms=200)
    assert video.status == "completed", video.error
    served = _frames(client.videos.download_content(video.id).read())
    reference = _frames(tiny_pipeline.generate(tiny_pipeline.spec("a green circle", seed=21, num_inference_steps=4,
                                                                  seconds=1, size="64x64")).mp4)
    assert served.shape == reference.shape
    # Latents agree to float rounding (the tests above); through uint8 frames and H.264 that
    # is at most a level or two here and there, where a wrong split changes the picture.
    assert (served - reference).abs().mean().item() < 0.5


def test_a_dead_rank_fails_over_like_a_dead_replica(gang_service):
    import signal

    from conftest import wait_for

    client = gang_service.client()
    every = gang_service.config.engine.checkpoint_every
    body = dict(prompt="a gang that loses a rank", seconds="1", size="128x128",
                extra_body={"num_inference_steps": 60, "seed": 7})
    video = client.videos.create(**body)
    wait_for(lambda: client.videos.retrieve(video.id).progress >= 5 + 85 * (2 * every + 1) // 60)
    [gang] = _gang_reports(gang_service.url)
    [pid] = gang["worker_pids"]
    os.kill(pid, signal.SIGKILL)

    final = client.videos.poll(video.id, poll_interval_ms=200)
    assert final.status == "completed", final.error
    assert final.model_extra["resumed_from_step"] >= every  # from its checkpoint, not from step 0
    # Serve replaced the replica with a whole new gang.
    wait_for(lambda: any(g["worker_pids"] != [pid] for g in _gang_reports(gang_service.url)), timeout=120)
    # A gang computes the same every time: the interrupted job equals an uninterrupted one.
    again = client.videos.create_and_poll(**body, poll_interval_ms=200)
    assert again.model_extra["resumed_from_step"] is None
    assert client.videos.download_content(video.id).read() == client.videos.download_content(again.id).read()


def test_an_idle_gangs_dead_rank_is_replaced_before_any_job_needs_it(gang_service):
    """No job running: the replica's health check pings its workers, finds the dead one and
    Serve replaces the replica with a whole new gang, which then serves."""
    import signal

    from conftest import wait_for

    # A dead replica's report lingers for three report periods (90 s), so the live gang is the
    # one whose worker process exists (this machine runs them), and its replacement is a report
    # naming a worker no earlier report named.
    def live_gang() -> list[int] | None:
        return next((g["worker_pids"] for g in _gang_reports(gang_service.url) if _running(g["worker_pids"][0])), None)

    wait_for(live_gang, timeout=120)
    [pid] = live_gang()
    known = {p for g in _gang_reports(gang_service.url) for p in g["worker_pids"]}
    os.kill(pid, signal.SIGKILL)
    # Serve's health checks run every 10 s; the replica's replacement then forms its gang.
    wait_for(lambda: any(known.isdisjoint(g["worker_pids"]) for g in _gang_reports(gang_service.url)), timeout=150)
    video = gang_service.client().videos.create_and_poll(prompt="a new gang", seconds="1", size="64x64",
                                                         extra_body={"num_inference_steps": 2}, poll_interval_ms=200)
    assert video.status == "completed", video.error
    assert video.model_extra["resumed_from_step"] is None
