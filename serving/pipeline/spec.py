"""`VideoSpec`: one validated generation request, in the units the model works in.

Users speak seconds and "WIDTHxHEIGHT"; the model needs frames and latent-aligned sizes.
`build_spec` converts and checks, and never rounds silently: a size or duration the model
cannot produce is a `SpecError` naming the field, what was asked and what would work. So is
a request over the cost budget (serving/pipeline/cost.py): it names the field that grew the
cost most and says what would fit.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass

from serving.config import GenerationConfig, parse_size
from serving.models.presets import Preset
from serving.pipeline.cost import job_cost, tokens_per_frame


class SpecError(ValueError):
    """A request parameter the model cannot honour; `field` names it for the API's `param`."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class VideoSpec:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    shift: float
    seed: int
    max_sequence_length: int
    cache_threshold: float = 0.0  # step caching (serving/pipeline/step_cache.py); 0: every step runs the DiT
    image: str | None = None  # image-to-video: the job's first frame, an artifact key (serving/jobs/reference.py)

    @property
    def seconds(self) -> float:
        return (self.num_frames - 1) / self.fps

    def to_dict(self) -> dict:
        return asdict(self)


def build_spec(
    preset: Preset,
    generation: GenerationConfig,
    prompt: str,
    *,
    size: str | None = None,
    seconds: float | None = None,
    fps: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    negative_prompt: str | None = None,
    seed: int | None = None,
    cache: str | float | None = None,
    num_frames: int | None = None,
    image: str | None = None,
) -> VideoSpec:
    """Fill unset fields from config, then preset defaults; validate everything.
    `num_frames` (peers' spelling of the length) replaces `seconds` when given."""
    d = preset.defaults
    g = generation

    def pick(value, configured, default):
        return value if value is not None else configured if configured is not None else default

    size = pick(size, g.size, d.size)
    seconds = pick(seconds, g.seconds, d.seconds)
    fps = pick(fps, g.fps, d.fps)
    steps = pick(num_inference_steps, g.num_inference_steps, d.num_inference_steps)
    guidance = pick(guidance_scale, g.guidance_scale, d.guidance_scale)
    shift = pick(shift, g.shift, d.shift)
    negative = pick(negative_prompt, g.negative_prompt, d.negative_prompt)
    max_len = pick(None, g.max_sequence_length, d.max_sequence_length)

    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError("prompt", "must not be empty")
    if len(prompt) > g.max_prompt_chars:
        raise SpecError("prompt", f"is {len(prompt)} characters; the limit is {g.max_prompt_chars}")
    if len(negative) > g.max_prompt_chars:
        raise SpecError("negative_prompt", f"is {len(negative)} characters; the limit is {g.max_prompt_chars}")

    try:
        width, height = parse_size(size)
    except ValueError as exc:
        raise SpecError("size", str(exc)) from None
    m = preset.geometry.spatial_multiple
    if width % m or height % m:
        raise SpecError("size", f"{width}x{height} is not a multiple of {m} in both sides; "
                                f"try {_nearest(width, m)}x{_nearest(height, m)}")
    if width * height > g.max_pixels:
        raise SpecError("size", f"{width}x{height} has {width * height} pixels; the limit is {g.max_pixels}")

    if not _finite(fps) or fps != int(fps) or fps <= 0 or fps > 120:
        raise SpecError("fps", f"must be a whole number from 1 to 120, found {fps!r}")
    fps = int(fps)
    k = preset.geometry.temporal_factor
    if num_frames is not None:
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1 or (num_frames - 1) % k:
            near = f"; e.g. {k * ((num_frames - 1) // k) + 1} or {k * ((num_frames - 1) // k + 1) + 1}" \
                if isinstance(num_frames, int) and not isinstance(num_frames, bool) and num_frames > 1 else ""
            raise SpecError("num_frames", f"must be {k}·n+1 frames (the model packs {k} frames per latent frame), "
                                          f"found {num_frames!r}{near}")
        seconds = (num_frames - 1) / fps
        if seconds <= 0 or seconds > g.max_seconds:
            raise SpecError("num_frames", f"{num_frames} frames at {fps} fps is {seconds:g} s; the limit is "
                                          f"{g.max_seconds:g} s, and at least {k + 1} frames")
    if not _finite(seconds) or seconds <= 0:
        raise SpecError("seconds", f"must be a positive number, found {seconds!r}")
    if seconds > g.max_seconds:
        raise SpecError("seconds", f"{seconds:g} is over the limit of {g.max_seconds:g}")
    intervals = seconds * fps
    if abs(intervals - round(intervals)) > 1e-6 or round(intervals) % k:
        raise SpecError(
            "seconds",
            f"{seconds:g} s at {fps} fps is {intervals:g} frame intervals; the model makes clips of "
            f"{k}·n intervals ({k}·n+1 frames), so seconds × fps must be a multiple of {k}"
            f"{_nearest_lengths(intervals, k, fps, g.max_seconds)}",
        )
    num_frames = int(round(intervals)) + 1

    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= g.max_steps:
        raise SpecError("num_inference_steps", f"must be a whole number from 1 to {g.max_steps}, found {steps!r}")
    if not _finite(guidance) or not 0 <= guidance <= 50:
        raise SpecError("guidance_scale", f"must be a number from 0 to 50, found {guidance!r}")
    if not _finite(shift) or shift <= 0:
        raise SpecError("shift", f"must be a positive number, found {shift!r}")
    if seed is None:
        # Unseeded requests still get a recorded seed, so any video can be made again.
        seed = secrets.randbelow(2**31)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise SpecError("seed", f"must be a whole number from 0 to 2**63-1, found {seed!r}")

    cache_threshold = _cache_threshold(preset, g, cache)
    budget = g.max_cost if g.max_cost is not None else preset.max_cost
    cost = job_cost(preset.geometry, width=width, height=height, num_frames=num_frames, steps=steps,
                    guidance_scale=guidance)
    if cost.token_steps > budget:
        raise _over_budget(preset, g, budget, cost, width=width, height=height, seconds=seconds, fps=fps, steps=steps)

    return VideoSpec(
        prompt=prompt, negative_prompt=negative, width=width, height=height, num_frames=num_frames,
        fps=fps, num_inference_steps=steps, guidance_scale=float(guidance), shift=float(shift),
        seed=seed, max_sequence_length=max_len, cache_threshold=cache_threshold, image=image,
    )


