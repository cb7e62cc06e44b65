"""Director deployment: drives every job through TextEncoder -> Denoiser -> VAEDecoder.

It takes jobs from the job store under a lease (renewed while it works), writes each state
change to the store before moving on, and stores the finished MP4 in the artifact store.
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
from ray.exceptions import ActorUnavailableError, RayActorError

from serving.admission import Capacity, WaitEstimate, WorkInFlight, cost_uncosted_jobs, stage_dict
from serving.backlog import PUBLISH_SECONDS as PENDING_PUBLISH_SECONDS
from serving.backlog import PendingWork
from serving.backlog import publish as publish_pending_work
from serving.config import ServiceConfig, StageConfig
from serving.cost_model import STAGE_NAMES
from serving.deployments.watchdog import (PRIOR_DECODE_SECONDS_PER_MEGAPIXEL_FRAME, PRIOR_ENCODE_SECONDS, StageClock,
                                          StageTimeout, decode_units)
from serving.jobs.records import PROGRESS_SPAN, JobRecord, JobStatus, Stage
from serving.jobs.retention import StorageSweeper, expiry, tidy_after_run
from serving.jobs.store import JobStore, LeaseLost, is_transient
from serving.measured_cost import MeasuredCost, base_cost_model, step_shape
from serving.metrics import JOB_STATES, metrics
from serving.models.presets import PRESETS
from serving.storage import ArtifactStore, ArtifactStoreError
from serving.webhooks import WebhookSender

logger = logging.getLogger("ray.serve")

RETENTION_SWEEP_SECONDS = 60.0
JOB_GAUGE_SECONDS = 2.0
WEBHOOK_POLL_SECONDS = 0.5
WEBHOOK_EVENTS_KEPT_SECONDS = 7 * 24 * 3600.0  # settled events stay this long, for inspection


# A storage write that fails is tried again after these waits before the attempt is given up.
ARTIFACT_RETRY_WAITS = (0.25, 0.5, 1.0, 2.0)

# What a client is told when an attempt ends for a reason of the service, not of the request.
# Details (hosts, paths, tracebacks) go to the log only, keyed by the job id.
RETRY_REASONS = {
    "artifact_store_unavailable": "the video store could not be written",
    "job_store_unavailable": "the job database could not be reached",
    "stage_timeout": "a model stage stopped answering",
    "stage_replica_lost": "the replica running it was lost",
}


class JobCancelled(Exception):
    pass


class RetryLater(Exception):
    """This attempt cannot go on for a reason of the service, not of the request: hand the job
    back so that a later attempt resumes it from its checkpoint."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@serve.deployment(name="Director")
