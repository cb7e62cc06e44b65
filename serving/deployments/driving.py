"""How the Director drives one job: TextEncoder -> Denoiser -> VAEDecoder, every state change
written to the job store before it moves on, every stage call under a timeout, and every
fault sorted into "retry later" (the service's: the job is handed back and resumes from its
checkpoint) or "failed" (the request's own). The `Director` deployment inherits this and
supplies the store, the stage handles, the clocks and the bookkeeping named below.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.exceptions import ActorUnavailableError, RayActorError

from serving.deployments.watchdog import STARTED, StageTimeout, decode_units
from serving.jobs.records import PROGRESS_SPAN, JobRecord, JobStatus, Stage
from serving.jobs.retention import expiry, tidy_after_run
from serving.jobs.store import LeaseLost, is_transient
from serving.jobs.usage import AttemptUsage
from serving.measured_cost import step_shape
from serving.storage import ArtifactStoreError

logger = logging.getLogger("ray.serve")

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


class ProgressWrites:
    """When a denoise step's progress is worth a database write. Progress is for people and
    pollers: one write per `every_seconds` (and the last step) shows it as well as one per
    step, and at cluster scale the per-step writes were the Director's own bottleneck (N jobs
    x steps per second, each an UPDATE and a read). Stage changes and checkpoints are always
    written at once; a cancel is seen at the next write."""

    def __init__(self, every_seconds: float):
        self.every = every_seconds
        self.last: float | None = None

    def due(self, step: int, total: int, now: float) -> bool:
        if step >= total or self.last is None or now - self.last >= self.every:
            self.last = now
            return True
        return False


class JobDriving:
    """The per-job half of the Director (mixed into it)."""

    async def _write(self, job_id: str, names: list[str] = (), **changes) -> JobRecord:
        """Write `changes` (and the job's usage so far) under our lease."""
        usage = self.usage.get(job_id)
        if usage is not None:
            changes = {**usage.fields(), **changes}
        try:
            job = await asyncio.to_thread(self.store.stamp, job_id, self.owner, names, **changes)
        except LeaseLost:
            raise
        except Exception as exc:
            if is_transient(exc):  # still failing after the store's own retries
                raise RetryLater("job_store_unavailable") from exc
            raise
        self._observe(job, names)
        if job.status.terminal:
            self.metrics.count_usage(job)
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
        self.usage[job.id] = AttemptUsage(job.used)
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
            self.usage.pop(job.id, None)
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
        encoded = await self._call(Stage.TEXT_ENCODER, self.text_encoder.options(stream=True).encode.remote(
            prompts, spec["max_sequence_length"]))
        embeddings = encoded["embeddings"]
        if encoded["device_seconds"] > 0:  # cached prompts cost nothing and teach nothing
            self._measured(job.id, Stage.TEXT_ENCODER, encoded["device_seconds"],
                           lambda s: self.cost.observe_encode(len(prompts), spec["max_sequence_length"], s))
        image = await self._encode_first_frame(job) if spec.get("image") else None
        self.in_flight.encoded(job.id)
        # From here the job waits in (then runs on) the Denoiser: the stage says where it is.
        job = await self._write(job.id, [f"{Stage.TEXT_ENCODER.value}_finished_at"], stage=Stage.DENOISER,
                                progress=PROGRESS_SPAN[Stage.DENOISER][0])
        self._check_cancel(job)

        latents, computed_steps = await self._denoise(job, embeddings, image)

        job = await self._write(job.id, [f"{Stage.DENOISER.value}_finished_at", f"{Stage.VAE_DECODER.value}_started_at"],
                                stage=Stage.VAE_DECODER, progress=PROGRESS_SPAN[Stage.VAE_DECODER][0],
                                computed_steps=computed_steps)
        self._check_cancel(job)
        units = decode_units(spec["num_frames"], spec["width"], spec["height"])
        result = await self._call(
            Stage.VAE_DECODER, self.vae_decoder.options(stream=True).decode.remote(latents, spec["fps"], units), units)
        self._measured(job.id, Stage.VAE_DECODER, result["device_seconds"],
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

    async def _encode_first_frame(self, job: JobRecord) -> dict:
        """Image-to-video: the job's first frame (stored with it) as CLIP tokens, on a
        TextEncoder replica, and as the VAE's first-frame condition, on a VAEDecoder replica
        (which holds the VAE); both at once. Every attempt encodes again: a few seconds,
        against keeping megabytes of conditioning per queued job."""
        spec = job.spec
        try:
            png = await asyncio.to_thread(self.artifacts.read, spec["image"])
        except ArtifactStoreError as exc:  # the store down, not the frame gone (FileNotFoundError fails the job)
            raise RetryLater("artifact_store_unavailable") from exc
        units = decode_units(spec["num_frames"], spec["width"], spec["height"])
        tokens, condition = await asyncio.gather(
            self._call(Stage.TEXT_ENCODER, self.text_encoder.options(stream=True).encode_image.remote(png)),
            self._call(Stage.VAE_DECODER, self.vae_decoder.options(stream=True).encode_first_frame.remote(
                png, spec, self.geometry, units), units))
        self._measured(job.id, Stage.TEXT_ENCODER, tokens["device_seconds"], lambda s: None)
        self._measured(job.id, Stage.VAE_DECODER, condition["device_seconds"], lambda s: None)
        return {"image_embeds": tokens["image_embeds"], "condition": condition["condition"]}

    async def _denoise(self, job: JobRecord, embeddings, image: dict | None = None):
        """Stream the job through a Denoiser; every silence longer than one step's timeout
        (a hung forward, a stuck engine) ends the attempt. Waiting for a batch slot is not
        silence: a live engine says so every few seconds."""
        spec = job.spec
        clock = self.clocks[Stage.DENOISER]
        latents, computed_steps = None, None
        start, end = PROGRESS_SPAN[Stage.DENOISER]
        resume = job.checkpoint_step > 0  # an earlier attempt saved latents: go on from there
        stream = self.denoiser.options(stream=True).denoise.remote(job.id, spec, embeddings, job.priority, resume, image)
        accepted = False
        last_step_at = None
        shape = step_shape(self.geometry, spec)
        progress_writes = ProgressWrites(self.config.server.progress_write_seconds)
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
                    last_step_at = None  # time spent out of the batch is not a step's
                    continue
                if "started" in event:  # the engine took the job: the end of its queue wait
                    changes = {"resumed_from_step": event["step"]} if resume else {}
                    job = await self._write(job.id, [f"{Stage.DENOISER.value}_started_at"], **changes)
                elif "checkpoint_step" in event:
                    job = await self._write(job.id, checkpoint_step=event["checkpoint_step"])
                elif "latents" in event:
                    latents, computed_steps = event["latents"], event.get("computed_steps")
                else:
                    step, total = event["step"], event["total_steps"]
                    now = time.monotonic()
                    if last_step_at is not None:
                        clock.observe(now - last_step_at)
                    last_step_at = now
                    share = event.get("device_seconds")  # the job's part of the forward, as the engine timed it
                    if share:
                        self._measured(job.id, Stage.DENOISER, share, lambda s: self.cost.observe_step(shape, s))
                    self.in_flight.stepped(job.id, total - step)
                    if progress_writes.due(step, total, now):
                        job = await self._write(job.id, step=step, total_steps=total,
                                                progress=start + (end - start) * step // total)
                self._check_cancel(job)
        finally:
            if latents is None:
                stream.cancel()
        if latents is None:
            raise RuntimeError("the Denoiser finished without returning latents")
        return latents, computed_steps

    def _longest_wait(self, timeout: float) -> float:
        """How long a stage call may wait to be started: the queue budget admission holds every
        job to (a busy stage at peak is within it; none when admission never refuses), or ten
        calls' timeouts if that is longer."""
        return max(self.config.admission.max_queue_wait_seconds or 0.0, 10 * timeout)

    def _measured(self, job_id: str, stage: Stage, seconds: float, observe) -> None:
        """A stage finished `seconds` of device work for a job: teach the cost model, credit the
        capacity, and count it in the job's usage."""
        observe(seconds)
        self.capacity[stage.value].record(seconds)
        usage = self.usage.get(job_id)
        if usage is not None:
            usage.add(stage.value, seconds)

    async def _call(self, stage: Stage, stream, units: float = 1.0):
        """One streamed stage call (`STARTED`, then its result, see watchdog.py); a call whose
        work runs past its timeout is cancelled and the job retried. Before the replica starts
        the work, the call waits in Serve's router and behind the replica's other calls: that is
        load (a busy VAE decoder at peak), bounded by Serve's health checks and by the replica's
        own watchdog on the work ahead of it, and was once mistaken for a hang. A stage that
        never starts it at all (no replica can start) ends the attempt after `_longest_wait`."""
        clock = self.clocks[stage]
        timeout = clock.timeout(units)
        longest_wait = self._longest_wait(timeout)
        result = None
        try:
            try:
                first = await asyncio.wait_for(anext(stream), longest_wait)
            except asyncio.TimeoutError:
                raise RetryLater("stage_timeout") from StageTimeout(stage.value, longest_wait)
            if first != STARTED:
                raise RuntimeError(f"{stage.value} answered {sorted(first)} before starting the work")
            started = time.monotonic()
            try:
                result = await asyncio.wait_for(anext(stream), timeout)
            except asyncio.TimeoutError:
                raise RetryLater("stage_timeout") from StageTimeout(stage.value, timeout)
        finally:
            if result is None:
                stream.cancel()
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
        usage = self.usage.get(job.id)
        spent = usage.fields() if usage is not None else {}  # a lost attempt's work was still used
        try:
            await asyncio.to_thread(self.store.update, job.id, self.owner, lease_owner=None, lease_expires_at=None,
                                    **spent)
        except LeaseLost:
            return
        except Exception:  # the database is down: the lease runs out, and the job is claimed again
            logger.exception("handing job %s back failed; its lease will run out", job.id)
            return
        self.wakeup.set()
