"""`ditserve bench parallel`: one DiT forward's time against the gang's layout.

Each layout (ulysses x cfg ranks, one process per rank, `threads` torch threads each) runs in
fresh local processes over gloo (CPU) or NCCL (GPU), as serving/parallel/processes.py; every
one times the same forward: a batch of `rows` rows (a guided request is 2) at the given size,
with random inputs from a fixed seed, the median of `repeats` after one warm-up. One rank
with as many threads as the widest gang has ranks is the fair single-process rival on a CPU.
The output of each layout is checked against 1 x 1's (max abs difference).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch

from serving.config import ServiceConfig
from serving.parallel.processes import run_gang


@dataclass
class LayoutResult:
    ulysses: int
    cfg: int
    threads: int
    seconds: float
    tokens: int
    max_difference: float = 0.0

    @property
    def ranks(self) -> int:
        return self.ulysses * self.cfg


def _time_forward(shape: tuple[int, int, int, int], rows: int, repeats: int, pipeline, blocks):
    """Rank 0's work: the forward's median seconds and its output (for the cross-check)."""
    from serving.pipeline.step_cache import forward_with_caches

    t = pipeline.transformer
    param = next(t.parameters())
    frames, height, width, text_len = shape
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(rows, t.config.in_channels, frames, height, width, generator=generator).to(param.device, param.dtype)
    timestep = torch.full((rows,), 500.0, device=param.device)
    text = torch.randn(rows, text_len, t.config.text_dim, generator=generator).to(param.device, param.dtype)
    forward = partial(forward_with_caches, t, latents, timestep, text, list(range(rows)), [None] * rows,
                      [(0, 1)] * rows, blocks=blocks)
    output, _ = forward()  # warm-up
    times = []
    for _ in range(repeats):
        if param.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        forward()
        if param.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), output.float().cpu()


def bench_parallel(config: ServiceConfig, layouts: list[tuple[int, int, int]], size: str, num_frames: int,
                   rows: int, repeats: int, log=None) -> list[LayoutResult]:
    """`layouts`: (ulysses, cfg, threads per rank), the first the reference for the others."""
    from serving.models.loading import preset_of
    from serving.pipeline.spec import build_spec

    preset = preset_of(config.model)
    spec = build_spec(preset, config.generation, "-", size=size, num_frames=num_frames)  # validates size and length
    g = preset.geometry
    latent_shape = ((spec.num_frames - 1) // g.temporal_factor + 1, spec.height // g.vae_spatial_factor,
                    spec.width // g.vae_spatial_factor, spec.max_sequence_length)
    patch = g.spatial_multiple // g.vae_spatial_factor
    tokens = latent_shape[0] * (latent_shape[1] // patch) * (latent_shape[2] // patch)
    results, reference = [], None
    for ulysses, cfg, threads in layouts:
        stage = config.stages.denoiser.model_copy(update={"torch_threads": threads})
        layout_config = config.model_copy(update={"stages": config.stages.model_copy(update={"denoiser": stage})})
        seconds, output = run_gang(layout_config, ulysses, cfg, partial(_time_forward, latent_shape, rows, repeats))

        if reference is None:
            reference = output
        result = LayoutResult(ulysses, cfg, threads, seconds, tokens, (output - reference).abs().max().item())
        results.append(result)
        if log is not None:
            log(f"ulysses {ulysses} x cfg {cfg}, {threads} thread(s)/rank: {seconds * 1000:.1f} ms per forward")
    return results


def report(results: list[LayoutResult], device: str, rows: int, size: str, repeats: int) -> str:
    base = results[0].seconds
    lines = [f"DiT forward vs gang layout: {device}, {rows} rows, {size} ({results[0].tokens} tokens), "
             f"median of {repeats}",
             "",
             "| ulysses | cfg | ranks | threads/rank | forward ms | speed-up vs first row | max abs diff vs first row |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.ulysses} | {r.cfg} | {r.ranks} | {r.threads} | {r.seconds * 1000:.1f} | "
                     f"{base / r.seconds:.2f}x | {r.max_difference:.1e} |")
    return "\n".join(lines)