class Director:
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
        self.cost = MeasuredCost(base_cost_model(preset))
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

    async def ready(self) -> dict[str, bool]:
        """Whether every stage answers (the Gateway's /readyz)."""
        names = {"text_encoder": self.text_encoder, "denoiser": self.denoiser, "vae_decoder": self.vae_decoder}

        async def ping(handle) -> bool:
            try:
                return bool(await asyncio.wait_for(handle.ping.remote(), timeout=5))
            except Exception:
                return False

        results = await asyncio.gather(*(ping(h) for h in names.values()))
        return dict(zip(names, results))

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

    # ---- one job ------------------------------------------------------------------------

    async def _write(self, job_id: str, names: list[str] = (), **changes) -> JobRecord:
        try:
            job = await asyncio.to_thread(self.store.stamp, job_id, self.owner, names, **changes)
        except LeaseLost:
            raise
        except Exception as exc:
            if is_transient(exc):  # still failing after the store's own retries
                raise RetryLater("job_store_unavailable") from exc
            raise
        self._observe(job, names)
        return job

    def _observe(self, job: JobRecord, names) -> None:
        """Queue wait when a stage starts (submitted -> stage start); latency when a job ends."""
        submitted = job.timestamps.get("submitted_at")
        if submitted is None:
            return
        for name in names:
            stage = name.removesuffix("_started_at")
            if stage != name and stage in {s.value for s in Stage}:
                self.metrics.queue_wait.observe(job.timestamps[name] - submitted, tags={"stage": stage})
            status = name.removesuffix("_at")
            if status in (JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value):
                self.metrics.job_latency.observe(job.timestamps[name] - submitted, tags={"status": status})

    async def _drive(self, job: JobRecord) -> None:
        self.in_flight.start(job.id, job.spec, max(job.num_steps - job.checkpoint_step, 0))
        try:
            if job.attempts > self.config.server.max_job_attempts:
                await self._give_up(job)
                return
            await self._run_stages(job)
            self.retry_reasons.pop(job.id, None)
        except LeaseLost:
            logger.info("job %s is no longer ours; leaving it", job.id)
        except JobCancelled:
            await self._end(job, JobStatus.CANCELLED, "cancelled", "cancelled at the client's request")
        except RetryLater as exc:
            logger.warning("job %s: attempt %d handed back (%s): %r", job.id, job.attempts, exc.reason, exc.__cause__)
            await self._retry_later(job, exc.reason)
        except (RayActorError, ActorUnavailableError) as exc:
            # A stage replica died under us: hand the job back for another try, on a live replica.
            logger.warning("job %s lost a stage replica (%s); requeueing", job.id, type(exc).__name__)
            await self._retry_later(job, "stage_replica_lost")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_transient(exc):
                logger.warning("job %s: database unavailable (%r); handing it back", job.id, exc)
                await self._retry_later(job, "job_store_unavailable")
                return
            # An error of the request itself (it would fail again): the client gets the kind of
            # error and the job id to quote; the log has the traceback.
            logger.exception("job %s failed", job.id)
            await self._end(job, JobStatus.FAILED, "generation_failed",
                            f"generating the video failed ({type(exc).__name__}); the server log has the details "
                            f"under {job.id}")
        finally:
            self.in_flight.finish(job.id)
            await self._tidy(job.id)

    async def _tidy(self, job_id: str) -> None:
        """Files the job no longer needs (see `tidy_after_run`); the storage sweep catches a miss."""
        try:
            await asyncio.to_thread(tidy_after_run, self.store, self.artifacts, job_id)
        except Exception:
            logger.exception("tidying the files of %s failed; the storage sweep retries", job_id)

    async def _run_stages(self, job: JobRecord) -> None:
        spec = job.spec
        with_negative = spec["guidance_scale"] > 1.0
        job = await self._write(job.id, [f"{Stage.TEXT_ENCODER.value}_started_at"], status=JobStatus.IN_PROGRESS,
                                stage=Stage.TEXT_ENCODER, progress=PROGRESS_SPAN[Stage.TEXT_ENCODER][0], step=0)
        self._check_cancel(job)
        prompts = [spec["prompt"], spec["negative_prompt"]] if with_negative else [spec["prompt"]]
        started = time.monotonic()
        embeddings = await self._call(Stage.TEXT_ENCODER, self.text_encoder.encode.remote(
            prompts, spec["max_sequence_length"]))
        self._measured(Stage.TEXT_ENCODER, time.monotonic() - started,
                       lambda s: self.cost.observe_encode(len(prompts), spec["max_sequence_length"], s))
        self.in_flight.encoded(job.id)
        # From here the job waits in (then runs on) the Denoiser: the stage says where it is.
        job = await self._write(job.id, [f"{Stage.TEXT_ENCODER.value}_finished_at"], stage=Stage.DENOISER,
                                progress=PROGRESS_SPAN[Stage.DENOISER][0])
        self._check_cancel(job)

        latents = await self._denoise(job, embeddings)

        job = await self._write(job.id, [f"{Stage.DENOISER.value}_finished_at", f"{Stage.VAE_DECODER.value}_started_at"],
                                stage=Stage.VAE_DECODER, progress=PROGRESS_SPAN[Stage.VAE_DECODER][0])
        self._check_cancel(job)
        units = decode_units(spec["num_frames"], spec["width"], spec["height"])
        started = time.monotonic()
        result = await self._call(Stage.VAE_DECODER, self.vae_decoder.decode.remote(latents, spec["fps"], units),
                                  units)
        self._measured(Stage.VAE_DECODER, time.monotonic() - started,
                       lambda s: self.cost.observe_decode(spec["num_frames"], spec["width"], spec["height"], s))
        self.in_flight.decoded(job.id)

        video_key, thumbnail_key = f"{job.id}/video.mp4", f"{job.id}/thumbnail.webp"
        await self._put(video_key, result["mp4"])
        await self._put(thumbnail_key, result["thumbnail"])
        now = time.time()
        await self._write(job.id, [f"{Stage.VAE_DECODER.value}_finished_at", "completed_at"],
                          status=JobStatus.COMPLETED, stage=None, progress=100, completed_at=now,
                          video_key=video_key, thumbnail_key=thumbnail_key,
                          expires_at=expiry(self.config.storage.retention_hours, now), lease_owner=None)

    async def _denoise(self, job: JobRecord, embeddings):
        """Stream the job through a Denoiser; every silence longer than one step's timeout
        (a hung forward, a stuck engine) ends the attempt. Waiting for a batch slot is not
        silence: a live engine says so every few seconds."""
        spec = job.spec
        clock = self.clocks[Stage.DENOISER]
        latents = None
        start, end = PROGRESS_SPAN[Stage.DENOISER]
        resume = job.checkpoint_step > 0  # an earlier attempt saved latents: go on from there
        stream = self.denoiser.options(stream=True).denoise.remote(job.id, spec, embeddings, job.priority, resume)
        accepted = False
        last_step_at = None
        shape = step_shape(self.geometry, spec)
        try:
            while True:
                # Before a replica takes the call it waits in Serve's router, bounded by Serve's
                # own health checks; after, every gap is one step (or one "still waiting").
                try:
                    event = await (asyncio.wait_for(anext(stream), clock.timeout()) if accepted else anext(stream))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise RetryLater("stage_timeout") from StageTimeout("denoiser", clock.timeout())
                accepted = True
                if "accepted" in event or "waiting" in event:
                    continue
                if "started" in event:  # the engine took the job: the end of its queue wait
                    changes = {"resumed_from_step": event["step"]} if resume else {}
                    job = await self._write(job.id, [f"{Stage.DENOISER.value}_started_at"], **changes)
                elif "checkpoint_step" in event:
                    job = await self._write(job.id, checkpoint_step=event["checkpoint_step"])
                elif "latents" in event:
                    latents = event["latents"]
                else:
                    step, total = event["step"], event["total_steps"]
                    now = time.monotonic()
                    if last_step_at is not None:
                        clock.observe(now - last_step_at)
                    last_step_at = now
                    share = event.get("device_seconds")  # the job's part of the forward, as the engine timed it
                    if share:
                        self._measured(Stage.DENOISER, share, lambda s: self.cost.observe_step(shape, s))
                    self.in_flight.stepped(job.id, total - step)
                    job = await self._write(job.id, step=step, total_steps=total,
                                            progress=start + (end - start) * step // total)
                self._check_cancel(job)
        finally:
            if latents is None:
                stream.cancel()
        if latents is None:
            raise RuntimeError("the Denoiser finished without returning latents")
        return latents

    def _measured(self, stage: Stage, seconds: float, observe) -> None:
        """A stage finished `seconds` of device work: teach the cost model, credit the capacity."""
        observe(seconds)
        self.capacity[stage.value].record(seconds)

    async def _call(self, stage: Stage, response, units: float = 1.0):
        """Await one stage call within its timeout; a call past it is cancelled and the job retried."""
        clock = self.clocks[stage]
        timeout = clock.timeout(units)
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(response, timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise RetryLater("stage_timeout") from StageTimeout(stage.value, timeout)
        clock.observe(time.monotonic() - started, units)
        return result

    async def _put(self, key: str, data: bytes) -> None:
        """Write an artifact, riding out a short storage blip; a longer outage ends the attempt
        (the job resumes later) instead of throwing its GPU work away."""
        for wait in (*ARTIFACT_RETRY_WAITS, None):
            try:
                await asyncio.to_thread(self.artifacts.put, key, data)
                return
            except ArtifactStoreError as exc:
                if wait is None:
                    raise RetryLater("artifact_store_unavailable") from exc
                logger.warning("writing %s failed (%s); retrying in %.2f s", key, exc, wait)
                await asyncio.sleep(wait)

    @staticmethod
    def _check_cancel(job: JobRecord) -> None:
        if job.cancel_requested:
            raise JobCancelled(job.id)

    async def _give_up(self, job: JobRecord) -> None:
        attempts = job.attempts - 1
        reason = RETRY_REASONS.get(self.retry_reasons.pop(job.id, ""), "it did not finish")
        await self._end(job, JobStatus.FAILED, "too_many_attempts",
                        f"the job was started {attempts} times and never finished; the last attempt ended because "
                        f"{reason}. It is retryable: submit the request again")

    async def _end(self, job: JobRecord, status: JobStatus, code: str, message: str) -> None:
        try:
            await self._write(job.id, [f"{status.value}_at"], status=status, stage=None,
                              error_code=code, error_message=message, lease_owner=None,
                              expires_at=expiry(self.config.storage.retention_hours, time.time()))
        except (LeaseLost, RetryLater):
            pass  # taken over, ended already, or the database is down: its next driver ends it

    async def _retry_later(self, job: JobRecord, reason: str) -> None:
        """Give the job back for another attempt (which resumes from its checkpoint)."""
        self.retry_reasons[job.id] = reason
        try:
            await asyncio.to_thread(self.store.update, job.id, self.owner, lease_owner=None, lease_expires_at=None)
        except LeaseLost:
            return
        except Exception:  # the database is down: the lease runs out, and the job is claimed again
            logger.exception("handing job %s back failed; its lease will run out", job.id)
            return
        self.wakeup.set()


def _replicas_at_least(stage: StageConfig) -> float:
    """Replicas a stage always has (at least one: a stage scaled to zero starts one for work)."""
    return float(max(1, stage.autoscaling.min_replicas if stage.autoscaling is not None else stage.num_replicas))
