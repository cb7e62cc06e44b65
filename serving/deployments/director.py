"""Director deployment: drives every job through TextEncoder -> Denoiser -> VAEDecoder.

It takes jobs from the job store under a lease (renewed while it works), drives each one
(`serving/deployments/driving.py`: state changes written before it moves on, timeouts,
retries), and runs the service's background loops: claiming, heartbeats, webhooks, the
storage sweep, and publishing the backlog the stage autoscalers read.
If a Director dies, its leases run out and any Director takes the jobs over; a write from
a Director that lost its lease is refused, so no job is finished twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

from ray import serve

from serving.admission import Capacity, WaitEstimate, WorkInFlight, cost_uncosted_jobs, stage_dict
from serving.backlog import PUBLISH_SECONDS as PENDING_PUBLISH_SECONDS
from serving.backlog import PendingWork
from serving.backlog import publish as publish_pending_work
from serving.config import ServiceConfig, StageConfig
from serving.cost_model import STAGE_NAMES
from serving.deployments.driving import JobDriving
from serving.deployments.readiness import Readiness
from serving.deployments.watchdog import PRIOR_DECODE_SECONDS_PER_MEGAPIXEL_FRAME, PRIOR_ENCODE_SECONDS, StageClock
from serving.jobs.records import Stage
from serving.jobs.retention import StorageSweeper
from serving.jobs.store import JobStore, LeaseLost
from serving.jobs.usage import AttemptUsage
from serving.measured_cost import MeasuredCost, base_cost_model
from serving.metrics import JOB_STATES, metrics
from serving.models.presets import PRESETS
from serving.storage import ArtifactStore
from serving.webhooks import WebhookSender

logger = logging.getLogger("ray.serve")

RETENTION_SWEEP_SECONDS = 60.0
JOB_GAUGE_SECONDS = 2.0
WEBHOOK_POLL_SECONDS = 0.5
WEBHOOK_EVENTS_KEPT_SECONDS = 7 * 24 * 3600.0  # settled events stay this long, for inspection


@serve.deployment(name="Director")
class Director(JobDriving):
    async def __init__(self, config: ServiceConfig, text_encoder, denoiser, vae_decoder):
        self.config = config
        self.text_encoder, self.denoiser, self.vae_decoder = text_encoder, denoiser, vae_decoder
        self.store = JobStore(config.storage.job_store_url)
        self.artifacts = ArtifactStore(config.storage.artifacts_url, config.storage.artifacts_options)
        self.sweeper = StorageSweeper(self.store, self.artifacts, config.storage.retention_hours)
        self.owner = f"director-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease = config.server.lease_seconds
        self.metrics = metrics()
        self.running: dict[str, asyncio.Task] = {}
        # The wait estimate's side here (serving/admission.py): device seconds per job shape as
        # measured, the work the running jobs still need, and what each stage completes per second.
        preset = PRESETS[config.model.preset]
        prior = preset.typical_step_seconds
        self.geometry = preset.geometry
        self.cost = MeasuredCost(base_cost_model(preset, config.simulation, config.stages.denoiser.parallel))
        self.in_flight = WorkInFlight(self.cost, self.geometry)
        stages = config.stages
        self.capacity = {name: Capacity(floor=_replicas_at_least(getattr(stages, name))) for name in STAGE_NAMES}
        self.clocks = {  # how long each stage's calls take here, and so when one counts as hung
            Stage.TEXT_ENCODER: StageClock("text_encoder", stages.text_encoder.timeout_seconds, PRIOR_ENCODE_SECONDS),
            Stage.DENOISER: StageClock("denoiser", stages.denoiser.timeout_seconds, prior * config.engine.max_batch),
            Stage.VAE_DECODER: StageClock("vae_decoder", stages.vae_decoder.timeout_seconds,
                                          PRIOR_DECODE_SECONDS_PER_MEGAPIXEL_FRAME),
        }
        self.retry_reasons: dict[str, str] = {}  # job id -> why its last attempt here was handed back
        self.usage: dict[str, AttemptUsage] = {}  # job id -> what its running attempt has used so far
        self.readiness = Readiness(serve.get_replica_context().app_name, {
            "text_encoder": text_encoder, "denoiser": denoiser, "vae_decoder": vae_decoder}, self.metrics)
        self.wakeup = asyncio.Event()
        self.claim_loop = asyncio.create_task(self._claim_forever())
        self.heartbeat_loop = asyncio.create_task(self._heartbeat_forever())
        self.webhooks = WebhookSender(self.store, config.webhooks, config.auth,
                                      on_attempt=lambda outcome: self.metrics.webhook_attempts.inc(
                                          tags={"outcome": outcome}))
        self.webhook_loop = asyncio.create_task(self._deliver_webhooks_forever())
        self.backlog_loop = asyncio.create_task(self._publish_pending_work_forever())

    # ---- called by the Gateway ----------------------------------------------------

    async def wake(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self.wakeup.set()

    async def note_denoiser(self, replica: str, report: dict) -> None:
        """A Denoiser replica says what it runs (its attention backend), every
        `DENOISER_REPORT_SECONDS` (serving/deployments/readiness.py)."""
        self.readiness.note_denoiser(replica, report)

    async def forget_denoiser(self, replica: str) -> None:
        """A Denoiser replica stops (Serve called its `__del__`)."""
        self.readiness.forget_denoiser(replica)

    async def ready(self) -> dict:
        """Whether every stage can take work, and what each live Denoiser replica runs (the
        Gateway's /readyz)."""
        return await self.readiness.ready()

    async def estimate(self) -> dict:
        """The live wait estimate (see serving/admission.py) for the Gateway."""
        queued = await asyncio.to_thread(self.store.queued_seconds)  # one SQL sum, however long the queue
        return WaitEstimate(capacity={name: c.rate() for name, c in self.capacity.items()},
                            running=stage_dict(self.in_flight.seconds_left()), queued=stage_dict(queued),
                            calibration=self.cost.calibration.to_dict()).to_dict()

    def check_health(self) -> None:
        # Serve restarts a replica whose loops died; leases make the restart safe.
        for loop in (self.claim_loop, self.heartbeat_loop, self.webhook_loop, self.backlog_loop):
            if loop.done():
                raise RuntimeError(f"director loop stopped: {loop.exception() if not loop.cancelled() else 'cancelled'}")

    # ---- the loops --------------------------------------------------------------------

    async def _claim_forever(self) -> None:
        next_sweep = next_gauge = 0.0
        try:
            await asyncio.to_thread(cost_uncosted_jobs, self.store, self.cost, self.geometry)
        except Exception:
            logger.exception("costing jobs queued before costs were stored failed; estimates count them as 0")
        while True:
            if time.monotonic() >= next_gauge:
                next_gauge = time.monotonic() + JOB_GAUGE_SECONDS
                try:
                    counts = await asyncio.to_thread(self.store.count_by_status)
                    for state in JOB_STATES:
                        self.metrics.jobs.set(counts.get(state, 0), tags={"state": state})
                except Exception:
                    logger.exception("counting jobs failed")
            if time.monotonic() >= next_sweep:  # retention, deleted jobs' files, orphans: always
                next_sweep = time.monotonic() + RETENTION_SWEEP_SECONDS
                try:
                    await asyncio.to_thread(self.sweeper.run)
                except Exception:
                    logger.exception("storage sweep failed; retrying later")
            try:
                free = self.config.server.max_running_jobs - len(self.running)
                if free > 0:
                    for job in await asyncio.to_thread(self.store.claim, self.owner, self.lease, free):
                        if job.id in self.running:
                            continue  # our own lease lapsed (a starved heartbeat): it is still being driven
                        task = asyncio.create_task(self._drive(job))
                        self.running[job.id] = task
                        task.add_done_callback(lambda _t, job_id=job.id: self.running.pop(job_id, None))
            except Exception:
                logger.exception("claiming jobs failed; retrying")
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=self.config.server.director_poll_seconds)
            except asyncio.TimeoutError:
                pass
            self.wakeup.clear()

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            for job_id, task in list(self.running.items()):
                try:
                    await asyncio.to_thread(self.store.renew, job_id, self.owner, self.lease)
                except LeaseLost:
                    logger.warning("lost the lease on %s (deleted or taken over); stopping it", job_id)
                    task.cancel()
                except Exception:
                    logger.exception("renewing the lease on %s failed", job_id)

    async def _deliver_webhooks_forever(self) -> None:
        next_prune = 0.0
        while True:
            try:
                await self.webhooks.send_due()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + RETENTION_SWEEP_SECONDS
                    await asyncio.to_thread(self.store.prune_webhook_events, time.time() - WEBHOOK_EVENTS_KEPT_SECONDS)
            except Exception:
                logger.exception("delivering webhooks failed; retrying")
            await asyncio.sleep(WEBHOOK_POLL_SECONDS)

    async def _publish_pending_work_forever(self) -> None:
        """The work on its way to each stage, for the stages' autoscalers (serving/backlog.py):
        with it no job waiting beyond `server.max_running_jobs` is hidden from them."""
        app_name = serve.get_replica_context().app_name
        while True:
            try:
                pending = await asyncio.to_thread(PendingWork.from_store, self.store)
                await asyncio.to_thread(publish_pending_work, app_name, pending)
            except Exception as exc:  # e.g. the database is down: its own alerts say so
                logger.warning("publishing the pending work failed (%r); the autoscalers see only their stages", exc)
            await asyncio.sleep(PENDING_PUBLISH_SECONDS)

def _replicas_at_least(stage: StageConfig) -> float:
    """Replicas a stage always has (at least one: a stage scaled to zero starts one for work)."""
    return float(max(1, stage.autoscaling.min_replicas if stage.autoscaling is not None else stage.num_replicas))
