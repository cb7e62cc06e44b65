"""`CostProfile`: what each stage of one model costs on one kind of accelerator, from JSON.

A profile is the `CostModel` (serving/cost_model.py) of simulated accelerators, and of
capacity planning. Its DiT forward time is physical: a per-forward overhead, a linear term
(the GEMMs: every latent token of every row goes through every projection and MLP), a
quadratic term (self-attention: every token attends over every other of its row) and a
cross-attention term (latent tokens x text tokens). Coefficients come from published figures,
from estimates that say how they were made, or from `ditserve bench profile` on real
hardware; every number names its source in `sources`, and `anchors` lists the published
end-to-end figures the profile must reproduce (tests check them).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.cost_model import STAGE_NAMES, job_seconds
from serving.models.presets import PRESETS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextEncoderCost(_Strict):
    """seconds = overhead_s + per_prompt_token_s x prompts x tokens"""

    overhead_s: float = Field(ge=0)
    per_prompt_token_s: float = Field(ge=0)


class DenoiserCost(_Strict):
    """One batched DiT forward: overhead_s + rows x (per_token_s x N + per_token_pair_s x N^2
    + per_token_text_token_s x N x L), N latent tokens and L text tokens per row."""

    overhead_s: float = Field(ge=0)
    per_token_s: float = Field(ge=0)
    per_token_pair_s: float = Field(ge=0)
    per_token_text_token_s: float = Field(ge=0)


class VaeDecoderCost(_Strict):
    """seconds = overhead_s + per_pixel_frame_s x frames x width x height"""

    overhead_s: float = Field(ge=0)
    per_pixel_frame_s: float = Field(ge=0)


class StepCacheCost(_Strict):
    """How often a step-caching request runs the DiT (serving/pipeline/step_cache.py), by
    threshold: the share of its skippable steps (after the warm-up, before the last) that run
    in full. Thresholds in between are interpolated; 0 runs every step."""

    computed_fraction: dict[str, float] = Field(min_length=1)

    def fraction(self, threshold: float) -> float:
        points = sorted([(0.0, 1.0)] + [(float(t), f) for t, f in self.computed_fraction.items()])
        for (t0, f0), (t1, f1) in zip(points, points[1:]):
            if threshold <= t1:
                return f0 + (f1 - f0) * (threshold - t0) / (t1 - t0) if t1 > t0 else f1
        return points[-1][1]


class ParallelCost(_Strict):
    """A Denoiser replica spread over a gang of devices (serving/parallel/): the DiT forward's
    speed-up by the gang's size (ulysses x cfg ranks). A degree not listed is not simulated."""

    speedup: dict[str, float] = Field(min_length=1, description="degree -> forward time on 1 device / on the gang")

    @model_validator(mode="after")
    def _sane(self) -> "ParallelCost":
        for degree, speedup in self.speedup.items():
            if not degree.isdigit() or int(degree) < 2 or not 1.0 <= speedup <= int(degree):
                raise ValueError(f"parallel.speedup[{degree!r}] = {speedup}: expected a degree of 2 or more "
                                 "and a speed-up from 1 to the degree")
        return self

    def of(self, degree: int) -> float:
        if degree == 1:
            return 1.0
        if str(degree) not in self.speedup:
            raise ValueError(f"the profile's parallel.speedup has no figure for {degree} devices "
                             f"(it has {', '.join(sorted(self.speedup, key=int))})")
        return self.speedup[str(degree)]


class StartupCost(_Strict):
    """Seconds from a replica's placement to ready (process, weights read and moved to the device)."""

    text_encoder: float = Field(ge=0)
    denoiser: float = Field(ge=0)
    vae_decoder: float = Field(ge=0)


class Source(_Strict):
    what: str = Field(description="The coefficient it supports, as a dotted path (e.g. denoiser.per_token_s), "
                                  "or 'anchor: <name>'.")
    figure: str = Field(description="The number as published or measured, with its unit and conditions.")
    where: str = Field(description="Publication, URL or command that produced it.")
    how: str = Field(description="How the coefficient was derived from the figure.")
    kind: Literal["published", "estimate", "measured"]


class Anchor(_Strict):
    """An end-to-end figure the profile must reproduce: one job alone on one replica per stage."""

    name: str
    width: int
    height: int
    num_frames: int
    steps: int
    guidance_scale: float
    text_tokens: int
    seconds: float = Field(gt=0)
    tolerance: float = Field(gt=0, lt=1, description="Largest relative error accepted.")
    stage: Literal["total", "text_encoder", "denoiser", "vae_decoder"] = "total"


