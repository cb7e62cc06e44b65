"""Accelerator-seconds: what a job costs each stage in device time, and where that comes from.

Every decision that weighs work (admission, wait estimates, autoscaling, simulated compute,
usage) counts accelerator-seconds for the job's shape, never requests or steps: a 720p 10 s
job is ~30 times a 480p 2 s one. A `CostModel` answers the three stage questions below;
`job_seconds` turns a request into per-stage seconds through it. Two kinds of model plug in:
a cost profile (published figures, or `ditserve bench profile` on real hardware; see
`serving/simulate/`) and times measured live by the service itself. Nothing else in the code
should know which one it is talking to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from serving.models.presets import Geometry
from serving.pipeline.cost import guidance_rows, latent_frames, tokens_per_frame

STAGE_NAMES = ("text_encoder", "denoiser", "vae_decoder")


class CostModel(Protocol):
    """Device seconds of one call of each stage, on one replica's accelerator(s)."""

    def text_encode_seconds(self, prompts: int, tokens: int) -> float:
        """One encoder forward over `prompts` prompts of `tokens` tokens each."""

    def dit_forward_seconds(self, rows: int, latent_tokens: int, text_tokens: int) -> float:
        """One batched DiT forward (one denoise step) over `rows` rows of `latent_tokens`
        latent tokens each (CFG counts two rows), cross-attending to `text_tokens`."""

    def vae_decode_seconds(self, frames: int, width: int, height: int) -> float:
        """Decoding one clip of `frames` frames at width x height pixels."""


@dataclass(frozen=True)
class StageSeconds:
    text_encoder: float
    denoiser: float
    vae_decoder: float

    @property
    def total(self) -> float:
        return self.text_encoder + self.denoiser + self.vae_decoder

    def of(self, stage: str) -> float:
        return getattr(self, stage)


def job_seconds(model: CostModel, geometry: Geometry, *, width: int, height: int, num_frames: int,
                steps: int, guidance_scale: float, text_tokens: int) -> StageSeconds:
    """Per-stage device seconds of one job run alone (batching shares a forward's time among
    its rows; the profile's per-forward times already say what a batch costs)."""
    rows = guidance_rows(guidance_scale)
    tokens = latent_frames(num_frames, geometry) * tokens_per_frame(width, height, geometry)
    return StageSeconds(
        text_encoder=model.text_encode_seconds(rows, text_tokens),
        denoiser=steps * model.dit_forward_seconds(rows, tokens, text_tokens),
        vae_decoder=model.vae_decode_seconds(num_frames, width, height),
    )


def spec_seconds(model: CostModel, geometry: Geometry, spec) -> StageSeconds:
    """`job_seconds` for a `VideoSpec` (or its dict form, as jobs store it)."""
    get = spec.get if isinstance(spec, dict) else lambda name: getattr(spec, name)
    return job_seconds(model, geometry, width=get("width"), height=get("height"), num_frames=get("num_frames"),
                       steps=get("num_inference_steps"), guidance_scale=get("guidance_scale"),
                       text_tokens=get("max_sequence_length"))