def _cache_threshold(preset: Preset, g: GenerationConfig, cache: str | float | None) -> float:
    """A request's `cache` (off, a named setting, or a threshold) as a threshold, within the
    server's maximum."""
    value = g.cache if cache is None else cache
    named = dict(preset.step_cache)
    if isinstance(value, str) and value.strip().lower() in named:
        name, threshold = value.strip().lower(), named[value.strip().lower()]
    elif isinstance(value, str) and value.strip().lower() in ("off", "0", ""):
        return 0.0
    else:
        name = None
        try:
            threshold = float(value)
        except (TypeError, ValueError):
            threshold = math.nan
        if isinstance(value, bool) or not math.isfinite(threshold) or threshold < 0:
            raise SpecError("cache", f"expected off, {', '.join(named)} or a threshold such as 0.1, found {value!r}")
        if threshold == 0:
            return 0.0
    limit = g.max_cache_threshold if g.max_cache_threshold is not None else max(named.values())
    if threshold > limit:
        said = f"{name} ({threshold:g})" if name else f"{threshold:g}"
        allowed = "step caching is off on this server" if limit == 0 else f"the most this server allows is {limit:g}"
        raise SpecError("cache", f"{said} is a step-cache threshold over this server's maximum: {allowed}")
    return threshold


def _over_budget(preset: Preset, g: GenerationConfig, budget: int, cost, *, width: int, height: int, seconds: float, fps: int,
                 steps: int) -> SpecError:
    """Name the field that is furthest above the preset's default, and say what would fit."""
    geo, d = preset.geometry, preset.defaults
    d_width, d_height = parse_size(d.size)
    growth = {"size": (width * height) / (d_width * d_height), "seconds": seconds / d.seconds,
              "fps": fps / d.fps, "num_inference_steps": steps / d.num_inference_steps}
    field = max(growth, key=growth.get)
    per_frame_step = cost.tokens_per_frame * cost.rows  # token-steps of one latent frame and step
    if field == "num_inference_steps":
        most = budget // (cost.latent_frames * per_frame_step)
        fit = f"at most {most} steps fit" if most >= 1 else "no step count fits"
    elif field == "size":
        fit = _fitting_size(width, height, budget // (cost.latent_frames * cost.steps * cost.rows), geo.spatial_multiple)
    elif field == "fps":
        most = _longest_seconds(budget, per_frame_step * steps, fps, geo.temporal_factor, seconds) * fps / seconds
        fits = [f for f in range(int(most), 0, -1) if abs(seconds * f - round(seconds * f)) < 1e-6
                and round(seconds * f) % geo.temporal_factor == 0]
        fit = f"at most {fits[0]} fps fits" if fits else "no frame rate fits"
    else:
        longest = _longest_seconds(budget, per_frame_step * steps, fps, geo.temporal_factor, g.max_seconds)
        fit = f"at most {longest:g} s fits" if longest > 0 else "no length fits"
    at_defaults = _longest_seconds(budget, tokens_per_frame(d_width, d_height, geo) * cost.rows * d.num_inference_steps,
                                   d.fps, geo.temporal_factor, g.max_seconds)
    return SpecError(field, f"this request costs {cost.token_steps:,} latent token-steps ({cost.explain()}); this "
                            f"server allows {budget:,} per request. Keeping the rest as asked, {fit}; at {d.size} "
                            f"and {d.fps} fps with {d.num_inference_steps} steps, at most {at_defaults:g} s fits")


def _longest_seconds(budget: int, per_latent_frame: int, fps: int, temporal_factor: int, limit: float) -> float:
    """The longest clip of at most `limit` s (4·n+1 frames) whose latent frames cost at most `budget`."""
    frames = min(budget // per_latent_frame, int(limit * fps + 1e-9) // temporal_factor + 1)  # latent frames
    return max(0, frames - 1) * temporal_factor / fps


def _fitting_size(width: int, height: int, max_tokens: int, multiple: int) -> str:
    """The largest size of the same shape with at most `max_tokens` latent tokens per frame."""
    scale = math.sqrt(max_tokens / ((width // multiple) * (height // multiple))) if max_tokens > 0 else 0
    w, h = (int(side * scale) // multiple * multiple for side in (width, height))
    while w >= multiple and h >= multiple and (w // multiple) * (h // multiple) > max_tokens:
        w, h = w - multiple, h - multiple
    if w < multiple or h < multiple:
        return "no size fits"
    return f"a size up to {w}x{h} fits"


def _nearest_lengths(intervals: float, k: int, fps: int, limit: float) -> str:
    """"; the nearest that work are A s and B s" for a length that is not k·n intervals."""
    lengths = [n * k / fps for n in (math.floor(intervals / k), math.ceil(intervals / k))]
    lengths = sorted({length for length in lengths if 0 < length <= limit})
    return f"; the nearest that work at {fps} fps: {' and '.join(f'{x:g} s' for x in lengths)}" if lengths else ""


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _nearest(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)
