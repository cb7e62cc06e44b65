"""The flow-matching denoise loop with classifier-free guidance, one step at a time.

`DenoiseState` is everything a request needs between steps (latents, its own scheduler,
the step index), so a later engine can interleave many requests and checkpoint any of
them. Initial noise is drawn on the CPU from the request's seed: the same seed gives the
same video on any device, replica or batch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import diffusers
import torch

from serving.models.presets import Geometry
from serving.pipeline.image import ImageCondition
from serving.pipeline.spec import VideoSpec
from serving.pipeline.step_cache import StepCache, forward_with_caches, warmup_steps


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
    cache: StepCache | None = None  # step caching, when the request asked for it (serving/pipeline/step_cache.py)
    image: ImageCondition | None = None  # image-to-video: its first frame's conditioning (serving/pipeline/image.py)

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps


def start_denoise(spec: VideoSpec, scheduler_config: dict, channels: int, geometry: Geometry,
                  image: ImageCondition | None = None) -> DenoiseState:
    """`channels`: the latents' (the DiT's output channels; an I2V DiT takes more in, the
    first-frame condition)."""
    return DenoiseState(spec=spec, latents=initial_latents(spec, channels, geometry),
                        scheduler=make_scheduler(scheduler_config, spec), cache=new_cache(spec), image=image)


def new_cache(spec: VideoSpec) -> StepCache | None:
    if not spec.cache_threshold:
        return None
    return StepCache(threshold=spec.cache_threshold, warmup=warmup_steps(spec.num_inference_steps))


@torch.inference_mode()
def denoise_batch_step(
    transformer: torch.nn.Module,
    states: list[DenoiseState],
    prompt_embeds: list[torch.Tensor],
    negative_embeds: list[torch.Tensor | None],
    blocks: Callable | None = None,
) -> list[bool]:
    """Advance several requests by one step each with ONE DiT forward; returns, per request,
    whether it ran the DiT's blocks (False: its step cache reused its residual).

    Every request brings its own latents, timestep and guidance scale; all must share a
    latent shape and text length. Rows are [conditional x n, unconditional x (those using
    guidance)], so classifier-free guidance rides in the same forward as everything else.
    `blocks`: who runs the DiT's blocks when this process does not run them alone (a gang of
    devices: serving/parallel/gang.py).
    """
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    guided = [i for i, s in enumerate(states) if s.spec.guidance_scale > 1.0 and negative_embeds[i] is not None]
    latents = [s.latents.to(device) for s in states]
    timesteps = [s.scheduler.timesteps[s.step] for s in states]
    rows = list(range(len(states))) + guided  # the request behind each row of the forward
    inputs = latents
    image_embeds = None
    if states[0].image is not None:  # image-to-video (batch_key keeps a batch all one kind)
        # The first-frame condition rides beside the latents; both rows of a guided request
        # attend to its image (guidance is over the text only, as in Wan2.1-I2V).
        inputs = [torch.cat([x, s.image.condition.to(device)], dim=1) for x, s in zip(latents, states)]
        image_embeds = torch.cat([states[i].image.image_embeds for i in rows]).to(device=device, dtype=dtype)
    model_input = torch.cat([inputs[i] for i in rows]).to(dtype)
    rows_t = torch.stack([timesteps[i] for i in rows]).to(device)
    embeds = torch.cat(list(prompt_embeds) + [negative_embeds[i] for i in guided]).to(device=device, dtype=dtype)
    # A stand-in (simulated accelerators) brings its own step-caching forward.
    cached_forward = getattr(transformer, "forward_with_caches", None)
    if cached_forward is None and supports_step_cache(transformer):
        cached_forward = partial(forward_with_caches, transformer)
    image = {} if image_embeds is None else {"image_embeds": image_embeds}
    if blocks is not None:  # a gang splits the blocks; step caching decides around them, as alone
        noise, computed = forward_with_caches(transformer, model_input, rows_t, embeds, rows,
                                              [s.cache for s in states], [(s.step, s.total_steps) for s in states],
                                              blocks=blocks, **image)
    elif any(s.cache is not None for s in states) and cached_forward is not None:
        noise, computed = cached_forward(model_input, rows_t, embeds, rows, [s.cache for s in states],
                                         [(s.step, s.total_steps) for s in states], **image)
    else:
        extra = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds}
        noise = transformer(hidden_states=model_input, timestep=rows_t, encoder_hidden_states=embeds,
                            return_dict=False, **extra)[0]
        computed = [True] * len(states)
    unconditional = dict(zip(guided, noise[len(states):].split(1)))
    for i, state in enumerate(states):
        prediction = noise[i:i + 1]
        if i in unconditional:
            prediction = unconditional[i] + state.spec.guidance_scale * (prediction - unconditional[i])
        state.latents = state.scheduler.step(prediction, timesteps[i], latents[i], return_dict=False)[0]
        state.step += 1
    return computed


def supports_step_cache(transformer: torch.nn.Module) -> bool:
    """Step caching splits a Wan DiT's forward (serving/pipeline/step_cache.py); any other
    module (the simulated stand-in) runs every step in full."""
    return all(hasattr(transformer, name) for name in ("rope", "patch_embedding", "condition_embedder", "blocks"))


def batch_key(state: DenoiseState) -> tuple:
    """Requests can share a forward only when their latent shapes and text lengths match, and
    image-to-video ones only with each other (and the same number of image tokens)."""
    image = None if state.image is None else tuple(state.image.image_embeds.shape)
    return tuple(state.latents.shape), state.spec.max_sequence_length, image


def denoise(
    transformer: torch.nn.Module,
    scheduler_config: dict,
    spec: VideoSpec,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    geometry: Geometry,
    on_step: Callable[[int, int], None] | None = None,
    on_computed: Callable[[bool], None] | None = None,
    blocks: Callable | None = None,
    image: ImageCondition | None = None,
) -> torch.Tensor:
    """Run every step for one request; return the final latents (float32). `on_computed`
    hears, per step, whether it ran the DiT's blocks (False: step-cached)."""
    state = start_denoise(spec, scheduler_config, transformer.config.out_channels, geometry, image=image)
    while not state.done:
        [computed] = denoise_batch_step(transformer, [state], [prompt_embeds], [negative_embeds], blocks=blocks)
        if on_computed is not None:
            on_computed(computed)
        if on_step is not None:
            on_step(state.step, state.total_steps)
    return state.latents


