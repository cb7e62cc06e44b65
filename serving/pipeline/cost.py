"""What one request costs the accelerator, in one unit: latent token-steps.

A DiT step's work grows with the tokens it attends over (latent frames x latent tokens per
frame); a job runs `num_inference_steps` such steps; classifier-free guidance runs every
step on two rows (conditional and unconditional). Their product is the request's cost. It is
computed here and nowhere else, so per-request budgets count the same thing everywhere.
Token-steps say how big a request is on any hardware; accelerator-seconds (serving/cost_model.py,
serving/measured_cost.py) say how long it takes on this fleet, and are what queues, wait
estimates and admission count. The prior cost model is token-steps times seconds per token-step.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.models.presets import Geometry


@dataclass(frozen=True)
class JobCost:
    latent_frames: int
    tokens_per_frame: int
    steps: int
    rows: int  # 2 with classifier-free guidance, else 1

    @property
    def token_steps(self) -> int:
        return self.latent_frames * self.tokens_per_frame * self.steps * self.rows

    def explain(self) -> str:
        guidance = " × 2 for guidance" if self.rows == 2 else ""
        return (f"{self.latent_frames} latent frames × {self.tokens_per_frame} tokens per frame × "
                f"{self.steps} steps{guidance}")


def latent_frames(num_frames: int, geometry: Geometry) -> int:
    """The VAE keeps the first frame and packs each following `temporal_factor` into one."""
    return (num_frames - 1) // geometry.temporal_factor + 1


def tokens_per_frame(width: int, height: int, geometry: Geometry) -> int:
    return (width // geometry.spatial_multiple) * (height // geometry.spatial_multiple)


def guidance_rows(guidance_scale: float) -> int:
    # The denoise loop adds an unconditional row only when guidance changes the prediction.
    return 2 if guidance_scale > 1.0 else 1


def job_cost(geometry: Geometry, *, width: int, height: int, num_frames: int, steps: int,
             guidance_scale: float) -> JobCost:
    return JobCost(latent_frames(num_frames, geometry), tokens_per_frame(width, height, geometry), steps,
                   guidance_rows(guidance_scale))
