"""Request validation: frames and sizes the model can make, or an error naming the field."""

from __future__ import annotations

import math

import pytest

from serving.config import GenerationConfig
from serving.models.presets import PRESETS
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
