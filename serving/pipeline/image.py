"""Image-to-video conditioning: a first frame -> what Wan2.1-I2V's DiT takes besides text.

Two things, both computed once per job, as Wan2.1-I2V prepares them:

- image tokens: the CLIP vision encoder's penultimate hidden states of the frame (257 x 1280
  for ViT-H/14), which every DiT block cross-attends to beside the text;
- the first-frame condition, concatenated to the noisy latents on the channel axis at every
  step: a mask saying which frames are given (4 channels: the first latent frame packs the
  first pixel frame 4 times over) and the VAE's latents of a clip that is the frame followed
  by black (16 channels, normalized like the latents).

The frame is resized to the request's size with diffusers' VideoProcessor (the library's own
resizing and [-1, 1] scaling), so the condition is exactly what WanImageToVideoPipeline builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.models.presets import Geometry
from serving.pipeline.spec import VideoSpec


@dataclass
class ImageCondition:
    """A job's image conditioning, on the CPU between stages and in checkpoints."""

    image_embeds: torch.Tensor  # (1, image tokens, CLIP dim), float32
    condition: torch.Tensor  # (1, 4 + z, latent frames, latent height, latent width), float32


@torch.inference_mode()
def encode_image_tokens(processor, encoder: torch.nn.Module, image) -> torch.Tensor:
    """CLIP's penultimate hidden states of `image` (a PIL image), (1, tokens, dim)."""
    device = next(encoder.parameters()).device
    pixels = processor(images=image, return_tensors="pt").to(device)
    return encoder(**pixels, output_hidden_states=True).hidden_states[-2].float().cpu()


def first_frame_mask(spec: VideoSpec, geometry: Geometry) -> torch.Tensor:
    """(1, temporal_factor, latent frames, h, w): 1 where a pixel frame is given (the first)."""
    height, width = spec.height // geometry.vae_spatial_factor, spec.width // geometry.vae_spatial_factor
    per_frame = torch.zeros(1, 1, spec.num_frames, height, width)
    per_frame[:, :, 0] = 1.0
    # The VAE packs the first pixel frame alone into the first latent frame: repeat it so that
    # every latent frame stands for `temporal_factor` pixel frames, then fold them into channels.
    frames = torch.cat([per_frame[:, :, :1].repeat_interleave(geometry.temporal_factor, dim=2), per_frame[:, :, 1:]], 2)
    return frames.view(1, -1, geometry.temporal_factor, height, width).transpose(1, 2)


@torch.inference_mode()
def first_frame_condition(vae: torch.nn.Module, image, spec: VideoSpec, geometry: Geometry) -> torch.Tensor:
    """The mask and the normalized VAE latents of [image, black x (frames - 1)], (1, 4 + z, ...)."""
    from diffusers.video_processor import VideoProcessor

    device = next(vae.parameters()).device
    pixels = VideoProcessor(vae_scale_factor=geometry.vae_spatial_factor).preprocess(
        image, height=spec.height, width=spec.width).to(torch.float32)  # (1, 3, H, W) in [-1, 1]
    clip = torch.cat([pixels.unsqueeze(2), pixels.new_zeros(1, 3, spec.num_frames - 1, spec.height, spec.width)], 2)
    latents = vae.encode(clip.to(device, vae.dtype)).latent_dist.mode().float().cpu()
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
    return torch.cat([first_frame_mask(spec, geometry), (latents - mean) * (1.0 / std)], dim=1)
