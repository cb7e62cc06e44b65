"""The live `CostModel`: a base model corrected by the device times this service measures.

The base answers before anything is measured: the preset's prior (`PresetPrior`, below), or a
cost profile (serving/simulate/) when one is configured. The Director then measures every
stage call and every denoise step, and `MeasuredCost` answers from those measurements:

- a denoise step of a shape already seen (rows, latent tokens, text tokens: what decides a
  forward's time, and exactly what the engine batches on) costs its measured seconds, a moving
  average of the job's share of each forward it rode in (the engine splits a batched
  forward's time among its rows, so a full batch makes each job's step cheaper);
- a shape not seen yet costs the base's answer times the denoiser's measured/base ratio, so one
  measured shape corrects the whole table while keeping the base's shape-to-shape scaling;
- an encode or a decode costs the base's answer times that stage's measured/base ratio.

Why a calibration and not a table alone: requests come in many shapes, and a new shape must
cost something sensible the first time; the base knows how cost grows with shape, the
measurements know this hardware. The corrections are a `Calibration`, a small dict that the
Director sends with its wait estimate, so the Gateway costs each new job the same way.

How this relates to the per-request budget (serving/pipeline/cost.py): latent token-steps
say how big a request is, independent of hardware, and cap what one request may ask for (a
400 at validation). Accelerator-seconds say how long that work takes on this fleet; the prior
below is exactly token-steps times the preset's seconds per token-step, and measurements
replace that constant per shape. Budgets count token-steps; queues, estimates and admission
count seconds (serving/admission.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.config import parse_size
from serving.cost_model import CostModel
from serving.models.presets import Preset
from serving.pipeline.cost import guidance_rows, latent_frames, tokens_per_frame

# Moving-average weight of a new measurement (as the stage clocks use).
NEW_WEIGHT = 0.2
# Shapes remembered at most (requests choose size, length and text length, so bound the table).
MAX_SHAPES = 256

# The prior's encode and decode times, in default-shape denoise steps: encoding is about one
# DiT forward; decoding a clip about a tenth of its denoising (Wan2.1 480p: ~5 s of ~50 s).
PRIOR_ENCODE_STEPS = 1.0
PRIOR_DECODE_STEPS = 5.0

Shape = tuple[int, int, int]  # (rows, latent tokens, text tokens) of one denoise step


class PresetPrior:
    """Device seconds from the preset's `typical_step_seconds` (one step at its default shape),
    scaled linearly in latent token-rows: cost per token-step, times token-steps."""

    def __init__(self, preset: Preset):
        self.preset = preset
        d, g = preset.defaults, preset.geometry
        width, height = parse_size(d.size)
        frames = round(d.seconds * d.fps) + 1
        self._default_token_rows = guidance_rows(d.guidance_scale) * latent_frames(frames, g) * tokens_per_frame(
            width, height, g)
        self._default_pixel_frames = frames * width * height

    def dit_forward_seconds(self, rows: int, latent_tokens: int, text_tokens: int) -> float:
        return self.preset.typical_step_seconds * rows * latent_tokens / self._default_token_rows

    def text_encode_seconds(self, prompts: int, tokens: int) -> float:
        return self.preset.typical_step_seconds * PRIOR_ENCODE_STEPS

    def vae_decode_seconds(self, frames: int, width: int, height: int) -> float:
        size = frames * width * height / self._default_pixel_frames
        return self.preset.typical_step_seconds * PRIOR_DECODE_STEPS * size


@dataclass
class Calibration:
    """What was measured, as corrections to a base model (1.0: nothing measured yet)."""

    text_encoder: float = 1.0  # measured ÷ base, per call
    denoiser: float = 1.0  # measured ÷ base, per step (for shapes not in step_seconds)
    vae_decoder: float = 1.0
    step_seconds: dict[Shape, float] = field(default_factory=dict)  # measured seconds of one step, per shape

    def to_dict(self) -> dict:
        return {"text_encoder": self.text_encoder, "denoiser": self.denoiser, "vae_decoder": self.vae_decoder,
                "step_seconds": [[*shape, seconds] for shape, seconds in self.step_seconds.items()]}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Calibration":
        if not data:
            return cls()
        steps = {(int(r), int(t), int(x)): float(s) for r, t, x, s in data.get("step_seconds", [])}
        return cls(float(data["text_encoder"]), float(data["denoiser"]), float(data["vae_decoder"]), steps)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - NEW_WEIGHT) * old + NEW_WEIGHT * new


def step_shape(geometry, spec: dict) -> Shape:
    """The shape one denoise step of `spec` runs at (a VideoSpec in its dict form)."""
    rows = guidance_rows(spec["guidance_scale"])
    tokens = latent_frames(spec["num_frames"], geometry) * tokens_per_frame(spec["width"], spec["height"], geometry)
    return rows, tokens, spec["max_sequence_length"]


class MeasuredCost:
    """A `CostModel`: `base` until measured, then the measurements (see the module docstring)."""

    def __init__(self, base: CostModel, calibration: Calibration | None = None):
        self.base = base
        self.calibration = calibration or Calibration()
        self._ratio_seen = {"text_encoder": False, "denoiser": False, "vae_decoder": False}

    # ---- the CostModel protocol -----------------------------------------------------------

    def text_encode_seconds(self, prompts: int, tokens: int) -> float:
        return self.base.text_encode_seconds(prompts, tokens) * self.calibration.text_encoder

    def dit_forward_seconds(self, rows: int, latent_tokens: int, text_tokens: int) -> float:
        measured = self.calibration.step_seconds.get((rows, latent_tokens, text_tokens))
        if measured is not None:
            return measured
        return self.base.dit_forward_seconds(rows, latent_tokens, text_tokens) * self.calibration.denoiser

    def vae_decode_seconds(self, frames: int, width: int, height: int) -> float:
        return self.base.vae_decode_seconds(frames, width, height) * self.calibration.vae_decoder

    # ---- measuring (the Director) ---------------------------------------------------------

    def observe_step(self, shape: Shape, seconds: float) -> None:
        """One job's share of one denoise forward at `shape` took `seconds`."""
        steps = self.calibration.step_seconds
        steps[shape] = _average(steps.pop(shape, None), seconds)  # re-inserted: most recent last
        while len(steps) > MAX_SHAPES:
            steps.pop(next(iter(steps)))
        self._observe_ratio("denoiser", seconds / max(self.base.dit_forward_seconds(*shape), 1e-12))

    def observe_encode(self, prompts: int, tokens: int, seconds: float) -> None:
        self._observe_ratio("text_encoder", seconds / max(self.base.text_encode_seconds(prompts, tokens), 1e-12))

    def observe_decode(self, frames: int, width: int, height: int, seconds: float) -> None:
        self._observe_ratio("vae_decoder", seconds / max(self.base.vae_decode_seconds(frames, width, height), 1e-12))

    def _observe_ratio(self, stage: str, ratio: float) -> None:
        old = getattr(self.calibration, stage) if self._ratio_seen[stage] else None
        setattr(self.calibration, stage, _average(old, ratio))
        self._ratio_seen[stage] = True


