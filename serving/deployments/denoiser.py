"""Denoiser deployment: one step-level batching engine per replica.

Concurrent requests on a replica share DiT forwards at every step boundary (see
`serving.engine.scheduler`). Each request streams its progress back to the Director, and
its latents are checkpointed to the artifact store every `engine.checkpoint_every` steps,
so a request whose replica dies resumes on another from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from ray import serve

from serving.config import ServiceConfig
from serving.deployments._replica import prepare_replica
from serving.deployments.stage_load import startup_seconds
from serving.deployments.watchdog import StageClock

logger = logging.getLogger("ray.serve")

DENOISER_REPORT_SECONDS = 10.0  # how often a replica repeats its report to the Director


def checkpoint_key(job_id: str) -> str:
    return f"{job_id}/denoise-checkpoint.pt"


class SimulatedGang:
    """A simulated replica's gang: Ray holds its devices (the placement group), its stand-in
    lays out each forward and runs it in the profile's time for that many; nothing to coordinate."""

    def __init__(self, transformer, parallel):
        self.transformer, self.parallel = transformer, parallel
        transformer.spread_over(parallel.ulysses, parallel.cfg, parallel.layout, parallel.split_efficiency)

    def check_members(self) -> None:
        pass  # no processes to lose: the stand-in is one

    def describe(self) -> dict:
        p = self.parallel
        return {"ulysses": p.ulysses, "cfg": p.cfg, "ranks": p.degree, "simulated": True,
                "layout": p.layout, "forwards": dict(self.transformer.forwards)}


