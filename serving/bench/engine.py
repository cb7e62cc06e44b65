"""`ditserve bench engine`: N concurrent jobs through the Denoiser engine, one request at a
time vs step-level batching, for each step-cache setting asked (`--cache off,balanced`).
In-process (no Ray, no HTTP) so it measures the engine alone; prompts are encoded before the
clock starts. DiT forwards per video counts the steps that ran the blocks.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from serving.engine.scheduler import DenoiseEngine, EngineRequest
from serving.pipeline.denoise import start_denoise
from serving.pipeline.local import LocalPipeline


@dataclass
class Result:
    mode: str
    jobs: int
    max_batch: int
    wall_s: float
    latencies: list[float]
    cache: str = "off"
    computed: list[int] | None = None  # steps that ran the DiT, per video

    @property
    def forwards_per_video(self) -> float:
        return statistics.mean(self.computed) if self.computed else float("nan")

    @property
    def jobs_per_min(self) -> float:
        return 60.0 * self.jobs / self.wall_s

    @property
    def p95(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def run_mode(pipeline: LocalPipeline, specs, embeds, max_batch: int, mode: str, cache: str = "off") -> Result:
    engine = DenoiseEngine(pipeline.transformer, max_batch=max_batch)
    channels = pipeline.transformer.config.in_channels
    start = time.perf_counter()
    for i, (spec, (cond, neg)) in enumerate(zip(specs, embeds)):
        state = start_denoise(spec, pipeline.scheduler_config, channels, pipeline.preset.geometry)
        engine.add(EngineRequest(id=str(i), state=state, prompt_embeds=cond, negative_embeds=neg))
    finished: dict[str, float] = {}
    computed: list[int] = []
    while not engine.idle:
        for event in engine.step_batch():
            if event.kind == "finished":
                finished[event.request_id] = time.perf_counter() - start
                computed.append(event.computed_steps)
    wall = time.perf_counter() - start
    return Result(mode, len(specs), max_batch, wall, list(finished.values()), cache, computed)


def bench_engine(config, jobs: int, steps: int, size: str, seconds: float, max_batch: int | None,
                 caches: tuple[str, ...] = ("off",)) -> list[Result]:
    pipeline = LocalPipeline(config)
    results = []
    for cache in caches:
        specs = [pipeline.spec(f"benchmark prompt {i}", seed=i, num_inference_steps=steps, size=size,
                               seconds=seconds, cache=cache) for i in range(jobs)]
        embeds = [pipeline.encode(spec) for spec in specs]
        run_mode(pipeline, specs[:1], embeds[:1], 1, "warm-up")  # first forwards pay one-off costs
        results += [run_mode(pipeline, specs, embeds, 1, "one-at-a-time", cache),
                    run_mode(pipeline, specs, embeds, max_batch or jobs, "batched", cache)]
    return results


def report(results: list[Result], device: str) -> str:
    lines = [f"device: {device}, torch threads: {torch.get_num_threads()}",
             "| cache | mode | jobs | max batch | DiT forwards per video | wall s | jobs/min | mean latency s | "
             "p95 latency s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.cache} | {r.mode} | {r.jobs} | {r.max_batch} | {r.forwards_per_video:.2f} | {r.wall_s:.2f} | "
                     f"{r.jobs_per_min:.1f} | {statistics.mean(r.latencies):.2f} | {r.p95:.2f} |")
    for single, batched in zip(results[::2], results[1::2]):
        lines.append(f"engine ({single.cache}): one-at-a-time={single.jobs_per_min:.1f} "
                     f"batched={batched.jobs_per_min:.1f} ratio={batched.jobs_per_min / single.jobs_per_min:.2f}")
    return "\n".join(lines)
