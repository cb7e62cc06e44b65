"""`ditserve bench profile`: measure a cost profile on whatever device this runs on.

It loads the configured preset's real stages (tiny on a CPU; a Wan folder on a GPU), times
each at a few shapes, and fits the same time model the packaged profiles use
(serving/simulate/profile.py) by non-negative least squares, so measured numbers replace
published ones in the same JSON. Start-up seconds are the loaders' own time in this process
(weights read and moved to the device; process start not included). One anchor records a
whole job at the preset's default shape, timed stage by stage, for the profile to reproduce.
"""

from __future__ import annotations

import datetime as dt
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from serving.config import ServiceConfig
from serving.cost_model import STAGE_NAMES
from serving.models.loading import (load_scheduler_config, load_text_encoder, load_transformer, load_vae, preset_of,
                                    resolve_device)
from serving.models.presets import Preset
from serving.pipeline.cost import guidance_rows, latent_frames, tokens_per_frame
from serving.simulate.profile import CostProfile

# Shapes timed, as multiples of the preset's default size and frame count (kept small on a CPU).
SIZE_FACTORS = (1, 2)
FRAME_FACTORS = (1, 2)
PROMPT_COUNTS = (1, 2, 4)


def _timed(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    def once() -> float:
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    once()  # warm-up: allocator, kernels, caches
    return statistics.median(once() for _ in range(repeats))


def nonnegative_fit(columns: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Least squares of the relative error (each call weighs the same, small or large) with
    every coefficient >= 0 (a negative cost is not physical): fit, drop the columns that came
    out negative, refit, until none is."""
    columns, seconds = columns / seconds[:, None], np.ones_like(seconds)
    active = list(range(columns.shape[1]))
    while True:
        coef = np.zeros(columns.shape[1])
        coef[active] = np.linalg.lstsq(columns[:, active], seconds, rcond=None)[0]
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            return coef
        active = [i for i in active if i not in negative]


@dataclass
class Parts:
    """A model's three stages, loaded on one device, and what loading each took."""

    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    vae: torch.nn.Module
    startup: dict[str, float]  # stage -> seconds
    startup_how: str = ("the loader's own time in this process (weights read and moved to the device; process start "
                        "not included)")
    startup_kind: str = "measured"


def measure(config: ServiceConfig, repeats: int = 3, name: str | None = None,
            log: Callable[[str], None] = print, size_factors=SIZE_FACTORS, frame_factors=FRAME_FACTORS,
            prompt_counts=PROMPT_COUNTS) -> CostProfile:
    """The configured preset's profile on its configured device, its stages loaded as a service loads them."""
    model_cfg = config.model
    startup = {}
    started = time.perf_counter()
    text = load_text_encoder(model_cfg)
    startup["text_encoder"] = time.perf_counter() - started
    started = time.perf_counter()
    transformer = load_transformer(model_cfg)
    startup["denoiser"] = time.perf_counter() - started
    started = time.perf_counter()
    vae = load_vae(model_cfg)
    startup["vae_decoder"] = time.perf_counter() - started
    load_scheduler_config(model_cfg)
    parts = Parts(text.tokenizer, text.model, transformer, vae, startup)
    return measure_parts(parts, preset_of(model_cfg), resolve_device(model_cfg), repeats=repeats, name=name, log=log,
                         size_factors=size_factors, frame_factors=frame_factors, prompt_counts=prompt_counts)


def scaled_shape(preset: Preset, size: float, frames: float) -> tuple[int, int, int]:
    """(width, height, frames) at `size` x the preset's default size and `frames` x its frame
    count, rounded to what the VAE and the DiT patch accept."""
    from serving.config import parse_size

    geometry, defaults = preset.geometry, preset.defaults
    width0, height0 = parse_size(defaults.size)
    frames0 = round(defaults.seconds * defaults.fps) // geometry.temporal_factor * geometry.temporal_factor + 1
    multiple, step = geometry.spatial_multiple, geometry.temporal_factor
    width, height = (max(multiple, round(x * size / multiple) * multiple) for x in (width0, height0))
    return width, height, max(1, round((frames0 - 1) * frames / step)) * step + 1


def measure_parts(parts: Parts, preset: Preset, device: torch.device, repeats: int = 3, name: str | None = None,
                  log: Callable[[str], None] = print, size_factors=SIZE_FACTORS, frame_factors=FRAME_FACTORS,
                  prompt_counts=PROMPT_COUNTS, command: str = "ditserve bench profile") -> CostProfile:
    """Time `parts` at shapes around the preset's default job and fit the profile's time model."""
    from serving.pipeline.encode import encode_text

    geometry, defaults = preset.geometry, preset.defaults
    width0, height0, frames0 = scaled_shape(preset, 1, 1)
    text0 = defaults.max_sequence_length
    transformer, vae, startup = parts.transformer, parts.vae, parts.startup
    param = next(transformer.parameters())
    channels = transformer.config.in_channels

    rows_te, te_seconds = [], []
    for prompts in prompt_counts:
        for tokens in (text0 // 2, text0):
            seconds = _timed(lambda: encode_text(parts.tokenizer, parts.text_encoder, ["a red circle"] * prompts, tokens),
                             device, repeats)
            rows_te.append([1.0, prompts * tokens])
            te_seconds.append(seconds)
            log(f"text encoder: {prompts} prompts x {tokens} tokens: {seconds * 1000:.1f} ms")

    rows_dit, dit_seconds = [], []
    for size in size_factors:
        for frames in frame_factors:
            width, height, num_frames = scaled_shape(preset, size, frames)
            n = latent_frames(num_frames, geometry) * tokens_per_frame(width, height, geometry)
            for rows in (1, 2):
                for tokens in (text0 // 2, text0):
                    latents = torch.randn(rows, channels, latent_frames(num_frames, geometry),
                                          height // geometry.vae_spatial_factor, width // geometry.vae_spatial_factor,
                                          device=device, dtype=param.dtype)
                    embeds = torch.randn(rows, tokens, transformer.config.text_dim, device=device, dtype=param.dtype)
                    step = torch.full((rows,), 500.0, device=device)

                    def forward():
                        with torch.inference_mode():
                            transformer(hidden_states=latents, timestep=step, encoder_hidden_states=embeds,
                                        return_dict=False)

                    seconds = _timed(forward, device, repeats)
                    rows_dit.append([1.0, rows * n, rows * n * n, rows * n * tokens])
                    dit_seconds.append(seconds)
                    log(f"DiT forward: {rows} rows x {n} latent tokens, {tokens} text tokens: {seconds * 1000:.1f} ms")

    rows_vae, vae_seconds = [], []
    for size in (1,):  # decode cost is linear in pixel-frames: more frames vary it enough, cheaply
        for frames in frame_factors:
            width, height, num_frames = scaled_shape(preset, size, frames)
            z = torch.randn(1, vae.config.z_dim, latent_frames(num_frames, geometry),
                            height // geometry.vae_spatial_factor, width // geometry.vae_spatial_factor,
                            device=next(vae.parameters()).device)
            from serving.pipeline.decode import decode

            seconds = _timed(lambda: decode(vae, z), device, repeats)
            rows_vae.append([1.0, num_frames * width * height])
            vae_seconds.append(seconds)
            log(f"VAE decode: {num_frames} frames at {width}x{height}: {seconds * 1000:.1f} ms")

    te = nonnegative_fit(np.array(rows_te), np.array(te_seconds))
    dit = nonnegative_fit(np.array(rows_dit), np.array(dit_seconds))
    vd = nonnegative_fit(np.array(rows_vae), np.array(vae_seconds))

    # The anchor: a default job, each stage timed directly (not through the fit).
    rows0 = guidance_rows(defaults.guidance_scale)
    anchor_seconds = (te_seconds[rows_te.index([1.0, rows0 * text0])] if [1.0, rows0 * text0] in rows_te else 0.0)
    n0 = latent_frames(frames0, geometry) * tokens_per_frame(width0, height0, geometry)
    anchor_seconds += defaults.num_inference_steps * dit_seconds[rows_dit.index([1.0, rows0 * n0, rows0 * n0 * n0,
                                                                                  rows0 * n0 * text0])]
    default_decode = [1.0, frames0 * width0 * height0]
    anchor_seconds += (vae_seconds[rows_vae.index(default_decode)] if default_decode in rows_vae
                       else float(np.dot(vd, default_decode)))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    where = f"measured by {command} on {device_name} {dt.date.today().isoformat()}"
    counts = {"text_encoder": len(te_seconds), "denoiser": len(dit_seconds), "vae_decoder": len(vae_seconds)}

    def source(path: str, figure: str) -> dict:
        stage = path.split(".")[0]
        how = parts.startup_how if stage == "startup_seconds_per_stage" else (
               f"non-negative least squares of the stage's time model over {counts[stage]} timed shapes "
               f"(median of {repeats} after a warm-up each)")
        kind = parts.startup_kind if stage == "startup_seconds_per_stage" else "measured"
        return {"what": path, "figure": figure, "where": where, "how": how, "kind": kind}

    data = {
        "name": name or f"{preset.name}-{device.type}",
        "device": device_name,
        "model": preset.name,
        "text_encoder": {"overhead_s": te[0], "per_prompt_token_s": te[1]},
        "denoiser": {"overhead_s": dit[0], "per_token_s": dit[1], "per_token_pair_s": dit[2],
                     "per_token_text_token_s": dit[3]},
        "vae_decoder": {"overhead_s": vd[0], "per_pixel_frame_s": vd[1]},
        "startup_seconds_per_stage": startup,
        "anchors": [{"name": "measured-default-job", "width": width0, "height": height0, "num_frames": frames0,
                     "steps": defaults.num_inference_steps, "guidance_scale": defaults.guidance_scale,
                     "text_tokens": text0, "seconds": anchor_seconds, "tolerance": 0.5, "stage": "total"}],
        "sources": [],
    }
    for section in ("text_encoder", "denoiser", "vae_decoder", "startup_seconds_per_stage"):
        for key, value in data[section].items():
            data["sources"].append(source(f"{section}.{key}", f"{value:.4g} s (fitted)" if section != "startup_seconds_per_stage" else f"{value:.3g} s"))
    data["sources"].append({
        "what": "anchor: measured-default-job", "kind": "measured", "where": where,
        "figure": f"{anchor_seconds:.3f} s: one {width0}x{height0}x{frames0} job of {defaults.num_inference_steps} steps",
        "how": "text encode + steps x one forward + decode, each timed directly at that shape (a shared CPU is "
               "noisy: the tolerance is wide)"})
    assert set(STAGE_NAMES) == set(startup)
    return CostProfile.model_validate(data)
