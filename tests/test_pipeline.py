"""The reference pipeline: deterministic, faithful to diffusers' own WanPipeline, real MP4s."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from serving.pipeline.decode import decode
from serving.pipeline.encode import encode_text
from serving.pipeline.mp4 import encode_mp4

PROMPT = "a red fox running through snow"


def test_same_seed_same_video(tiny_pipeline):
    spec = tiny_pipeline.spec(PROMPT, seed=7)
    first, second = tiny_pipeline.generate(spec), tiny_pipeline.generate(spec)
    assert torch.equal(first.latents, second.latents)
    assert torch.equal(first.frames, second.frames)


def test_different_seed_different_video(tiny_pipeline):
    a = tiny_pipeline.latents(tiny_pipeline.spec(PROMPT, seed=1))
    b = tiny_pipeline.latents(tiny_pipeline.spec(PROMPT, seed=2))
    assert (a - b).abs().max() > 0.1


def test_prompt_changes_the_video(tiny_pipeline):
    a = tiny_pipeline.latents(tiny_pipeline.spec(PROMPT, seed=1))
    b = tiny_pipeline.latents(tiny_pipeline.spec("a blue square moving up", seed=1))
    assert (a - b).abs().max() > 1e-3


# fp32 on CPU: our split stages batch the CFG rows into one forward where diffusers runs two,
# which changes float summation order only; 1e-4 absolute is the bound.
FIDELITY_ATOL = 1e-4


@pytest.mark.parametrize("guidance_scale,negative_prompt", [(5.0, "blurry, static"), (1.0, "")])
def test_final_latents_equal_diffusers_wan_pipeline(tiny_pipeline, guidance_scale, negative_prompt):
    spec = tiny_pipeline.spec(PROMPT, seed=11, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                              num_inference_steps=6, seconds=1, size="64x64", fps=16)
    ours = tiny_pipeline.latents(spec)

    scheduler = UniPCMultistepScheduler.from_config(tiny_pipeline.scheduler_config, flow_shift=spec.shift)
    peer = WanPipeline(tokenizer=tiny_pipeline.text.tokenizer, text_encoder=tiny_pipeline.text.model,
                       vae=tiny_pipeline.vae, scheduler=scheduler, transformer=tiny_pipeline.transformer)
    peer.set_progress_bar_config(disable=True)
    theirs = peer(
        prompt=spec.prompt, negative_prompt=spec.negative_prompt, height=spec.height, width=spec.width,
        num_frames=spec.num_frames, num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale, generator=torch.Generator("cpu").manual_seed(spec.seed),
        output_type="latent", max_sequence_length=spec.max_sequence_length,
    ).frames
    assert ours.shape == theirs.shape == (1, 16, 5, 8, 8)
    assert (ours - theirs).abs().max().item() <= FIDELITY_ATOL


def test_encoded_text_is_zero_past_the_prompt(tiny_pipeline):
    embeds = encode_text(tiny_pipeline.text.tokenizer, tiny_pipeline.text.model, ["ab", "abcdef"], 16)
    assert embeds.shape == (2, 16, tiny_pipeline.text.model.config.d_model)
    # ByT5: one token per byte plus </s>.
    assert embeds[0, :3].abs().sum() > 0 and embeds[0, 3:].abs().sum() == 0
    assert embeds[1, :7].abs().sum() > 0 and embeds[1, 7:].abs().sum() == 0


def test_decode_gives_uint8_frames_of_the_requested_shape(tiny_pipeline):
    spec = tiny_pipeline.spec(PROMPT, seed=3, size="96x64", seconds=0.5, fps=16, num_inference_steps=2)
    frames = decode(tiny_pipeline.vae, tiny_pipeline.latents(spec))
    assert frames.dtype == torch.uint8
    assert tuple(frames.shape) == (spec.num_frames, 64, 96, 3) == (9, 64, 96, 3)


def test_mp4_is_h264_with_real_fps_and_every_frame():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(9, 32, 48, 3), dtype=np.uint8)
    data = encode_mp4(frames, fps=12)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 12
    assert len(decoded) == 9 and decoded[0].shape == (32, 48, 3)


def test_mp4_rejects_frames_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        encode_mp4(np.zeros((4, 8, 8), dtype=np.uint8), fps=8)
