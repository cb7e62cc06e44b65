"""Image-to-video (issue 20): a Wan2.1-I2V preset from a local diffusers folder, its first
frame's conditioning, and the staged pipeline against diffusers' WanImageToVideoPipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from PIL import Image

from serving.config import ModelConfig, ServiceConfig
from serving.models import tiny
from serving.models.loading import ModelFolderError, check_model_folder, load_image_encoder
from serving.models.presets import PRESETS, image_presets

PRESET = "wan2.1-i2v-14b-480p"
FIDELITY_ATOL = 1e-4  # as tests/test_pipeline.py: fp32, only the summation order differs
CLIP_SIZE = 32  # the toy CLIP's input: (32 / 8)^2 patches + 1 class token = 17 image tokens


def _toy_clip():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(5)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=CLIP_SIZE, patch_size=8)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})
    return processor, encoder


def _toy_i2v_transformer() -> WanTransformer3DModel:
    torch.manual_seed(6)
    heads, head_dim = 2, 16
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=2 * tiny.LATENT_CHANNELS + 4, out_channels=tiny.LATENT_CHANNELS, text_dim=tiny.TEXT_DIM,
        freq_dim=64, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        image_dim=24, added_kv_proj_dim=heads * head_dim, rope_max_seq_len=1024).eval()


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory, tiny_pipeline):
    """A toy Wan2.1-I2V checkpoint in the diffusers layout, written here with save_pretrained
    (the tiny preset's text encoder and VAE, a toy CLIP and an I2V-shaped DiT)."""
    folder = tmp_path_factory.mktemp("wan-i2v")
    processor, encoder = _toy_clip()
    WanImageToVideoPipeline(
        tokenizer=tiny_pipeline.text.tokenizer, text_encoder=tiny_pipeline.text.model, vae=tiny_pipeline.vae,
        scheduler=UniPCMultistepScheduler.from_config(tiny.scheduler_config()), image_processor=processor,
        image_encoder=encoder, transformer=_toy_i2v_transformer(),
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def i2v_pipeline(i2v_folder):
    from serving.pipeline.local import LocalPipeline

    return LocalPipeline(ServiceConfig(model=ModelConfig(preset=PRESET, path=str(i2v_folder), device="cpu",
                                                         dtype="float32")))


def _frame(width: int = 64, height: int = 64) -> Image.Image:
    """A first frame: a red disc on a blue-grey ground."""
    from PIL import ImageDraw

    image = Image.new("RGB", (width, height), (70, 80, 110))
    ImageDraw.Draw(image).ellipse((20, 18, 40, 38), fill=(220, 40, 30))
    return image


def test_the_i2v_presets_take_an_image_and_need_its_encoder(tmp_path, i2v_folder):
    assert image_presets() == ["wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"]
    assert not PRESETS["wan2.1-t2v-14b"].takes_image
    assert (PRESETS["wan2.1-i2v-14b-480p"].defaults.shift, PRESETS["wan2.1-i2v-14b-720p"].defaults.shift) == (3.0, 5.0)
    assert load_image_encoder(ModelConfig()) is None  # tiny: text only
    # A text-to-video folder is not enough for an I2V preset: the error lists what is missing.
    import shutil

    t2v = tmp_path / "t2v-only"
    shutil.copytree(i2v_folder, t2v, ignore=shutil.ignore_patterns("image_encoder", "image_processor"))
    with pytest.raises(ModelFolderError, match="image encoder config.*image encoder weights.*image processor config"):
        check_model_folder(ModelConfig(preset=PRESET, path=str(t2v)))


def test_the_first_frame_mask_marks_the_given_frame():
    from serving.models.presets import Geometry
    from serving.pipeline.image import first_frame_mask

    spec = PRESETS[PRESET]
    from serving.config import GenerationConfig
    from serving.pipeline.spec import build_spec

    spec = build_spec(PRESETS[PRESET], GenerationConfig(), "x", size="64x64", num_frames=9)
    mask = first_frame_mask(spec, Geometry())
    assert mask.shape == (1, 4, 3, 8, 8)  # 4 pixel frames per latent frame, 3 latent frames
    assert mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_final_latents_equal_diffusers_wan_image_to_video_pipeline(i2v_pipeline, guidance_scale):
    spec = i2v_pipeline.spec("the red disc rolls to the right", seed=13, guidance_scale=guidance_scale,
                             negative_prompt="blurry", num_inference_steps=5, size="64x64", num_frames=9)
    assert spec.max_sequence_length == 512  # diffusers' Wan attention splits image from text tokens at 512
    image = _frame()
    ours = i2v_pipeline.latents(spec, image=image)

    peer = WanImageToVideoPipeline(
        tokenizer=i2v_pipeline.text.tokenizer, text_encoder=i2v_pipeline.text.model, vae=i2v_pipeline.vae,
        scheduler=UniPCMultistepScheduler.from_config(i2v_pipeline.scheduler_config, flow_shift=spec.shift),
        image_processor=i2v_pipeline.image_encoder.processor, image_encoder=i2v_pipeline.image_encoder.model,
        transformer=i2v_pipeline.transformer)
    peer.set_progress_bar_config(disable=True)
    theirs = peer(
        image=image, prompt=spec.prompt, negative_prompt=spec.negative_prompt, height=spec.height, width=spec.width,
        num_frames=spec.num_frames, num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(spec.seed), output_type="latent",
        max_sequence_length=spec.max_sequence_length,
    ).frames
    assert ours.shape == theirs.shape == (1, 16, 3, 8, 8)
    assert (ours - theirs).abs().max().item() <= FIDELITY_ATOL
    # The image matters: another first frame, another video.
    other = i2v_pipeline.latents(spec, image=Image.new("RGB", (64, 64), (10, 200, 60)))
    assert (other - ours).abs().max().item() > 1e-2


def test_an_i2v_preset_needs_an_image_and_a_t2v_one_refuses_it(i2v_pipeline, tiny_pipeline):
    spec = i2v_pipeline.spec("a disc", size="64x64", num_frames=9, num_inference_steps=1)
    with pytest.raises(ValueError, match="give an image"):
        i2v_pipeline.latents(spec)
    with pytest.raises(ValueError, match="takes no image"):
        tiny_pipeline.latents(tiny_pipeline.spec("a disc"), image=_frame())


def test_i2v_requests_refuse_step_caching_by_name(i2v_pipeline):
    from serving.pipeline.spec import SpecError

    with pytest.raises(SpecError, match="does not run step caching") as refused:
        i2v_pipeline.spec("a disc", size="64x64", num_frames=9, cache="balanced")
    assert refused.value.field == "cache"
    assert i2v_pipeline.spec("a disc", size="64x64", num_frames=9).cache_threshold == 0.0


def test_checkpoints_carry_the_image_conditioning(i2v_pipeline):
    from serving.pipeline.denoise import denoise_batch_step, load_state, save_state, start_denoise

    spec = i2v_pipeline.spec("a disc", seed=2, size="64x64", num_frames=9, num_inference_steps=4)
    image = i2v_pipeline.encode_image(spec, _frame())
    cond, neg = i2v_pipeline.encode(spec)
    geometry, channels = i2v_pipeline.preset.geometry, i2v_pipeline.transformer.config.out_channels
    straight = start_denoise(spec, i2v_pipeline.scheduler_config, channels, geometry, image=image)
    resumed = start_denoise(spec, i2v_pipeline.scheduler_config, channels, geometry, image=image)
    for _ in range(2):
        denoise_batch_step(i2v_pipeline.transformer, [resumed], [cond], [neg])
    resumed = load_state(save_state(resumed), spec)
    assert torch.equal(resumed.image.condition, image.condition)
    while not resumed.done:
        denoise_batch_step(i2v_pipeline.transformer, [resumed], [cond], [neg])
    while not straight.done:
        denoise_batch_step(i2v_pipeline.transformer, [straight], [cond], [neg])
    assert torch.equal(resumed.latents, straight.latents)


def test_our_attention_kernel_runs_the_image_cross_attention(i2v_folder, i2v_pipeline):
    """Our processor takes Wan2.1-I2V's cross-attention (image tokens with their own keys and
    values, added to the text's): the Triton kernel (interpreted on a CPU) gives SDPA's latents."""
    from serving.kernels.wan import KernelAttnProcessor
    from serving.pipeline.local import LocalPipeline

    kernel = LocalPipeline(ServiceConfig(model=ModelConfig(preset=PRESET, path=str(i2v_folder), device="cpu",
                                                           dtype="float32", attention_backend="triton")))
    assert {type(p) for p in kernel.transformer.attn_processors.values()} == {KernelAttnProcessor}
    spec = kernel.spec("a disc", seed=4, size="64x64", num_frames=9, num_inference_steps=2)
    found = kernel.latents(spec, image=_frame())
    expected = i2v_pipeline.latents(spec, image=_frame())
    assert (found - expected).abs().max().item() <= FIDELITY_ATOL


def test_the_service_refuses_an_i2v_preset_before_starting(tmp_path):
    """Until images travel through the stages (issue 20, items 1-2), `ditserve serve` says so
    at once instead of starting a service that could take no request."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "serving.cli", "serve"], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "DITSERVE_MODEL__PRESET": PRESET,
                                 "DITSERVE_MODEL__PATH": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "does not carry images through its stages yet" in result.stderr
