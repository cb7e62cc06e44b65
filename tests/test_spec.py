"""Request validation: frames and sizes the model can make, or an error naming the field."""

from __future__ import annotations

import math

import pytest

from serving.config import GenerationConfig
from serving.models.presets import PRESETS
from serving.pipeline.cost import job_cost
from serving.pipeline.spec import SpecError, build_spec

TINY = PRESETS["tiny"]


def spec(prompt="a red ball moving right", generation=None, **kw):
    return build_spec(TINY, generation or GenerationConfig(), prompt, **kw)


def error(**kw) -> SpecError:
    with pytest.raises(SpecError) as info:
        spec(**kw)
    return info.value


def test_defaults_come_from_the_preset():
    s = spec(seed=1)
    assert (s.width, s.height, s.num_frames, s.fps, s.num_inference_steps) == (64, 64, 17, 16, 8)
    assert s.seconds == 1.0


def test_config_defaults_override_the_preset():
    s = spec(generation=GenerationConfig(size="128x64", fps=8, num_inference_steps=3), seed=1)
    assert (s.width, s.height, s.fps, s.num_inference_steps, s.num_frames) == (128, 64, 8, 3, 9)


def test_seconds_and_fps_give_4k_plus_1_frames():
    assert spec(seconds=2, fps=16, seed=0).num_frames == 33
    assert spec(seconds=1, fps=24, seed=0).num_frames == 25
    assert spec(seconds=0.25, fps=16, seed=0).num_frames == 5


def test_frames_are_not_rounded_silently():
    e = error(seconds=1, fps=15)
    assert e.field == "seconds" and "multiple of 4" in e.message


def test_size_must_be_a_multiple_of_16():
    e = error(size="60x64")
    assert e.field == "size" and "multiple of 16" in e.message and "64x64" in e.message


@pytest.mark.parametrize("size", ["64", "axb", "64x64x3", "-16x16", "0x16"])
def test_malformed_sizes(size):
    assert error(size=size).field == "size"


def test_limits_name_their_field():
    assert error(size="2048x2048").field == "size"
    assert error(seconds=60).field == "seconds"
    assert error(num_inference_steps=0).field == "num_inference_steps"
    assert error(num_inference_steps=1000).field == "num_inference_steps"
    assert error(guidance_scale=math.nan).field == "guidance_scale"
    assert error(guidance_scale=-1.0).field == "guidance_scale"
    assert error(seed=-1).field == "seed"
    assert error(fps=0).field == "fps"
    assert error(shift=0.0).field == "shift"


def test_prompt_must_be_present_and_bounded():
    assert error(prompt="   ").field == "prompt"
    assert error(prompt="x" * 2001).field == "prompt"


def test_unseeded_requests_get_a_recorded_seed():
    a, b = spec(), spec()
    assert isinstance(a.seed, int) and a.seed >= 0
    assert a.seed != b.seed  # 1 in 2**31 chance of a false failure


# ---- the cost budget (serving/pipeline/cost.py) -------------------------------------------

WAN = PRESETS["wan2.1-t2v-1.3b"]
WIDE = GenerationConfig(max_pixels=1280 * 720)


def wan_error(**kw) -> SpecError:
    with pytest.raises(SpecError) as info:
        build_spec(WAN, WIDE, "a fox", seed=1, **kw)
    return info.value


def test_cost_is_latent_frames_times_tokens_times_steps_times_guidance_rows():
    s = build_spec(WAN, WIDE, "a fox", seed=1)  # 832x480, 5 s at 16 fps, 50 steps, guidance 5
    cost = job_cost(WAN.geometry, width=s.width, height=s.height, num_frames=s.num_frames,
                    steps=s.num_inference_steps, guidance_scale=s.guidance_scale)
    assert (cost.latent_frames, cost.tokens_per_frame, cost.rows) == (21, 52 * 30, 2)
    assert cost.token_steps == 21 * 1560 * 50 * 2
    unguided = job_cost(WAN.geometry, width=832, height=480, num_frames=81, steps=50, guidance_scale=1.0)
    assert unguided.token_steps * 2 == cost.token_steps


@pytest.mark.parametrize("kw", [{}, {"seconds": 10}, {"num_inference_steps": 100}, {"size": "1280x720"}])
def test_the_presets_defaults_and_their_typical_maxima_fit(kw):
    build_spec(WAN, WIDE, "a fox", seed=1, **kw)


def test_a_request_over_the_budget_names_the_field_that_grew_most_and_says_what_fits():
    e = wan_error(size="1280x720", fps=120, seconds=10, num_inference_steps=100)
    assert e.field == "fps" and "at most 4 fps fits" in e.message
    assert "at 832x480 and 16 fps with 50 steps, at most 10 s fits" in e.message
    assert wan_error(seconds=10, num_inference_steps=100).field in ("seconds", "num_inference_steps")
    assert wan_error(size="1280x720", num_inference_steps=100).field == "size"


@pytest.mark.parametrize("asked,field,pattern,unit", [
    ({"seconds": 8, "num_inference_steps": 100}, "num_inference_steps", r"at most (\d+) steps", int),
    ({"seconds": 10, "num_inference_steps": 70}, "seconds", r"at most ([\d.]+) s fits", float),
    ({"seconds": 8, "fps": 48}, "fps", r"at most (\d+) fps", int),
    ({"seconds": 8, "fps": 32}, "fps", r"at most (\d+) fps", int),
    ({"size": "1280x720", "seconds": 10}, "size", r"a size up to (\d+x\d+)", str),
])
def test_what_the_refusal_says_fits_does_fit(asked, field, pattern, unit):
    import re

    e = wan_error(**asked)
    assert e.field == field
    suggested = unit(re.search(pattern, e.message).group(1))
    build_spec(WAN, WIDE, "a fox", seed=1, **{**asked, field: suggested})


def test_the_budget_is_configurable():
    build_spec(WAN, WIDE, "a fox", seed=1)
    with pytest.raises(SpecError) as info:
        build_spec(WAN, GenerationConfig(max_cost=1_000_000), "a fox", seed=1)
    assert "allows 1,000,000" in info.value.message and "at most 1.25 s fits" in info.value.message
