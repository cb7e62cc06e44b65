"""VAEDecoder deployment: latents -> MP4 bytes and a thumbnail (frames never leave the replica);
for an image-to-video preset also the first frame's VAE condition at a job's start (the
replica holds the VAE already: the encoder half of the same weights, no second copy)."""

from __future__ import annotations

import asyncio
import io
import time

from ray import serve

from serving import failpoints
from serving.config import ServiceConfig
from serving.deployments._replica import prepare_replica
from serving.deployments.stage_load import ReplicaLoad
from serving.deployments.watchdog import PRIOR_DECODE_SECONDS_PER_MEGAPIXEL_FRAME, STARTED, StageClock


@serve.deployment(name="VAEDecoder")
class VAEDecoder:
    load = ReplicaLoad()  # decodes waiting for the accelerator (one at a time) and running, for the autoscaler

    def __init__(self, config: ServiceConfig):
        prepare_replica(config.stages.vae_decoder)
        from serving.metrics import mark_simulated
        from serving.models.loading import load_vae

        self.vae = load_vae(config.model, config.simulation)
        mark_simulated("vae_decoder", config.simulation)
        # A simulated clip says so inside the file too (MP4 metadata), wherever it is copied to.
        self.simulated_by = config.simulation.profile if config.simulation is not None else None
        # The Wan VAE keeps a causal feature cache inside the module while it decodes, so two
        # decodes must never overlap on one replica.
        self.decode_lock = asyncio.Lock()
        self.clock = StageClock("vae_decoder", config.stages.vae_decoder.timeout_seconds,
                                PRIOR_DECODE_SECONDS_PER_MEGAPIXEL_FRAME)

    async def decode(self, latents, fps: int, units: float = 1.0):
        """A stream: `STARTED` once the decode has the VAE (decodes on a replica run one at a
        time), then {"mp4", "thumbnail", "frames", "device_seconds"}. `units`: the decode's
        megapixel-frames (see watchdog.decode_units), for its timeout."""
        from serving.metrics import metrics

        work = self.load.arrive()
        try:
            async with self.decode_lock:
                self.load.start(work)
                yield STARTED
                started = time.perf_counter()
                call = self.clock.start(units)
                try:
                    frames = await asyncio.to_thread(self._decode, latents)
                finally:
                    self.clock.finish(call)
                device_seconds = time.perf_counter() - started
                metrics().accelerator_seconds.observe(device_seconds, tags={"stage": "vae_decoder"})
        finally:
            self.load.finish(work)
        # The decode's own time, without its wait for the replica: the Director learns the cost from it.
        yield {**await asyncio.to_thread(self._package, frames, fps, self.simulated_by),
               "device_seconds": device_seconds}

    async def encode_first_frame(self, png: bytes, spec: dict, geometry, units: float = 1.0):
        """A stream: `STARTED` once it has the VAE, then {"condition": the first-frame mask and
        latents (1, 4 + z, ...) on the CPU, "device_seconds"}: once per job, image-to-video
        presets only. `units`: as for `decode`, for its timeout."""
        from serving.metrics import metrics

        work = self.load.arrive()
        try:
            async with self.decode_lock:  # the same module (and its causal cache) as decode
                self.load.start(work)
                yield STARTED
                started = time.perf_counter()
                call = self.clock.start(units)  # a hung encode holds the VAE: check_health must see it
                try:
                    condition = await asyncio.to_thread(self._encode_first_frame, png, spec, geometry)
                finally:
                    self.clock.finish(call)
                device_seconds = time.perf_counter() - started
                metrics().accelerator_seconds.observe(device_seconds, tags={"stage": "vae_decoder"})
        finally:
            self.load.finish(work)
        yield {"condition": condition, "device_seconds": device_seconds}

    def _encode_first_frame(self, png: bytes, spec: dict, geometry):
        from PIL import Image

        from serving.pipeline.image import first_frame_condition
        from serving.pipeline.spec import VideoSpec

        with Image.open(io.BytesIO(png)) as image:
            return first_frame_condition(self.vae, image.convert("RGB"), VideoSpec(**spec), geometry)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What this replica holds, for `serving.autoscaling.StagePolicy`."""
        return self.load.stats()

    def _decode(self, latents):
        from serving.pipeline.decode import decode

        failpoints.hit("vae_decoder.decode")
        return decode(self.vae, latents)

    def check_health(self) -> None:
        # Alive but stuck (a hung kernel): Serve replaces the replica; the Director retries the job.
        hung = self.clock.overdue()
        if hung is not None:
            raise RuntimeError(hung)

    @staticmethod
    def _package(frames, fps: int, simulated_by: str | None = None) -> dict:
        from PIL import Image

        from serving.pipeline.mp4 import encode_mp4

        thumbnail = io.BytesIO()
        Image.fromarray(frames[len(frames) // 2].numpy()).save(thumbnail, format="WEBP", quality=90)
        return {"mp4": encode_mp4(frames, fps, simulated_by=simulated_by), "thumbnail": thumbnail.getvalue(), "frames": int(frames.shape[0])}

    def ping(self) -> bool:
        return True
