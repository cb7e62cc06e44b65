"""The Denoiser engine: step-level batching gives each request the latents it gets alone;
priority, cancellation and checkpoints behave at step boundaries."""

from __future__ import annotations

import asyncio

import torch

from serving.engine.scheduler import AsyncDenoiseEngine, DenoiseEngine, EngineRequest
from serving.pipeline.denoise import load_state, start_denoise

# Batching changes only float summation order inside the DiT (fp32, CPU). Seen: ~1e-6.
BATCH_ATOL = 1e-4


def request(pipeline, rid, prompt, seed, priority=0, **overrides) -> EngineRequest:
    spec = pipeline.spec(prompt, seed=seed, num_inference_steps=overrides.pop("steps", 6), **overrides)
    cond, neg = pipeline.encode(spec)
    state = start_denoise(spec, pipeline.scheduler_config, pipeline.transformer.config.in_channels,
                          pipeline.preset.geometry)
    return EngineRequest(id=rid, state=state, prompt_embeds=cond, negative_embeds=neg, priority=priority)


def alone(pipeline, req: EngineRequest) -> torch.Tensor:
    return pipeline.latents(req.state.spec)


def run_until_idle(engine: DenoiseEngine, limit=1000):
    events = []
    for _ in range(limit):
        if engine.idle:
            return events
        events += engine.step_batch()
    raise AssertionError("engine did not drain")


def test_requests_at_different_steps_batch_to_the_same_latents(tiny_pipeline):
    p = tiny_pipeline
    a = request(p, "a", "a red circle moving right", seed=1, guidance_scale=5.0)
    b = request(p, "b", "a blue square", seed=2, guidance_scale=3.0, negative_prompt="blurry")
    c = request(p, "c", "a green triangle", seed=3, guidance_scale=1.0)  # no CFG rows
    engine = DenoiseEngine(p.transformer, max_batch=3)
    engine.add(a)
    events = engine.step_batch() + engine.step_batch()  # a is 2 steps ahead
    engine.add(b)
    events += engine.step_batch()  # a at 3, b at 1
    engine.add(c)
    events += run_until_idle(engine)
    finished = {e.request_id: e.latents for e in events if e.kind == "finished"}
    assert set(finished) == {"a", "b", "c"}
    assert max(e.batch_size for e in events if e.kind == "step") == 3  # they really shared forwards
    for req in (a, b, c):
        difference = (finished[req.id] - alone(p, req)).abs().max().item()
        assert difference <= BATCH_ATOL, (req.id, difference)


def test_only_matching_shapes_share_a_forward(tiny_pipeline):
    p = tiny_pipeline
    engine = DenoiseEngine(p.transformer, max_batch=4)
    engine.add(request(p, "small", "x", seed=1, steps=2))
    engine.add(request(p, "wide", "x", seed=1, steps=2, size="96x64"))
    engine.add(request(p, "small2", "y", seed=2, steps=2))
    first = engine.step_batch()
    assert {e.request_id for e in first if e.kind == "step"} == {"small", "small2"}
    events = first + run_until_idle(engine)
    assert {e.request_id for e in events if e.kind == "finished"} == {"small", "wide", "small2"}


def test_priority_first_then_first_come(tiny_pipeline):
    p = tiny_pipeline
    engine = DenoiseEngine(p.transformer, max_batch=1)
    for rid, priority in (("low-1", 0), ("low-2", 0), ("high", 5), ("low-3", 0)):
        engine.add(request(p, rid, rid, seed=1, steps=2, priority=priority))
    started = [e.request_id for e in run_until_idle(engine) if e.kind == "started"]
    assert started == ["high", "low-1", "low-2", "low-3"]


def test_cancelled_request_stops_within_one_step(tiny_pipeline):
    p = tiny_pipeline
    engine = DenoiseEngine(p.transformer, max_batch=2)
    engine.add(request(p, "keep", "x", seed=1, steps=4))
    engine.add(request(p, "drop", "y", seed=2, steps=4))
    engine.step_batch()
    engine.cancel("drop")
    later = run_until_idle(engine)
    assert all(e.request_id == "keep" for e in later)
    assert any(e.kind == "finished" for e in later)


