"""TextEncoder deployment: prompts -> embeddings, batched across requests and cached; for an
image-to-video preset also a first frame -> CLIP image tokens (the other small encoder of a
job's conditioning: on the same replicas, sharing their accelerator share)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from ray import serve

from serving.config import ServiceConfig
from serving.deployments._replica import prepare_replica
from serving.deployments.stage_load import ReplicaLoad
from serving.deployments.watchdog import PRIOR_ENCODE_SECONDS, STARTED, StageClock
from serving.metrics import mark_simulated, metrics


@serve.deployment(name="TextEncoder")
class TextEncoder:
    CACHE_SIZE = 256  # prompts; the default negative prompt stays hot
    load = ReplicaLoad()  # encode calls held here, for the autoscaler

    def __init__(self, config: ServiceConfig):
        prepare_replica(config.stages.text_encoder)
        from serving.models.loading import load_text_encoder

        self.parts = load_text_encoder(config.model, config.simulation)
        from serving.models.loading import load_image_encoder

        self.image_encoder = load_image_encoder(config.model) if config.simulation is None else None
        mark_simulated("text_encoder", config.simulation)
        self.cache: OrderedDict[tuple[str, int], object] = OrderedDict()
        self.clock = StageClock("text_encoder", config.stages.text_encoder.timeout_seconds, PRIOR_ENCODE_SECONDS)

    def check_health(self) -> None:
        # Alive but stuck: Serve replaces the replica; the Director retries the job.
        hung = self.clock.overdue()
        if hung is not None:
            raise RuntimeError(hung)

    async def encode(self, prompts: list[str], max_sequence_length: int):
        """A stream: `STARTED` (the replica has the call), then {"embeddings": a (len(prompts),
        max_sequence_length, dim) CPU tensor, "device_seconds": the encoder time this call used
        (its share of batched forwards; 0 when cached)}, so the Director learns the cost
        without the time the call waited in front of the replica."""
        yield STARTED
        call = self.clock.start()
        # Waiting until it ends: its prompts share batched forwards, whose share it is charged.
        work = self.load.arrive()
        try:
            encoded = await self._encode(prompts, max_sequence_length, work)
        finally:
            self.clock.finish(call)
            self.load.finish(work)
        yield encoded

    async def encode_image(self, png: bytes):
        """A stream: `STARTED`, then {"image_embeds": the first frame's CLIP tokens (1, tokens,
        dim) on the CPU, "device_seconds"}: once per job, image-to-video presets only."""
        if self.image_encoder is None:
            raise ValueError("this model takes no image")
        yield STARTED
        call, work = self.clock.start(), self.load.arrive()
        try:
            started = time.perf_counter()
            tokens = await asyncio.to_thread(self._encode_image, png)
            seconds = time.perf_counter() - started
            metrics().accelerator_seconds.observe(seconds, tags={"stage": "text_encoder"})
            self.load.charge(work, seconds)
        finally:
            self.clock.finish(call)
            self.load.finish(work)
        yield {"image_embeds": tokens, "device_seconds": seconds}

    def _encode_image(self, png: bytes):
        import io

        from PIL import Image

        from serving.pipeline.image import encode_image_tokens

        with Image.open(io.BytesIO(png)) as image:
            return encode_image_tokens(self.image_encoder.processor, self.image_encoder.model, image.convert("RGB"))

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What this replica holds, for `serving.autoscaling.StagePolicy`."""
        return self.load.stats()

    async def _encode(self, prompts: list[str], max_sequence_length: int, work: int | None = None):
        import torch

        rows, device_seconds = [], 0.0
        for prompt in prompts:
            key = (prompt, max_sequence_length)
            if key in self.cache:
                self.cache.move_to_end(key)
                rows.append(self.cache[key])
            else:
                rows.append(None)
        missing = [p for p, row in zip(prompts, rows) if row is None]
        if missing:
            encoded = await asyncio.gather(*(self._encode_one((p, max_sequence_length)) for p in missing))
            device_seconds = sum(seconds for _, seconds in encoded)
            metrics().accelerator_seconds.observe(device_seconds, tags={"stage": "text_encoder"})
            if work is not None:  # its share of batched forwards, not the wall time it waited
                self.load.charge(work, device_seconds)
            fresh = {p: row for p, (row, _) in zip(missing, encoded)}
            rows = [row if row is not None else fresh[p] for p, row in zip(prompts, rows)]
            for prompt, row in fresh.items():
                self.cache[(prompt, max_sequence_length)] = row
                while len(self.cache) > self.CACHE_SIZE:
                    self.cache.popitem(last=False)
        return {"embeddings": torch.stack(rows), "device_seconds": device_seconds}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _encode_one(self, items: list[tuple[str, int]]):
        """Prompts from concurrent requests share one encoder forward (grouped by length)."""
        from serving.pipeline.encode import encode_text

        out = [None] * len(items)
        for length in {length for _, length in items}:
            index = [i for i, (_, n) in enumerate(items) if n == length]
            started = time.perf_counter()
            embeds = await asyncio.to_thread(
                encode_text, self.parts.tokenizer, self.parts.model, [items[i][0] for i in index], length)
            share = (time.perf_counter() - started) / len(index)
            for i, row in zip(index, embeds.float().cpu()):
                out[i] = (row, share)
        return out

    def ping(self) -> bool:
        return True
