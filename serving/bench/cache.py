"""`ditserve bench cache`: what step caching costs in fidelity and saves in DiT forwards.

Every held-out prompt of the tiny model's semantic test (serving/models/semantic.py), at
each seed, is generated once per cache setting with the same seed and steps. Against the
uncached video of the same prompt and seed it reports the latents' relative error and the
decoded frames' PSNR; per setting, the DiT forwards per video (steps that ran the blocks)
and the held-out semantic score. In-process (no Ray, no HTTP); any preset whose folder is at
hand works, but the semantic judge knows only the tiny model's shapes.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from serving.models import semantic
from serving.pipeline.local import LocalPipeline


@dataclass
class SettingResult:
    cache: str
    threshold: float
    computed: list[int] = field(default_factory=list)
    steps: int = 0
    latent_errors: list[float] = field(default_factory=list)
    psnrs: list[float] = field(default_factory=list)
    correct: int = 0
    total: int = 0

    @property
    def forwards(self) -> float:
        return statistics.mean(self.computed)

    @property
    def reduction(self) -> float:
        return self.steps / self.forwards


def psnr(frames: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of uint8 frames against reference frames (inf when identical)."""
    mse = ((frames.float() - reference.float()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def bench_cache(config, settings: list[str], steps: int, seeds: list[int], log=None) -> list[SettingResult]:
    pipeline = LocalPipeline(config)
    prompts = semantic.held_out_prompts()
    results = {name: SettingResult(name, pipeline.spec("-", cache=name).cache_threshold, steps=steps)
               for name in ["off", *[s for s in settings if s != "off"]]}
    for prompt, colour, _shape, direction in prompts:
        for seed in seeds:
            reference = None
            for name, result in results.items():
                spec = pipeline.spec(prompt, seed=seed, num_inference_steps=steps, cache=name)
                computed = []
                video = pipeline.generate(spec, on_step=None, on_computed=computed.append)
                result.computed.append(sum(computed))
                if reference is None:
                    reference = video
                else:
                    error = ((video.latents - reference.latents).norm() / reference.latents.norm()).item()
                    result.latent_errors.append(error)
                    result.psnrs.append(psnr(video.frames, reference.frames))
                result.total += 1
                result.correct += semantic.judge(video.frames, colour, direction).ok
            if log is not None:
                log(f"bench cache: {prompt!r} seed {seed} done")
    return list(results.values())


def report(results: list[SettingResult], device: str, steps: int) -> str:
    off = results[0]
    lines = [f"device: {device}, torch threads: {torch.get_num_threads()}, {steps} steps, "
             f"{off.total} videos per setting (held-out prompts x seeds), each compared with the uncached one",
             "| cache | threshold | DiT forwards per video | fewer forwards | latent rel. error mean / max | "
             "frame PSNR dB mean / min | held-out score |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.latent_errors:
            errors = f"{statistics.mean(r.latent_errors):.4f} / {max(r.latent_errors):.4f}"
            finite = [p for p in r.psnrs if math.isfinite(p)]
            quality = (f"{statistics.mean(finite):.1f} / {min(finite):.1f}" if finite else "identical")
        else:
            errors, quality = "(reference)", "(reference)"
        lines.append(f"| {r.cache} | {r.threshold:g} | {r.forwards:.2f} | {r.reduction:.2f}x | {errors} | {quality} | "
                     f"{r.correct}/{r.total} |")
    return "\n".join(lines)