def test_checkpoint_resumes_to_the_same_result(tiny_pipeline):
    p = tiny_pipeline
    original = request(p, "job", "a red circle", seed=9, steps=6)
    engine = DenoiseEngine(p.transformer, max_batch=1, checkpoint_every=2)
    engine.add(original)
    events = run_until_idle(engine)
    checkpoints = [e for e in events if e.kind == "checkpoint"]
    assert [e.step for e in checkpoints] == [2, 4]
    final = next(e.latents for e in events if e.kind == "finished")

    restored = load_state(checkpoints[0].checkpoint, original.state.spec)  # as if the replica died at step 3
    assert restored.step == 2
    resumed = EngineRequest(id="job", state=restored, prompt_embeds=original.prompt_embeds,
                            negative_embeds=original.negative_embeds)
    engine2 = DenoiseEngine(p.transformer, max_batch=1)
    engine2.add(resumed)
    steps = [e.step for e in run_until_idle(engine2) if e.kind == "step"]
    assert steps == [3, 4, 5, 6]
    assert torch.allclose(resumed.state.latents, final, atol=BATCH_ATOL)


def test_async_engine_streams_events_and_cancels_on_close(tiny_pipeline):
    p = tiny_pipeline

    async def scenario():
        engine = AsyncDenoiseEngine(DenoiseEngine(p.transformer, max_batch=2))
        kinds = [e.kind async for e in engine.submit(request(p, "one", "x", seed=1, steps=3))]
        stream = engine.submit(request(p, "two", "y", seed=2, steps=50))
        first = await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.2)
        return kinds, first.kind, engine.engine.idle

    kinds, first, idle = asyncio.run(scenario())
    assert kinds == ["started", "step", "step", "step", "finished"]
    assert first == "started" and idle


def test_a_request_hears_it_started_before_its_first_forward_ends(tiny_pipeline):
    """The Director stamps `denoiser_started_at` (the end of the queue wait) on "started": sent
    with the first step's results, it made every queue wait one forward too long."""
    import threading

    p = tiny_pipeline
    heard = threading.Event()
    during_first_forward = []
    original = p.transformer.forward

    def first_forward_waits_for_the_news(*args, **kwargs):
        if not during_first_forward:
            during_first_forward.append(heard.wait(timeout=5.0))
        return original(*args, **kwargs)

    async def scenario():
        engine = AsyncDenoiseEngine(DenoiseEngine(p.transformer, max_batch=1))
        kinds = []
        async for event in engine.submit(request(p, "a", "x", seed=1, steps=2)):
            kinds.append(event.kind)
            if event.kind == "started":
                heard.set()
        return kinds

    p.transformer.forward = first_forward_waits_for_the_news
    try:
        kinds = asyncio.run(scenario())
    finally:
        del p.transformer.forward
    assert kinds == ["started", "step", "step", "finished"]
    assert during_first_forward == [True]


def test_a_failure_outside_the_forward_fails_no_stream_and_stops_no_loop(tiny_pipeline):
    """A step-boundary error that is not the forward's (here the metrics callback) used to end
    the engine's loop and leave every open stream waiting forever."""
    p = tiny_pipeline
    broken = {"times": 1}

    def flaky_metrics(batch_size: int, seconds: float) -> None:
        if broken["times"]:
            broken["times"] -= 1
            raise RuntimeError("metrics backend unavailable")

    async def scenario():
        engine = AsyncDenoiseEngine(DenoiseEngine(p.transformer, max_batch=2, on_forward=flaky_metrics))

        async def kinds(req):
            return [e.kind async for e in engine.submit(req)]

        runs = asyncio.gather(kinds(request(p, "a", "x", seed=1, steps=3)), kinds(request(p, "b", "y", seed=2, steps=3)))
        return await asyncio.wait_for(runs, timeout=120)

    for kinds in asyncio.run(scenario()):
        assert kinds[-1] == "finished" and kinds.count("step") == 3


def test_a_request_whose_hand_back_fails_fails_alone(tiny_pipeline):
    p = tiny_pipeline
    good = request(p, "good", "x", seed=1, steps=2)
    bad = request(p, "bad", "y", seed=2, steps=2)
    import threading

    bad.state.scheduler.unpicklable = threading.Lock()  # its checkpoint cannot be written; its forward runs
    engine = DenoiseEngine(p.transformer, max_batch=1, checkpoint_every=1)
    engine.add(good)
    engine.add(bad)
    events = run_until_idle(engine)
    ends = {e.request_id: e.kind for e in events if e.kind in ("finished", "failed")}
    assert ends == {"good": "finished", "bad": "failed"}


