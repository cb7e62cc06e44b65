"""`LocalPipeline`: the three stages in one process, no Ray, no HTTP.

This is what `ditserve generate` runs and the reference every distributed path must match:
encode_text (and, image-to-video, the first frame's conditioning) -> denoise -> decode ->
encode_mp4, each a plain function over tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from serving.config import ServiceConfig
from serving.models.loading import (
    load_image_encoder, load_scheduler_config, load_text_encoder, load_transformer, load_vae, preset_of,
)
from serving.pipeline.decode import decode
from serving.pipeline.denoise import denoise
from serving.pipeline.encode import encode_text
from serving.pipeline.image import ImageCondition, encode_image_tokens, first_frame_condition
from serving.pipeline.mp4 import encode_mp4
from serving.pipeline.spec import VideoSpec, build_spec


@dataclass
class Video:
    spec: VideoSpec
    latents: torch.Tensor
    frames: torch.Tensor  # (T, H, W, 3) uint8
    mp4: bytes


class LocalPipeline:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.preset = preset_of(config.model)
        self.text = load_text_encoder(config.model)
        self.transformer = load_transformer(config.model)
        self.vae = load_vae(config.model)
        self.image_encoder = load_image_encoder(config.model)  # None unless the preset takes an image
        self.scheduler_config = load_scheduler_config(config.model)

    def spec(self, prompt: str, **overrides) -> VideoSpec:
        return build_spec(self.preset, self.config.generation, prompt, **overrides)

    def encode(self, spec: VideoSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
        with_negative = spec.guidance_scale > 1.0
        prompts = [spec.prompt, spec.negative_prompt] if with_negative else [spec.prompt]
        embeds = encode_text(self.text.tokenizer, self.text.model, prompts, spec.max_sequence_length)
        return embeds[:1], (embeds[1:] if with_negative else None)

    def encode_image(self, spec: VideoSpec, image) -> ImageCondition:
        """The first frame's conditioning (image-to-video presets); `image`: a PIL image."""
        if self.image_encoder is None:
            raise ValueError(f"model {self.preset.name!r} makes video from text only; it takes no image")
        tokens = encode_image_tokens(self.image_encoder.processor, self.image_encoder.model, image)
        return ImageCondition(image_embeds=tokens, condition=first_frame_condition(self.vae, image, spec,
                                                                                   self.preset.geometry))

    def latents(self, spec: VideoSpec, on_step: Callable[[int, int], None] | None = None,
                on_computed: Callable[[bool], None] | None = None, image=None) -> torch.Tensor:
        if self.preset.takes_image and image is None:
            raise ValueError(f"model {self.preset.name!r} makes video from a first frame: give an image")
        conditioning = self.encode_image(spec, image) if image is not None else None
        prompt_embeds, negative_embeds = self.encode(spec)
        return denoise(self.transformer, self.scheduler_config, spec, prompt_embeds, negative_embeds,
                       self.preset.geometry, on_step=on_step, on_computed=on_computed, image=conditioning)

    def generate(self, spec: VideoSpec, on_step: Callable[[int, int], None] | None = None,
                 on_computed: Callable[[bool], None] | None = None, image=None) -> Video:
        latents = self.latents(spec, on_step=on_step, on_computed=on_computed, image=image)
        frames = decode(self.vae, latents)
        return Video(spec=spec, latents=latents, frames=frames, mp4=encode_mp4(frames, spec.fps))
