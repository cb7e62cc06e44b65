"""`VideoJobs`: what the API does with videos, without HTTP.

Validates a request into a `VideoSpec`, records the job (idempotently), and answers reads, lists, cancels, deletes and downloads from the job and artifact stores.
The Gateway's routes are thin wrappers over these methods.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

from serving.admission import QueueFull, WaitEstimate
from serving.config import ServiceConfig
from serving.cost_model import StageSeconds, spec_seconds
from serving.jobs.records import JobRecord, JobStatus, is_job_id, new_job_id
from serving.jobs.retention import remove_files, tidy_after_run
from serving.jobs.store import IdempotencyConflict, JobStore, cost_fields
from serving.measured_cost import Calibration, MeasuredCost, base_cost_model
from serving.jobs.reference import FIELD, ReferenceImage, read_reference, reference_bytes
from serving.models.presets import PRESETS, image_presets
from serving.pipeline.spec import SpecError, build_spec
from serving.policy import ContentPolicy, PolicyViolation
from serving.storage import ArtifactStore, ArtifactStoreError
from serving.webhooks import WebhookURLError, check_webhook_url, signing_secret

logger = logging.getLogger(__name__)

# A BCP 47 language tag, as clients send it ("en", "zh-Hans", "pt-BR"); recorded, not acted on.
LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8}){0,4}")
MAX_LANGUAGE_CHARS = 35  # BCP 47's practical limit, and the column's width

# Request fields that pass straight through to `build_spec`.
REFERENCE_NAME = "input_reference.png"  # a job's first frame, under its artifact prefix
SPEC_FIELDS = ("size", "seconds", "fps", "num_inference_steps", "guidance_scale", "negative_prompt", "seed", "cache")


class NotReady(Exception):
    """The video is not completed, so it has no content yet."""


class QuotaExceeded(Exception):
    """The API key already has its maximum of queued and running videos."""

    def __init__(self, active: int, limit: int):
        super().__init__(f"this API key has {active} videos queued or running; its limit is {limit}")
        self.active, self.limit = active, limit


class PriorityNotAllowed(Exception):
    """The request asks for a priority above what its API key may use (an operator's grant)."""

    def __init__(self, priority: int, limit: int):
        super().__init__(f"this API key may use priorities up to {limit}, found {priority}; a higher priority is "
                         "granted by the operator (auth.keys[].max_priority)")
        self.priority, self.limit = priority, limit


class VideoJobs:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.preset = PRESETS[config.model.preset]
        self.model_name = config.server.model_name or config.model.preset
        self.store = JobStore(config.storage.job_store_url)
        self.artifacts = ArtifactStore(config.storage.artifacts_url, config.storage.artifacts_options)
        self.policy = ContentPolicy(config.content_policy)
        self.base_cost = base_cost_model(self.preset, config.simulation, config.stages.denoiser.parallel)

    def submit(self, request: dict[str, Any], idempotency_key: str | None = None, owner: str | None = None,
               max_active: int | None = None, max_priority: int | None = None,
               estimate: WaitEstimate | None = None, image_source: str | None = None) -> tuple[JobRecord, bool]:
        """Validate, cost and queue for `owner` (an API key's name; None with auth off); returns
        (job, created). `max_active` and `max_priority` are the key's limits (None: none).
        `estimate` is the Director's latest (None: unknown): its calibration costs the job, and
        with `admission.max_queue_wait_seconds` set, its queue budget admits it or not.
        `image_source`: the URL the API fetched the first frame from (the request as sent names
        it, so a retry is recognised by it without fetching again: see `earlier_job`).
        Raises SpecError, PolicyViolation, IdempotencyConflict, QuotaExceeded, PriorityNotAllowed
        or QueueFull."""
        model = request.get("model")
        if model not in (None, "", self.model_name, self.config.model.preset):
            raise SpecError("model", f"{model!r} is not served here; this server serves {self.model_name!r}")
        seconds = request.get("seconds")
        if isinstance(seconds, str):
            try:
                seconds = float(seconds)
            except ValueError:
                raise SpecError("seconds", f"expected a number of seconds such as \"4\", found {seconds!r}") from None
        priority = request.get("priority")
        if priority is None:
            priority = 0
        if not isinstance(priority, int) or isinstance(priority, bool) or not -100 <= priority <= 100:
            raise SpecError("priority", f"must be a whole number from -100 to 100, found {priority!r}")
        if max_priority is not None and priority > max_priority:
            raise PriorityNotAllowed(priority, max_priority)
        fields = {name: request.get(name) for name in SPEC_FIELDS} | {"seconds": seconds} | peer_spellings(request)
        job_id = new_job_id()
        image = self._first_frame(request.get("input_reference"))
        if image is not None:
            fields["image"] = f"{job_id}/{REFERENCE_NAME}"
        spec = build_spec(self.preset, self.config.generation, request.get("prompt", ""), **fields)
        webhook_url = request.get("webhook_url")
        if webhook_url is not None:
            try:
                secret = signing_secret(owner, self.config.webhooks, self.config.auth)
                webhook_url = check_webhook_url(webhook_url, self.config.webhooks, secret)
            except WebhookURLError as exc:
                raise SpecError("webhook_url", str(exc)) from None
        language = request.get("language")
        if language is not None and (not isinstance(language, str) or len(language) > MAX_LANGUAGE_CHARS
                                     or not LANGUAGE_TAG.fullmatch(language)):
            raise SpecError("language", f"expected a language tag such as \"en\" or \"pt-BR\", found {language!r}")
        violation = self.policy.check(spec.prompt, "prompt")
        if violation is not None:
            raise PolicyViolation(violation)
        if idempotency_key is not None:
            idempotency_key = stored_idempotency_key(owner, idempotency_key)
        replay = idempotency_key is not None and self.store.get_by_idempotency_key(idempotency_key) is not None
        if max_active is not None and owner is not None:
            active = self.store.count_active(owner)
            if not replay and active >= max_active:
                raise QuotaExceeded(active, max_active)
        cost = self.cost(spec.to_dict(), estimate)
        limit = self.config.admission.max_queue_wait_seconds
        if estimate is not None and limit is not None and not replay:  # a replay was admitted before
            verdict = estimate.admit(cost, self.store.queued_seconds(min_priority=priority), limit)
            if not verdict.admitted:
                raise QueueFull(verdict, limit)
        if image is not None and not replay:  # stored before the row: a claimed job always finds its frame
            self.artifacts.put(spec.image, image.png)
        # A replay with the same key must bring the same frame: the request's hash covers its
        # pixels, or the URL it named.
        hashable = _hashable(request, image_source or (hashlib.sha256(image.png).hexdigest() if image else None))
        now = time.time()
        record = JobRecord(
            id=job_id, created_at=now, status=JobStatus.QUEUED, model=self.model_name, spec=spec.to_dict(),
            timestamps={"submitted_at": now}, idempotency_key=idempotency_key, priority=priority,
            num_steps=spec.num_inference_steps, owner=owner, webhook_url=webhook_url, language=language,
            request_hash=_request_hash(hashable) if idempotency_key else None, **cost_fields(cost),
        )
        return self.store.create(record)

    def earlier_job(self, request: dict[str, Any], image_url: str, idempotency_key: str,
                    owner: str | None = None) -> JobRecord | None:
        """The job an earlier request with this Idempotency-Key made, if `request` (its first
        frame the remote `image_url`, not fetched) is the same request; None for a new key.
        Raises IdempotencyConflict for another request. A retry is answered without fetching
        the frame again: a presigned URL may have expired since, and the job has its frame."""
        earlier = self.store.get_by_idempotency_key(stored_idempotency_key(owner, idempotency_key))
        if earlier is None:
            return None
        if earlier.request_hash != _request_hash(_hashable(request, image_url)):
            raise IdempotencyConflict(idempotency_key)
        return earlier

    def _first_frame(self, value) -> ReferenceImage | None:
        """The request's first frame, checked (SpecError naming input_reference): required by an
        image-to-video preset, refused by a text-to-video one with the presets that take it."""
        if not self.preset.takes_image:
            if value is not None:
                takers = ", ".join(image_presets())
                raise SpecError(FIELD, f"model {self.model_name!r} makes video from text only; a first frame needs "
                                       f"a server running an image-to-video preset ({takers})")
            return None
        if value is None:
            raise SpecError(FIELD, f"model {self.model_name!r} makes video from a first frame: send it as "
                                   "input_reference (an image file, or {\"image_url\": \"data:image/png;base64,...\"})")
        server = self.config.server
        return read_reference(reference_bytes(value, server.max_image_bytes), server.max_image_pixels)

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The job, if it exists and `owner` may see it (another tenant's job is None, as if
        it did not exist, so ids leak nothing)."""
        if not is_job_id(job_id):
            return None
        job = self.store.get(job_id)
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job

    def list(self, after: str | None, limit: int, order: str, owner: str | None = None) -> tuple[list[JobRecord], bool]:
        return self.store.list(after=after, limit=limit, order=order, owner=owner)

    def is_cursor(self, job_id: str, owner: str | None = None) -> bool:
        """Whether a list page may start after `job_id`: a video `owner` may see, or one
        deleted recently (its place in the list is kept for a day; see retention.py)."""
        return is_job_id(job_id) and self.store.is_cursor(job_id, owner)

    def cancel(self, job_id: str, owner: str | None = None) -> tuple[JobRecord, bool] | None:
        """(the job, whether this cancel ended it: a queued job; a running one is flagged and
        ended by its driver); None for an unknown job."""
        if self.get(job_id, owner) is None:
            return None
        found = self.store.cancel(job_id)
        if found is None:  # deleted meanwhile
            return None
        job, ended_here = found
        if ended_here:  # no driver will tidy a job that never ran: its working files (an I2V frame) go now
            try:
                tidy_after_run(self.store, self.artifacts, job_id)
            except ArtifactStoreError as exc:  # the storage sweep removes them later
                logger.warning("cancelled job %s: its working files stay until the storage sweep (%s)", job_id, exc)
        return job, ended_here

    def delete(self, job_id: str, owner: str | None = None) -> tuple[JobRecord, bool] | None:
        """Delete the job and its files; a running job stops (its driver loses the lease).
        None: no such job. Else (the job as it was, whether its files are gone): False means
        gone from the API at once, but some files could not be removed yet; the Director's
        storage sweep retries until they are."""
        if self.get(job_id, owner) is None:
            return None
        job = self.store.tombstone(job_id)
        if job is None:  # deleted by a racing request
            return None
        return job, remove_files(self.store, self.artifacts, job_id)

    def content_key(self, job_id: str, variant: str, owner: str | None = None) -> tuple[str, str, JobRecord] | None:
        """(artifact key, media type, the job) of a completed video's variant; None for an unknown job."""
        job = self.get(job_id, owner)
        if job is None:
            return None
        if job.status != JobStatus.COMPLETED:
            raise NotReady(f"video {job_id} is {_status_words(job)}; content exists once it is completed")
        if variant == "thumbnail":
            return job.thumbnail_key, "image/webp", job
        return job.video_key, "video/mp4", job

    def cost(self, spec: dict, estimate: WaitEstimate | None = None) -> StageSeconds:
        """A job's device seconds per stage: the preset's prior corrected by what the Director
        measured (its calibration travels with the estimate), as the Director itself counts."""
        calibration = Calibration.from_dict(estimate.calibration if estimate is not None else None)
        return spec_seconds(MeasuredCost(self.base_cost, calibration), self.preset.geometry, spec)

    def queue_ahead(self, job: JobRecord) -> tuple[int, StageSeconds] | None:
        """(1-based place in the queue, device seconds per stage queued ahead) of a queued job."""
        if job.status != JobStatus.QUEUED:
            return None
        return self.store.queue_ahead(job.id)

    def ping(self) -> None:
        self.store.ping()
        self.artifacts.ping()


def peer_spellings(request: dict[str, Any]) -> dict[str, Any]:
    """`width` + `height` and `num_frames`, as vLLM-Omni's and TensorRT-LLM's clients send
    them, as `build_spec`'s size and length (each refused beside our own spelling)."""
    found: dict[str, Any] = {}
    width, height = request.get("width"), request.get("height")
    if width is not None or height is not None:
        if width is None or height is None:
            raise SpecError("height" if height is None else "width", "give width and height together")
        if request.get("size") is not None:
            raise SpecError("size", "give size or width and height, not both")
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SpecError(name, f"expected a positive whole number of pixels, found {value!r}")
        found["size"] = f"{width}x{height}"
    if request.get("num_frames") is not None:
        if request.get("seconds") is not None:
            raise SpecError("num_frames", "give seconds or num_frames, not both")
        found["num_frames"] = request["num_frames"]
    return found


def stored_idempotency_key(owner: str | None, key: str) -> str:
    """What the job row keeps for a client's Idempotency-Key: a digest of (owner, key), so one
    tenant's keys never meet another's and any key fits the column on every database."""
    return hashlib.sha256(json.dumps([owner, key]).encode()).hexdigest()


def _hashable(request: dict[str, Any], frame: str | None) -> dict[str, Any]:
    """The request as its idempotency hash sees it: the first frame by `frame` (its pixels'
    digest, or the URL it was fetched from), not its bytes."""
    return {**request, FIELD: frame}


def _request_hash(request: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in sorted(request.items()) if v is not None}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _status_words(job: JobRecord) -> str:
    if job.status == JobStatus.IN_PROGRESS and job.stage is not None:
        return f"in progress ({job.stage.value}, {job.progress}%)"
    return job.status.value.replace("_", " ")
