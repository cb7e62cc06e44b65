"""The flow-matching denoise loop with classifier-free guidance, one step at a time.

`DenoiseState` is everything a request needs between steps (latents, its own scheduler,
the step index), so a later engine can interleave many requests and checkpoint any of
them. Initial noise is drawn on the CPU from the request's seed: the same seed gives the
same video on any device, replica or batch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
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
def denoise_batch_step(
    transformer: torch.nn.Module,
    states: list[DenoiseState],
    prompt_embeds: list[torch.Tensor],
    negative_embeds: list[torch.Tensor | None],
) -> None:
    """Advance several requests by one step each with ONE DiT forward.

    Every request brings its own latents, timestep and guidance scale; all must share a
    latent shape and text length. Rows are [conditional x n, unconditional x (those using
    guidance)], so classifier-free guidance rides in the same forward as everything else.
    """
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    guided = [i for i, s in enumerate(states) if s.spec.guidance_scale > 1.0 and negative_embeds[i] is not None]
    latents = [s.latents.to(device) for s in states]
    timesteps = [s.scheduler.timesteps[s.step] for s in states]
    model_input = torch.cat(latents + [latents[i] for i in guided]).to(dtype)
    rows_t = torch.stack(timesteps + [timesteps[i] for i in guided]).to(device)
    embeds = torch.cat(list(prompt_embeds) + [negative_embeds[i] for i in guided]).to(device=device, dtype=dtype)
    noise = transformer(hidden_states=model_input, timestep=rows_t, encoder_hidden_states=embeds, return_dict=False)[0]
    unconditional = dict(zip(guided, noise[len(states):].split(1)))
    for i, state in enumerate(states):
        prediction = noise[i:i + 1]
        if i in unconditional:
            prediction = unconditional[i] + state.spec.guidance_scale * (prediction - unconditional[i])
        state.latents = state.scheduler.step(prediction, timesteps[i], latents[i], return_dict=False)[0]
        state.step += 1


def denoise_step(
    transformer: torch.nn.Module,
    state: DenoiseState,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
) -> DenoiseState:
    """Advance one request by one step (a batch of one)."""
    denoise_batch_step(transformer, [state], [prompt_embeds], [negative_embeds])
    return state


def batch_key(state: DenoiseState) -> tuple:
    """Requests can share a forward only when their latent shapes and text lengths match."""
    return tuple(state.latents.shape), state.spec.max_sequence_length


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


def save_state(state: DenoiseState) -> bytes:
    """A checkpoint of a request between steps: its latents and its whole scheduler (the
    multistep solver keeps earlier model outputs, so the scheduler object is part of the state)."""
    buffer = io.BytesIO()
    torch.save({"step": state.step, "latents": state.latents.cpu(), "scheduler": state.scheduler}, buffer)
    return buffer.getvalue()


def load_state(data: bytes, spec: VideoSpec) -> DenoiseState:
    # weights_only=False: the scheduler is a pickled object. Checkpoints are written only by
    # our own Denoiser into the operator's artifact store, never taken from clients.
    saved = torch.load(io.BytesIO(data), weights_only=False)
    return DenoiseState(spec=spec, latents=saved["latents"], scheduler=saved["scheduler"], step=saved["step"])
