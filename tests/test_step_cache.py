"""Step caching per request inside the batching engine (serving/pipeline/step_cache.py):
the split forward is the model's own when nothing is cached; a caching request computes
fewer steps; in a batch that mixes cached, uncached and differently cached requests at
different steps each gets exactly what it gets alone; its cache state travels in its
checkpoint, so a resumed request continues identically; the API takes and reports it."""

from __future__ import annotations

import pytest
import requests
import torch

from serving.engine.scheduler import DenoiseEngine, EngineRequest
from serving.pipeline.denoise import load_state, save_state, start_denoise
from serving.pipeline.spec import SpecError
from serving.pipeline.step_cache import forward_with_caches

from test_engine import BATCH_ATOL, request, run_until_idle

STEPS = 20  # the tiny model's 8 default steps leave little to skip


def alone(pipeline, spec):
    """The request denoised by itself, with the engine (so its step-cache count is known)."""
    engine = DenoiseEngine(pipeline.transformer, max_batch=1)
    cond, neg = pipeline.encode(spec)
    state = start_denoise(spec, pipeline.scheduler_config, pipeline.transformer.config.in_channels,
                          pipeline.preset.geometry)
    engine.add(EngineRequest(id="alone", state=state, prompt_embeds=cond, negative_embeds=neg))
    [finished] = [e for e in run_until_idle(engine) if e.kind == "finished"]
    return finished.latents, finished.computed_steps


def test_with_nothing_cached_the_split_forward_is_the_models_own(tiny_pipeline):
    transformer = tiny_pipeline.transformer
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 16, 5, 8, 8, generator=generator)
    timesteps = torch.tensor([999.0, 500.0, 999.0])
    text = torch.randn(3, 128, 64, generator=generator)
    expected = transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=text, return_dict=False)[0]
    found, computed = forward_with_caches(transformer, latents, timesteps, text, [0, 1, 0], [None, None],
                                          [(0, 8), (3, 8)])
    assert computed == [True, True]
    assert torch.equal(found, expected)


def test_a_caching_request_computes_fewer_steps_and_stays_close(tiny_pipeline):
    p = tiny_pipeline
    reference, computed = alone(p, p.spec("a red circle moving left", seed=4, num_inference_steps=STEPS))
    assert computed == STEPS
    cached, cached_computed = alone(p, p.spec("a red circle moving left", seed=4, num_inference_steps=STEPS,
                                              cache="balanced"))
    assert cached_computed < STEPS
    error = ((cached - reference).norm() / reference.norm()).item()
    # It did skip work, and stayed near the uncached video: 0.11 here, 0.20 on average over the
    # held-out prompts (docs/benchmarks.md); a wrong residual lands near 1.
    assert 0 < error < 0.25, error


def test_batches_mixing_cache_settings_give_each_request_its_own_result(tiny_pipeline):
    p = tiny_pipeline
    a = request(p, "a", "a red circle moving right", seed=1, steps=STEPS, cache="balanced")
    b = request(p, "b", "a blue square", seed=2, steps=STEPS, negative_prompt="blurry")  # uncached
    c = request(p, "c", "a green triangle", seed=3, steps=STEPS, cache="fast", guidance_scale=1.0)
    engine = DenoiseEngine(p.transformer, max_batch=3)
    engine.add(a)
    events = engine.step_batch() + engine.step_batch() + engine.step_batch()  # a 3 steps ahead
    engine.add(b)
    events += engine.step_batch()
    engine.add(c)
    events += run_until_idle(engine)
    finished = {e.request_id: e for e in events if e.kind == "finished"}
    assert max(e.batch_size for e in events if e.kind == "step") == 3
    cached_steps = {e.request_id for e in events if e.kind == "step" and e.cached}
    assert cached_steps == {"a", "c"}  # b never skips; a and c did, in shared batches
    for req in (a, b, c):
        latents, computed = alone(p, req.state.spec)
        assert finished[req.id].computed_steps == computed, req.id
        difference = (finished[req.id].latents - latents).abs().max().item()
        assert difference <= BATCH_ATOL, (req.id, difference)
    assert finished["b"].computed_steps == STEPS and finished["a"].computed_steps < STEPS


def test_a_resumed_request_continues_its_cache_identically(tiny_pipeline):
    p = tiny_pipeline
    spec = p.spec("a yellow circle", seed=9, num_inference_steps=STEPS, cache="fast")
    whole, whole_computed = alone(p, spec)
    first = request(p, "first", "a yellow circle", seed=9, steps=STEPS, cache="fast")
    engine = DenoiseEngine(p.transformer, max_batch=1)
    engine.add(first)
    for _ in range(STEPS // 2):
        engine.step_batch()
    checkpoint = save_state(first.state)
    assert first.state.cache.residuals is not None
    resumed = EngineRequest(id="resumed", state=load_state(checkpoint, spec), prompt_embeds=first.prompt_embeds,
                            negative_embeds=first.negative_embeds)
    other = DenoiseEngine(p.transformer, max_batch=1)
    other.add(resumed)
    [finished] = [e for e in run_until_idle(other) if e.kind == "finished"]
    assert torch.equal(finished.latents, whole) and finished.computed_steps == whole_computed


@pytest.mark.parametrize(("cache", "words"), [("turbo", "expected off, balanced, fast"),
                                              (0.9, "over this server's maximum"), (-1, "expected off")])
def test_a_cache_setting_the_server_refuses_names_the_field(tiny_pipeline, cache, words):
    with pytest.raises(SpecError) as refused:
        tiny_pipeline.spec("a cat", cache=cache)
    assert refused.value.field == "cache" and words in refused.value.message


def test_the_video_reports_its_cache_and_computed_steps(service):
    body = {"prompt": "a blue square moving up", "seconds": "1", "size": "64x64", "num_inference_steps": STEPS,
            "seed": 5}
    client = service.client()
    made = {}
    for cache in ("off", "fast"):
        video = client.videos.create_and_poll(**{k: v for k, v in body.items() if k in ("prompt", "seconds", "size")},
                                              extra_body={"num_inference_steps": STEPS, "seed": 5, "cache": cache},
                                              poll_interval_ms=200)
        assert video.status == "completed", video.error
        made[cache] = video.model_extra
    assert made["off"]["cache_threshold"] == 0 and made["off"]["computed_steps"] == STEPS
    assert made["fast"]["cache_threshold"] == 0.2 and 0 < made["fast"]["computed_steps"] < STEPS
    refused = requests.post(f"{service.url}/v1/videos", json={**body, "cache": "turbo"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache"