def save_state(state: DenoiseState) -> bytes:
    """A checkpoint of a request between steps: its latents and its whole scheduler (the
    multistep solver keeps earlier model outputs, so the scheduler object is part of the state)."""
    buffer = io.BytesIO()
    torch.save({"step": state.step, "latents": state.latents.cpu(), "scheduler": state.scheduler,
                "cache": _cache_on_cpu(state.cache), "image": state.image}, buffer)
    return buffer.getvalue()


def load_state(data: bytes, spec: VideoSpec) -> DenoiseState:
    # weights_only=False: the scheduler is a pickled object. Checkpoints are written only by
    # our own Denoiser into the operator's artifact store, never taken from clients.
    saved = torch.load(io.BytesIO(data), weights_only=False)
    # A checkpoint from before step caching has none: a caching request restarts its cache
    # (its next step runs in full).
    cache = saved.get("cache") if spec.cache_threshold else None
    if spec.cache_threshold and cache is None:
        cache = new_cache(spec)
    return DenoiseState(spec=spec, latents=saved["latents"], scheduler=saved["scheduler"], step=saved["step"],
                        cache=cache, image=saved.get("image"))


def _cache_on_cpu(cache: StepCache | None) -> StepCache | None:
    """The cache's tensors moved to the CPU, for a checkpoint any replica can load."""
    if cache is None:
        return None
    return replace(cache, previous=cache.previous.cpu() if cache.previous is not None else None,
                   residuals=cache.residuals.cpu() if cache.residuals is not None else None)
