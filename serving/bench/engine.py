"""`ditserve bench engine`: N concurrent jobs through the Denoiser engine, one request at a
time vs step-level batching. In-process (no Ray, no HTTP) so it measures the engine alone;
prompts are encoded before the clock starts.
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

    @property
    def jobs_per_min(self) -> float:
        return 60.0 * self.jobs / self.wall_s

    @property
    def p95(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def run_mode(pipeline: LocalPipeline, specs, embeds, max_batch: int, mode: str) -> Result:
    engine = DenoiseEngine(pipeline.transformer, max_batch=max_batch)
    channels = pipeline.transformer.config.in_channels
    start = time.perf_counter()
    for i, (spec, (cond, neg)) in enumerate(zip(specs, embeds)):
        state = start_denoise(spec, pipeline.scheduler_config, channels, pipeline.preset.geometry)
        engine.add(EngineRequest(id=str(i), state=state, prompt_embeds=cond, negative_embeds=neg))
    finished: dict[str, float] = {}
    while not engine.idle:
        for event in engine.step_batch():
            if event.kind == "finished":
                finished[event.request_id] = time.perf_counter() - start
    wall = time.perf_counter() - start
    return Result(mode, len(specs), max_batch, wall, list(finished.values()))


def bench_engine(config, jobs: int, steps: int, size: str, seconds: float, max_batch: int | None) -> list[Result]:
    pipeline = LocalPipeline(config)
    specs = [pipeline.spec(f"benchmark prompt {i}", seed=i, num_inference_steps=steps, size=size, seconds=seconds)
             for i in range(jobs)]
    embeds = [pipeline.encode(spec) for spec in specs]
    run_mode(pipeline, specs[:1], embeds[:1], 1, "warm-up")  # first forwards pay one-off costs
    return [run_mode(pipeline, specs, embeds, 1, "one-at-a-time"),
            run_mode(pipeline, specs, embeds, max_batch or jobs, "batched")]


def report(results: list[Result], device: str) -> str:
    lines = [f"device: {device}, torch threads: {torch.get_num_threads()}",
             "| mode | jobs | max batch | wall s | jobs/min | mean latency s | p95 latency s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.mode} | {r.jobs} | {r.max_batch} | {r.wall_s:.2f} | {r.jobs_per_min:.1f} | "
                     f"{statistics.mean(r.latencies):.2f} | {r.p95:.2f} |")
    single, batched = results
    lines.append(f"engine: one-at-a-time={single.jobs_per_min:.1f} batched={batched.jobs_per_min:.1f} "
                 f"ratio={batched.jobs_per_min / single.jobs_per_min:.2f}")
    return "\n".join(lines)