@serve.deployment(name="Denoiser")
class Denoiser:
    def __init__(self, config: ServiceConfig):
        prepare_replica(config.stages.denoiser)
        from serving.engine.scheduler import AsyncDenoiseEngine, DenoiseEngine
        from serving.models.loading import load_scheduler_config, load_transformer, preset_of
        from serving.storage import ArtifactStore

        self.transformer = load_transformer(config.model, config.simulation)
        self.scheduler_config = load_scheduler_config(config.model, config.simulation)
        self.geometry = preset_of(config.model).geometry
        self.artifacts = ArtifactStore(config.storage.artifacts_url, config.storage.artifacts_options)
        from serving.metrics import mark_simulated, metrics

        self.metrics = metrics()
        mark_simulated("denoiser", config.simulation)
        self.step_seconds = 0.0  # moving average, for the autoscaler
        self.clock = StageClock("denoiser", config.stages.denoiser.timeout_seconds,
                                preset_of(config.model).typical_step_seconds * config.engine.max_batch)
        self.gang = self._form_gang(config)
        # Accelerator-seconds are device-seconds: a step on a gang holds every one of its devices.
        self.devices = config.stages.denoiser.parallel.degree
        self.engine = AsyncDenoiseEngine(DenoiseEngine(
            self.transformer, max_batch=config.engine.max_batch, checkpoint_every=config.engine.checkpoint_every,
            on_forward=self._on_forward, blocks=getattr(self.gang, "blocks", None)))
        self.attention = self._choose_attention(config)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.report_loop = asyncio.get_running_loop().create_task(self._report_forever())

    def _form_gang(self, config: ServiceConfig):
        """With stages.denoiser.parallel above 1, this replica spans a gang of devices
        (serving/parallel/): its workers start in the replica's placement group, and every
        forward's blocks run across them."""
        parallel = config.stages.denoiser.parallel
        if parallel.degree == 1:
            return None
        if config.simulation is not None:  # the placement group holds the GPUs; the stand-in runs faster
            return SimulatedGang(self.transformer, parallel)
        from serving.parallel.workers import GangLeader

        # Collectives wait no longer than a step may take before the replica counts as hung.
        return GangLeader(config, self.transformer, timeout_s=self.clock.timeout())

    def _choose_attention(self, config: ServiceConfig) -> dict:
        """The attention backend this replica's DiT runs, self-checked now, before any request
        (serving/kernels/dispatch.py): a kernel that fails its check is passed over here, with the reason."""
        if config.simulation is not None:
            attention = {"backend": "simulated", "requested": config.model.attention_backend, "passed_over": []}
        else:
            from serving.kernels.wan import attention_in_use

            attention = attention_in_use(self.transformer, config.model.attention_backend)
        self._attention_tags = {"backend": attention["backend"], "requested": attention["requested"],
                                "dtype": attention.get("dtype", ""), "head_dim": str(attention.get("head_dim", ""))}
        self.metrics.attention_backend.set(1, tags=self._attention_tags)
        for passed in attention["passed_over"]:
            logger.warning("attention backend %s passed over: %s", passed["backend"], passed["reason"])
        return attention

    async def _report_forever(self) -> None:
        """Tell the Director what this replica runs, for /readyz; again every period, so the
        Director can forget replicas that are gone."""
        app, director = serve.get_replica_context().app_name, None
        while True:
            # Set again each period: a gauge set once was seen missing from the export minutes later.
            self.metrics.attention_backend.set(1, tags=self._attention_tags)
            try:
                director = director or serve.get_deployment_handle("Director", app)
                report = {"attention": self.attention}
                if self.gang is not None:
                    report["parallel"] = self.gang.describe()
                await asyncio.wait_for(director.note_denoiser.remote(self.replica, report),
                                       timeout=DENOISER_REPORT_SECONDS)
                await asyncio.sleep(DENOISER_REPORT_SECONDS)
            except Exception as exc:  # the Director not deployed yet, or restarting: soon again
                logger.debug("attention report to the Director failed (%s); retrying", exc)
                await asyncio.sleep(2.0)

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica, after draining (a scale-down, an update):
        /readyz forgets it now, not three report periods later (only a crash waits that long).
        Serve also calls it after a constructor that failed, so nothing here may be assumed set.
        (Were the object merely garbage-collected, Python would not await it: nothing runs.)"""
        try:
            report_loop = getattr(self, "report_loop", None)
            if report_loop is not None:
                report_loop.cancel()
            director = serve.get_deployment_handle("Director", serve.get_replica_context().app_name)
            await asyncio.wait_for(director.forget_denoiser.remote(self.replica), timeout=5)
        except Exception as exc:  # the Director gone too (the app is being deleted): nothing to tell
            logger.debug("could not tell the Director this replica stops (%s)", exc)

    def _on_forward(self, batch_size: int, seconds: float) -> None:
        self.metrics.step_time.observe(seconds)
        self.metrics.batch_size.observe(batch_size)
        self.step_seconds = seconds if not self.step_seconds else 0.8 * self.step_seconds + 0.2 * seconds
        self.clock.observe(seconds)

    def check_health(self) -> None:
        # Alive but stuck (a hung forward, a dead engine loop): Serve replaces the replica, and
        # the Director retries its jobs elsewhere from their checkpoints.
        running = self.engine.engine.forward_running_seconds()
        if running > self.clock.timeout():
            raise RuntimeError(f"a denoise forward has run {running:.0f} s, over its {self.clock.timeout():.0f} s timeout")
        if self.report_loop.done() and not self.report_loop.cancelled():
            raise RuntimeError(f"the report loop stopped: {self.report_loop.exception()!r}")
        loop = self.engine.loop_task
        if loop is not None and loop.done() and not loop.cancelled() and loop.exception() is not None:
            raise RuntimeError(f"the denoise loop stopped: {loop.exception()!r}")
        if self.gang is not None:
            self.gang.check_members()  # a lost rank: Serve replaces the replica, and the gang with it

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What this replica holds, for `serving.autoscaling.StagePolicy` (the keys every stage
        reports, see serving/deployments/stage_load.py, plus the price of one denoise step)."""
        load = self.engine.engine.load()
        # A full batch shares one forward: a request's step costs a max_batch-th of it.
        per_step = self.step_seconds / self.engine.engine.max_batch
        if load["requests"]:
            self.steps_per_job = load["remaining_steps"] / load["requests"]
        running = load["requests"] - load["waiting"]
        return {"backlog_seconds": load["remaining_steps"] * per_step, "waiting": load["waiting"],
                "running": running, "busy": min(1.0, running / self.engine.engine.max_batch),
                "oldest_wait_s": load["oldest_wait_s"],
                "seconds_per_step": per_step, "seconds_per_job": self.steps_per_job * per_step,
                "startup_seconds": startup_seconds()}

    steps_per_job = 0.0  # steps a request here still had to run, last seen (prices queued calls)

    async def denoise(self, job_id: str, spec: dict, embeddings, priority: int = 0, resume: bool = False,
                      image: dict | None = None):
        """`embeddings` holds the prompt's row, then the negative prompt's when guidance is on;
        `image` (image-to-video) the first frame's {"image_embeds", "condition"}.
        Yields {"accepted"} once this replica has the request, {"waiting", "step"} every few
        seconds while it waits for a batch slot, {"started", "step"} when the engine takes the
        job, {"step", "total_steps", "batch_size", "device_seconds"} after each step (its share
        of the forward's time, times the devices of the replica's gang), {"checkpoint_step"}
        after each saved checkpoint, and finally {"latents": tensor, "computed_steps": steps
        that ran the DiT in full}."""
        from serving.engine.scheduler import EngineRequest
        from serving.pipeline.denoise import start_denoise
        from serving.pipeline.spec import VideoSpec

        video = VideoSpec(**spec)
        state = await self._resume(job_id, video) if resume else None
        conditioning = None
        if image is not None:
            from serving.pipeline.image import ImageCondition

            conditioning = ImageCondition(image_embeds=image["image_embeds"], condition=image["condition"])
        if state is None:
            state = start_denoise(video, self.scheduler_config, self.transformer.config.out_channels, self.geometry,
                                  image=conditioning)
        # A new attempt means the earlier one's driver is gone (it lost the job's lease): its
        # request would otherwise denoise on to the end for nobody, holding a batch slot.
        superseded = self.engine.supersede(f"{job_id}/", f"a later attempt of {job_id} started")
        if superseded:
            logger.info("job %s: ended %d earlier attempt(s) still denoising here", job_id, superseded)
        # One engine entry per call: a retried job (its old caller dead, its old request maybe
        # still draining) must never share an id with its earlier attempt.
        request = EngineRequest(id=f"{job_id}/{uuid.uuid4().hex[:8]}", state=state, prompt_embeds=embeddings[:1],
                                negative_embeds=embeddings[1:] if embeddings.shape[0] > 1 else None,
                                priority=priority)
        yield {"accepted": True}  # the replica has it: from here the Director times every silence
        async for event in self.engine.submit(request):
            if event.kind == "waiting":
                yield {"waiting": True, "step": event.step}
            elif event.kind == "started":
                yield {"started": True, "step": event.step}
            elif event.kind == "step":
                yield {"step": event.step, "total_steps": event.total_steps, "batch_size": event.batch_size,
                       "device_seconds": event.device_seconds * self.devices}
            elif event.kind == "checkpoint":
                await asyncio.to_thread(self.artifacts.put, checkpoint_key(job_id), event.checkpoint)
                yield {"checkpoint_step": event.step}
            elif event.kind == "finished":
                self.metrics.accelerator_seconds.observe(event.device_seconds * self.devices, tags={"stage": "denoiser"})
                yield {"latents": event.latents, "computed_steps": event.computed_steps}
            elif event.kind == "failed":
                raise event.error

    async def _resume(self, job_id: str, video):
        """The job's last checkpoint, or None when it cannot be read: starting over costs
        time, failing the job would lose the user's request."""
        from serving.pipeline.denoise import load_state

        try:
            data = await asyncio.to_thread(self.artifacts.read, checkpoint_key(job_id))
            return load_state(data, video)
        except Exception as exc:  # missing or unreadable (e.g. written by an older version)
            logger.warning("job %s: checkpoint unreadable (%s: %s); denoising from step 0",
                           job_id, type(exc).__name__, exc)
            return None

    def ping(self) -> bool:
        return True