def test_a_request_waiting_for_a_slot_hears_from_the_engine(tiny_pipeline):
    p = tiny_pipeline
    engine = DenoiseEngine(p.transformer, max_batch=1, waiting_event_seconds=0.0)
    engine.add(request(p, "first", "x", seed=1, steps=3))
    engine.add(request(p, "second", "y", seed=2, steps=3))
    events = run_until_idle(engine)
    second = [e.kind for e in events if e.request_id == "second"]
    assert second[:3] == ["waiting", "waiting", "waiting"] and second[3] == "started"
    assert not [e for e in events if e.request_id == "first" and e.kind == "waiting"]


def test_a_started_request_left_out_of_batches_still_hears_from_the_engine(tiny_pipeline):
    """A more urgent job takes the only slot from one already denoising: the one left out is
    queued, not stuck, so its caller must go on hearing from the engine (or it would time the
    silence out and retry a job that was only waiting)."""
    p = tiny_pipeline
    engine = DenoiseEngine(p.transformer, max_batch=1, waiting_event_seconds=0.0)
    engine.add(request(p, "low", "x", seed=1, steps=3))
    events = engine.step_batch()  # "low" starts and runs its first step
    engine.add(request(p, "urgent", "y", seed=2, steps=3, priority=5))
    events += run_until_idle(engine)
    low = [e.kind for e in events if e.request_id == "low"]
    assert low[:2] == ["started", "step"]
    assert low[2:5] == ["waiting", "waiting", "waiting"]  # one per step of "urgent"
    assert low[-1] == "finished"


def test_the_forward_in_flight_is_timed_for_the_hang_watchdog(tiny_pipeline):
    p = tiny_pipeline
    seen = []
    engine = DenoiseEngine(p.transformer, max_batch=1)
    original = p.transformer.forward

    def watched(*args, **kwargs):
        seen.append(engine.forward_started_at is not None and engine.forward_running_seconds() >= 0)
        return original(*args, **kwargs)

    p.transformer.forward = watched
    try:
        engine.add(request(p, "a", "x", seed=1, steps=2))
        run_until_idle(engine)
    finally:
        del p.transformer.forward
    assert seen and all(seen)  # timed while it ran...
    assert engine.forward_started_at is None and engine.forward_running_seconds() == 0.0  # ...and not after


def test_a_later_attempt_of_a_job_ends_the_earlier_one_still_denoising(tiny_pipeline):
    """A Director died while its job was denoising: the retry's request replaces the orphan,
    which stops taking batch slots and whose stream ends instead of running for nobody."""
    p = tiny_pipeline

    async def scenario():
        engine = AsyncDenoiseEngine(DenoiseEngine(p.transformer, max_batch=2))
        orphan = engine.submit(request(p, "video_1/attempt-1", "x", seed=1, steps=100))
        assert (await orphan.__anext__()).kind == "started"
        bystander = engine.submit(request(p, "video_2/attempt-1", "y", seed=2, steps=100))
        assert (await bystander.__anext__()).kind == "started"
        assert engine.supersede("video_1/", "a later attempt started") == 1
        kinds = [e.kind async for e in orphan]
        still_running = "video_2/attempt-1" in engine.engine.active
        await bystander.aclose()
        return kinds, still_running, set(engine.engine.active)

    kinds, still_running, active = asyncio.run(scenario())
    assert kinds[-1] == "failed" and "finished" not in kinds
    assert still_running and active == set()


def test_progress_is_written_at_most_once_per_interval_and_always_at_the_last_step():
    from serving.deployments.driving import ProgressWrites

    writes = ProgressWrites(every_seconds=0.5)
    # 100 steps of 0.01 s: the first, one per half second, and the last.
    due = [step for step in range(1, 101) if writes.due(step, 100, now=step * 0.01)]
    assert due == [1, 51, 100]
    every_step = ProgressWrites(every_seconds=0)
    assert all(every_step.due(step, 10, now=0.0) for step in range(1, 11))
