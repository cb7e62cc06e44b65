"""Denoiser deployment: the DiT denoise loop, streaming progress after every step.

One forward runs at a time per replica; concurrent requests take turns at step
boundaries. (The step-level batching engine replaces this turn-taking.)
"""

from __future__ import annotations

import asyncio

from ray import serve

from serving.config import ServiceConfig
from serving.deployments._replica import prepare_replica


@serve.deployment(name="Denoiser")
class Denoiser:
    def __init__(self, config: ServiceConfig):
        prepare_replica(config.stages.denoiser)
        from serving.models.loading import load_scheduler_config, load_transformer, preset_of

        self.transformer = load_transformer(config.model)
        self.scheduler_config = load_scheduler_config(config.model)
        self.geometry = preset_of(config.model).geometry
        self.forward_lock = asyncio.Lock()

    async def denoise(self, spec: dict, embeddings):
        """`embeddings` holds the prompt's row, then the negative prompt's when guidance is on.
        Yields {"started"} when this replica takes the job, {"step", "total_steps"} after each
        step, then {"latents": tensor}."""
        from serving.pipeline.denoise import denoise_step, start_denoise
        from serving.pipeline.spec import VideoSpec

        prompt_embeds = embeddings[:1]
        negative_embeds = embeddings[1:] if embeddings.shape[0] > 1 else None
        state = start_denoise(VideoSpec(**spec), self.scheduler_config, self.transformer.config.in_channels,
                              self.geometry)
        yield {"started": True}
        while not state.done:
            async with self.forward_lock:
                await asyncio.to_thread(denoise_step, self.transformer, state, prompt_embeds, negative_embeds)
            yield {"step": state.step, "total_steps": state.total_steps}
        yield {"latents": state.latents.cpu()}

    def ping(self) -> bool:
        return True
