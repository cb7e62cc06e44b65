"""The tiny architecture: the Wan2.1 classes at toy size, built in code from a seed.

`tiny-random` is exactly this; `tiny` loads these configs trained (serving/models/weights/tiny,
made by `train_tiny.py`, which starts from these builders). No files, no downloads: each
component is constructed under its own fixed seed, so a Ray replica that builds only the
VAE gets exactly the VAE that the single-process pipeline builds. ByT5's byte-level
tokenizer needs no vocabulary.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

TEXT_DIM = 64
LATENT_CHANNELS = 16

TEXT_ENCODER_CONFIG = dict(
    vocab_size=384,  # ByT5: 256 bytes + 3 specials + 125 sentinel ids
    d_model=TEXT_DIM, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
    relative_attention_num_buckets=32, relative_attention_max_distance=64,
    feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32,
    in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM,
    freq_dim=64, ffn_dim=512, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)

VAE_CONFIG = dict(
    base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
    attn_scales=[], temperal_downsample=[False, True, True],
    latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS,
)

# Wan2.1's released sampler: UniPC on flow-matching sigmas; the shift is set per request.
SCHEDULER_CONFIG = dict(
    _class_name="UniPCMultistepScheduler", num_train_timesteps=1000, prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=3.0, solver_order=2, solver_type="bh2", lower_order_final=True,
)

# `tiny-i2v`: the same DiT with Wan2.1-I2V's inputs (noisy latents, the 4-channel first-frame
# mask and the first frame's latents: 36 channels) and an image cross-attention over the
# tokens of a CLIP vision encoder at toy size, which sees the 64x64 frame as 8x8 patches
# (64 patches + the class token = 65 image tokens).
IMAGE_SIZE = 64
IMAGE_ENCODER_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    image_size=IMAGE_SIZE, patch_size=8,
)
I2V_TRANSFORMER_CONFIG = dict(
    TRANSFORMER_CONFIG, in_channels=2 * LATENT_CHANNELS + 4,
    image_dim=IMAGE_ENCODER_CONFIG["hidden_size"],
    added_kv_proj_dim=TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"],
)

# Each component gets its own seed offset so it can be built alone, identically.
_OFFSETS = {"text_encoder": 1, "transformer": 2, "vae": 3, "image_encoder": 4}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # fork_rng keeps the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tokenizer() -> ByT5Tokenizer:
    return ByT5Tokenizer()


def build_text_encoder(seed: int) -> UMT5EncoderModel:
    with _seeded(seed + _OFFSETS["text_encoder"]):
        return UMT5EncoderModel(UMT5Config(**TEXT_ENCODER_CONFIG)).eval()


def build_transformer(seed: int) -> WanTransformer3DModel:
    with _seeded(seed + _OFFSETS["transformer"]):
        return WanTransformer3DModel(**TRANSFORMER_CONFIG).eval()


def build_vae(seed: int) -> AutoencoderKLWan:
    with _seeded(seed + _OFFSETS["vae"]):
        return AutoencoderKLWan(**VAE_CONFIG).eval()


def build_image_processor():
    """CLIP's preprocessing at the toy encoder's input size (resize, centre crop, normalize)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_image_encoder(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with _seeded(seed + _OFFSETS["image_encoder"]):
        return CLIPVisionModel(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).eval()


def build_i2v_transformer(seed: int) -> WanTransformer3DModel:
    with _seeded(seed + _OFFSETS["transformer"]):
        return WanTransformer3DModel(**I2V_TRANSFORMER_CONFIG).eval()


def scheduler_config() -> dict:
    return dict(UniPCMultistepScheduler.from_config(SCHEDULER_CONFIG).config)
