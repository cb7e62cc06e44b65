"""The flow-matching denoise loop with classifier-free guidance, one step at a time.

`DenoiseState` is everything a request needs between steps (latents, its own scheduler,
the step index), so a later engine can interleave many requests and checkpoint any of
them. Initial noise is drawn on the CPU from the request's seed: the same seed gives the
same video on any device, replica or batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import diffusers
import torch

from serving.models.presets import Geometry
from serving.pipeline.spec import VideoSpec


def latent_shape(spec: VideoSpec, channels: int, geometry: Geometry) -> tuple[int, int, int, int, int]:
    return (
        1,
        channels,
        (spec.num_frames - 1) // geometry.temporal_factor + 1,
        spec.height // geometry.vae_spatial_factor,
        spec.width // geometry.vae_spatial_factor,
    )


def initial_latents(spec: VideoSpec, channels: int, geometry: Geometry) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    return torch.randn(latent_shape(spec, channels, geometry), generator=generator, dtype=torch.float32)


def make_scheduler(scheduler_config: dict, spec: VideoSpec):
    """A fresh scheduler for one request, with that request's shift and step count."""
    cls = getattr(diffusers, scheduler_config.get("_class_name", "UniPCMultistepScheduler"))
    scheduler = cls.from_config(scheduler_config, flow_shift=spec.shift)
    scheduler.set_timesteps(spec.num_inference_steps, device="cpu")
    scheduler.set_begin_index(0)
    return scheduler


@dataclass
class DenoiseState:
    spec: VideoSpec
    latents: torch.Tensor  # float32, on the CPU or the DiT's device
    scheduler: Any
    step: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps


def start_denoise(spec: VideoSpec, scheduler_config: dict, channels: int, geometry: Geometry) -> DenoiseState:
    return DenoiseState(spec=spec, latents=initial_latents(spec, channels, geometry),
                        scheduler=make_scheduler(scheduler_config, spec))


@torch.inference_mode()
def denoise_step(
    transformer: torch.nn.Module,
    state: DenoiseState,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
) -> DenoiseState:
    """Advance one request by one step. The conditional and unconditional rows of
    classifier-free guidance go through the DiT as one batch of two."""
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    t = state.scheduler.timesteps[state.step]
    latents = state.latents.to(device)
    use_cfg = state.spec.guidance_scale > 1.0 and negative_embeds is not None
    embeds = torch.cat([prompt_embeds, negative_embeds]) if use_cfg else prompt_embeds
    rows = embeds.shape[0]
    model_input = latents.to(dtype).expand(rows, *latents.shape[1:])
    noise = transformer(
        hidden_states=model_input,
        timestep=t.to(device).expand(rows),
        encoder_hidden_states=embeds.to(device=device, dtype=dtype),
        return_dict=False,
    )[0]
    if use_cfg:
        cond, uncond = noise.chunk(2)
        noise = uncond + state.spec.guidance_scale * (cond - uncond)
    state.latents = state.scheduler.step(noise, t, latents, return_dict=False)[0]
    state.step += 1
    return state


def denoise(
    transformer: torch.nn.Module,
    scheduler_config: dict,
    spec: VideoSpec,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    geometry: Geometry,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run every step for one request; return the final latents (float32)."""
    state = start_denoise(spec, scheduler_config, transformer.config.in_channels, geometry)
    while not state.done:
        denoise_step(transformer, state, prompt_embeds, negative_embeds)
        if on_step is not None:
            on_step(state.step, state.total_steps)
    return state.latents
