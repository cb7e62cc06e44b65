"""VAE decoding: final latents -> uint8 video frames (T, H, W, 3)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Undo Wan's per-channel latent normalisation, decode, and map [-1, 1] to uint8.
    Takes latents of shape (1, C, T', H', W'); returns frames (T, H, W, 3) on the CPU."""
    param = next(vae.parameters())
    latents = latents.to(device=param.device, dtype=param.dtype)
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=latents.dtype, device=latents.device).view(1, channels, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=latents.dtype, device=latents.device).view(1, channels, 1, 1, 1)
    video = vae.decode(latents * std + mean, return_dict=False)[0]  # (1, 3, T, H, W) in [-1, 1]
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().cpu()
