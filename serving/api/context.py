"""What every route needs, handed to the handlers as FastAPI dependencies.

`APIContext` is the service behind the routes (the job service `VideoJobs`, the wait
estimate, readiness, limits) plus the one create path every route family shares: the
OpenAI route, the synchronous one and the task-style one differ in how they read a request
and shape an answer, never in how a job is admitted. `context` and `caller` are the
dependencies: the first finds the app's context, the second the API key behind a request
(None with auth off), counting the request against the key's rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer

from serving.admission import NO_WORK, QueueFull, WaitEstimate
from serving.api.errors import APIError
from serving.api.events import JobWatcher, StreamSlots
from serving.api.image_fetch import fetch_image, remote_url
from serving.api.schemas import Video, video_from_job
from serving.auth import ApiKeys, AuthError, Caller
from serving.config import ServiceConfig
from serving.jobs.records import JobRecord
from serving.jobs.store import IdempotencyConflict
from serving.jobs.videos import PriorityNotAllowed, QuotaExceeded, VideoJobs
from serving.pipeline.spec import SpecError
from serving.policy import PolicyViolation

logger = logging.getLogger("ray.serve")

READ_METHODS = ("GET", "HEAD")


@dataclass
class APIContext:
    """The service the routes call. The callables connect it to the rest of the service (the
    Director's wake-up, readiness and wait estimate; the metrics) without the HTTP layer
    knowing what is behind them."""

    config: ServiceConfig
    jobs: VideoJobs
    on_submitted: Callable[[str], Awaitable[Any]] | None = None
    stages_ready: Callable[[], Awaitable[dict]] | None = None
    estimate: Callable[[], Awaitable[WaitEstimate | None]] | None = None
    on_rejected: Callable[[str], None] | None = None
    on_ended: Callable[[JobRecord, str], None] | None = None  # a job the API itself ended (a cancel, a delete)
    keys: ApiKeys = field(init=False)
    watcher: JobWatcher = field(init=False)
    stream_slots: StreamSlots = field(init=False)
    # One create at a time per key in this replica, so two racing creates cannot both pass
    # the concurrent-job quota.
    quota_locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        server = self.config.server
        self.keys = ApiKeys(self.config.auth, server.poll_after_ms)
        self.watcher = JobWatcher(self.jobs.store.get_many, server.event_poll_seconds)
        self.stream_slots = StreamSlots(server.max_event_streams, server.event_stream_max_seconds)

    @property
    def simulated(self) -> bool:
        """Simulated accelerators: every video object and /readyz say so."""
        return self.config.simulation is not None

    # ---- reads ----------------------------------------------------------------------

    async def current_estimate(self) -> WaitEstimate | None:
        try:
            return await self.estimate() if self.estimate is not None else None
        except Exception:  # an estimate is advice; its absence must not fail a request
            logger.exception("wait estimate unavailable")
            return None

    async def shaped(self, job: JobRecord) -> Video:
        """The video object of a job, with its place in the queue and start estimate if queued."""
        ahead = await asyncio.to_thread(self.jobs.queue_ahead, job)
        if ahead is None:
            return video_from_job(job, simulated=self.simulated)
        position, seconds_ahead = ahead
        wait = await self.current_estimate()
        start = time.time() + wait.start_in(seconds_ahead, job.cost) if wait is not None else None
        return video_from_job(job, queue_position=position, estimated_start_at=start, simulated=self.simulated)

    async def job_of(self, video_id: str, who: Caller | None, param: str = "video_id") -> JobRecord:
        job = await asyncio.to_thread(self.jobs.get, video_id, owner_of(who))
        if job is None:
            raise not_found(video_id, param)
        return job

    # ---- the one way in for new jobs --------------------------------------------------

    async def create(self, fields: dict[str, Any], idempotency_key: str | None, who: Caller | None,
                     renamed: dict[str, str] | None = None) -> tuple[JobRecord, bool]:
        """Admit and queue a job from `VideoJobs.submit`'s fields; (job, created). Every refusal
        is an APIError naming the field, as `renamed` maps our field names to the route's own
        (the task route calls `seconds` "duration")."""
        renamed = renamed or {}
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise APIError(400, "Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key")
        url = remote_url(fields.get("input_reference")) if self.jobs.preset.takes_image else None
        if url is not None:  # fetched here, before admission: submit checks the bytes as any upload's
            if idempotency_key is not None:  # a retry gets its job without fetching again
                try:
                    earlier = await asyncio.to_thread(self.jobs.earlier_job, fields, url, idempotency_key,
                                                      owner_of(who))
                except IdempotencyConflict:
                    raise _key_reused() from None
                if earlier is not None:
                    return earlier, False
            try:
                fields = {**fields, "input_reference": await fetch_image(url, self.config.server)}
            except SpecError as exc:
                raise APIError(400, f"{exc.field}: {exc.message}", param=exc.field, code="invalid_value") from None
        wait = await self.current_estimate()  # costs the job, and admits it or not (serving/admission.py)
        try:
            async with self._quota_lock(who):
                job, created = await asyncio.to_thread(
                    self.jobs.submit, fields, idempotency_key, owner_of(who),
                    who.max_concurrent_jobs if who is not None else None,
                    who.max_priority if who is not None else None, wait, url)
        except QueueFull as exc:
            if self.on_rejected is not None:
                self.on_rejected("queue_wait")
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(exc.verdict.retry_after)}) from None
        except QuotaExceeded as exc:
            retry = await self.quota_retry_after()
            raise APIError(429, f"{exc}; retry in {retry} s, or cancel one", type="rate_limit_error",
                           code="concurrent_jobs_exceeded", headers={"Retry-After": str(retry)}) from None
        except PriorityNotAllowed as exc:
            raise APIError(403, str(exc), param="priority", type="permission_error",
                           code="priority_not_allowed") from None
        except SpecError as exc:
            name = renamed.get(exc.field, exc.field)
            raise APIError(400, f"{name}: {exc.message}", param=name, code="invalid_value") from None
        except PolicyViolation as exc:
            raise APIError(400, str(exc), param=exc.violation.field, code="content_policy_violation") from None
        except IdempotencyConflict:
            raise _key_reused() from None
        if created and self.on_submitted is not None:
            await self.on_submitted(job.id)
        return job, created

    async def quota_retry_after(self) -> int:
        """When the work running now should be done, freeing a slot (1 s to 10 min)."""
        wait = await self.current_estimate()
        seconds = wait.start_in(NO_WORK) if wait is not None else self.config.server.poll_after_ms / 1000
        return min(600, max(1, math.ceil(seconds)))

    def _quota_lock(self, who: Caller | None):
        if who is None:
            return contextlib.nullcontext()
        return self.quota_locks.setdefault(who.name, asyncio.Lock())

    def ended(self, job: JobRecord, ending: str) -> None:
        """The API ended a job itself (a queued job cancelled, an unfinished one deleted)."""
        if self.on_ended is not None:
            try:
                self.on_ended(job, ending)
            except Exception:  # bookkeeping must never fail the request
                logger.exception("recording the end of %s failed", job.id)


def _key_reused() -> APIError:
    return APIError(409, "this Idempotency-Key was already used with a different request body",
                    param="Idempotency-Key", code="idempotency_key_reused")


def owner_of(who: Caller | None) -> str | None:
    return who.name if who is not None else None


def not_found(video_id: str, param: str = "video_id") -> APIError:
    return APIError(404, f"no video with id {video_id!r}", param=param, code="video_not_found")


def context(request: Request) -> APIContext:
    return request.app.state.context


# Declared on every route so the OpenAPI document names the scheme; with auth off the
# document drops it again (serving/api/openapi.py) and the header is ignored.
bearer = HTTPBearer(auto_error=False, description="An API key from the operator (the openai SDK's api_key).")


async def caller(request: Request, ctx: APIContext = Depends(context), _: Any = Security(bearer)) -> Caller | None:
    """The API key behind the request, counted against its rate; None with auth off."""
    keys = ctx.keys
    if not keys.enabled:
        return None
    try:
        who = keys.authenticate(request.headers.get("authorization"))
    except AuthError as exc:
        raise APIError(401, str(exc), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}) from None
    read = request.method in READ_METHODS
    wait = keys.retry_after(who, read)
    if wait is not None:
        rate = f"{who.reads_per_minute} reads" if read else f"{who.requests_per_minute} writes"
        raise APIError(429, f"this API key is over its rate of {rate} per minute; retry in {wait} s",
                       type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
    return who