class CostProfile(_Strict):
    name: str
    device: str
    model: str = Field(description="The preset it describes (serving/models/presets.py).")
    time_unit: Literal["seconds"] = "seconds"
    text_encoder: TextEncoderCost
    denoiser: DenoiserCost
    vae_decoder: VaeDecoderCost
    startup_seconds_per_stage: StartupCost
    node_startup_seconds: float | None = Field(
        default=None, ge=0, description="Seconds from asking for one more GPU node to its joining the cluster "
        "(machine boot, kubelet, GPU driver): what a node-autoscaled simulation waits (`--node-autoscaling`).")
    step_cache: StepCacheCost | None = None
    parallel: ParallelCost | None = None
    anchors: list[Anchor] = Field(default_factory=list)
    sources: list[Source] = Field(min_length=1)

    @model_validator(mode="after")
    def _known_model(self) -> "CostProfile":
        if self.model not in PRESETS:
            raise ValueError(f"model {self.model!r} is not a preset; expected one of {', '.join(PRESETS)}")
        return self

    # ---- the CostModel protocol ----------------------------------------------------------

    def text_encode_seconds(self, prompts: int, tokens: int) -> float:
        cost = self.text_encoder
        return cost.overhead_s + cost.per_prompt_token_s * prompts * tokens

    def dit_forward_seconds(self, rows: int, latent_tokens: int, text_tokens: int) -> float:
        cost, n = self.denoiser, latent_tokens
        return cost.overhead_s + rows * (cost.per_token_s * n + cost.per_token_pair_s * n * n
                                         + cost.per_token_text_token_s * n * text_tokens)

    def vae_decode_seconds(self, frames: int, width: int, height: int) -> float:
        cost = self.vae_decoder
        return cost.overhead_s + cost.per_pixel_frame_s * frames * width * height

    def startup_seconds(self, stage: str) -> float:
        if stage not in STAGE_NAMES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGE_NAMES)}")
        return getattr(self.startup_seconds_per_stage, stage)

    # ---- checks ------------------------------------------------------------------------------

    def coefficient_paths(self) -> list[str]:
        """Every number of the model, as the dotted paths `sources[].what` names."""
        sections = ("text_encoder", "denoiser", "vae_decoder", "startup_seconds_per_stage")
        paths = [f"{section}.{name}" for section in sections for name in type(getattr(self, section)).model_fields]
        return (paths + (["node_startup_seconds"] if self.node_startup_seconds is not None else [])
                + (["step_cache.computed_fraction"] if self.step_cache is not None else [])
                + (["parallel.speedup"] if self.parallel is not None else []))

    def parallel_speedup(self, degree: int) -> float:
        """The DiT forward's speed-up on a gang of `degree` devices; ValueError when not profiled."""
        if degree == 1:
            return 1.0
        if self.parallel is None:
            raise ValueError(f"cost profile {self.name!r} has no parallel.speedup: a Denoiser on {degree} devices "
                             "is not simulated with it")
        return self.parallel.of(degree)

    def unsourced(self) -> list[str]:
        named = {source.what for source in self.sources}
        return [path for path in self.coefficient_paths() if path not in named] + [
            f"anchor: {a.name}" for a in self.anchors if f"anchor: {a.name}" not in named]

    def predict(self, anchor: Anchor) -> float:
        seconds = job_seconds(self, PRESETS[self.model].geometry, width=anchor.width, height=anchor.height,
                              num_frames=anchor.num_frames, steps=anchor.steps,
                              guidance_scale=anchor.guidance_scale, text_tokens=anchor.text_tokens)
        return seconds.total if anchor.stage == "total" else seconds.of(anchor.stage)


def packaged_profiles() -> list[str]:
    folder = resources.files("serving.simulate") / "profiles"
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


class ProfileError(Exception):
    """A profile name that is not packaged, or a file that is not a valid profile."""


def load_profile(name_or_path: str | Path) -> CostProfile:
    """A packaged profile by name (e.g. h100-wan2.1-1.3b), or a JSON file by path."""
    text = str(name_or_path)
    if text in packaged_profiles():
        data = (resources.files("serving.simulate") / "profiles" / f"{text}.json").read_text()
        where = f"packaged profile {text!r}"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ProfileError(f"no cost profile {text!r}: not a packaged one ({', '.join(packaged_profiles())}) "
                               "and not a JSON file")
        data, where = path.read_text(), str(path)
    try:
        return CostProfile.model_validate(json.loads(data))
    except (ValueError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{where} is not a valid cost profile: {exc}") from None
