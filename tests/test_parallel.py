"""A Denoiser across a gang of devices (serving/parallel/): with 2 ranks on gloo, Ulysses 2
and CFG 2 each give the single-device latents within fp32 tolerance, alone and batched, for
a token count that does not divide by the degree, with and without step caching."""

from __future__ import annotations

import pytest
import torch

from serving.engine.scheduler import DenoiseEngine, EngineRequest
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


@pytest.fixture(scope="module")
def single_device(tiny_pipeline):
    return _alone_and_batched(tiny_pipeline, None)


@pytest.fixture(scope="module")
def sdpa_config(tiny_config):
    # Both sides run SDPA: the comparison is about the split, not about attention backends.
    return tiny_config.model_copy(update={"model": tiny_config.model.model_copy(update={"attention_backend": "sdpa"})})


def test_uneven_slices_cover_the_sequence():
    assert shard_sizes(27, 2) == [14, 13]
    assert shard_sizes(5, 4) == [2, 1, 1, 1]
    assert sum(shard_sizes(32760, 8)) == 32760


@pytest.mark.parametrize("ulysses,cfg", [(2, 1), (1, 2)], ids=["ulysses2", "cfg2"])
def test_a_gang_of_two_gives_the_single_device_latents(single_device, sdpa_config, ulysses, cfg):
    expected_alone, expected_batched = single_device
    alone, batched = run_gang(sdpa_config, ulysses, cfg, _alone_and_batched, timeout_s=300)
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