class Compressed:
    """A cost model whose every time is divided by a simulation's time scale: what simulated
    stages really wait (serving/simulate/), so estimates and measurements agree."""

    def __init__(self, model: CostModel, time_scale: float):
        self.model, self.time_scale = model, time_scale

    def text_encode_seconds(self, prompts: int, tokens: int) -> float:
        return self.model.text_encode_seconds(prompts, tokens) / self.time_scale

    def dit_forward_seconds(self, rows: int, latent_tokens: int, text_tokens: int) -> float:
        return self.model.dit_forward_seconds(rows, latent_tokens, text_tokens) / self.time_scale

    def vae_decode_seconds(self, frames: int, width: int, height: int) -> float:
        return self.model.vae_decode_seconds(frames, width, height) / self.time_scale


class OnGang:
    """A cost model whose DiT forward runs on a gang of `degree` devices (serving/parallel/):
    `speedup` times faster, holding every device, so degree / speedup times the device seconds
    of one. Priced as if every forward were split (the by-load layout's narrow forwards cost
    less; measured steps replace the prior either way)."""

    def __init__(self, model: CostModel, degree: int, speedup: float):
        self.model, self.degree, self.speedup = model, degree, speedup

    def text_encode_seconds(self, prompts: int, tokens: int) -> float:
        return self.model.text_encode_seconds(prompts, tokens)

    def dit_forward_seconds(self, rows: int, latent_tokens: int, text_tokens: int) -> float:
        return self.model.dit_forward_seconds(rows, latent_tokens, text_tokens) * self.degree / self.speedup

    def vae_decode_seconds(self, frames: int, width: int, height: int) -> float:
        return self.model.vae_decode_seconds(frames, width, height)


def base_cost_model(preset: Preset, simulation=None, parallel=None) -> CostModel:
    """The model estimates start from before anything is measured: the simulation's cost
    profile when the stages are simulated (it is exactly what they will take), else the
    preset's prior. With Denoiser gangs (`parallel`, stages.denoiser.parallel) a step costs
    the gang's device seconds: the profile's speed-up for that many devices, or without a
    profile the config's own assumption (degree x split_efficiency)."""
    profile = None
    if simulation is not None:
        from serving.simulate.profile import load_profile

        profile = load_profile(simulation.profile)
    model: CostModel = PresetPrior(preset) if profile is None else Compressed(profile, simulation.time_scale)
    if parallel is None or parallel.degree == 1:
        return model
    degree = parallel.degree
    speedup = degree * parallel.split_efficiency if profile is None else profile.parallel_speedup(degree)
    return OnGang(model, degree, speedup)
