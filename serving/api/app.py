"""FastAPI routes of the Videos API. Thin: parse, call `VideoJobs`, shape the answer.

`create_api` assembles the app from its parts: errors (serving/api/errors.py), request
bodies (bodies.py), downloads (content.py), progress streams (events.py) and the API's own
description (openapi.py). Every error leaves in OpenAI's envelope, naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any, Awaitable, Callable, Literal

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from starlette.background import BackgroundTask

from serving.admission import NO_WORK, QueueFull, WaitEstimate
from serving.api.bodies import read_create_body
from serving.api.content import content_response
from serving.api.errors import APIError, body_error, install_error_handlers
from serving.api.events import JobWatcher, StreamSlots, video_events
from serving.api.openapi import docs_urls, request_body_schema
from serving.api.schemas import CreateVideoBody, ErrorEnvelope, Video, VideoDeleted, VideoList, video_from_job
from serving.auth import ApiKeys, AuthError, Caller
from serving.config import ServiceConfig
from serving.jobs.records import JobRecord
from serving.jobs.store import IdempotencyConflict
from serving.jobs.videos import NotReady, PriorityNotAllowed, QuotaExceeded, VideoJobs
from serving.pipeline.spec import SpecError
from serving.policy import PolicyViolation

logger = logging.getLogger("ray.serve")

POLL_HEADER = "openai-poll-after-ms"
READ_METHODS = ("GET", "HEAD")


def create_api(config: ServiceConfig, jobs: VideoJobs,
               on_submitted: Callable[[str], Awaitable[Any]] | None = None,
               stages_ready: Callable[[], Awaitable[dict]] | None = None,
               estimate: Callable[[], Awaitable[WaitEstimate | None]] | None = None,
               on_rejected: Callable[[str], None] | None = None) -> FastAPI:
    """The Videos API over `jobs`. The callables connect it to the rest of the service
    (the Director's wake-up, readiness and wait estimate; the rejection metric) without
    the HTTP layer knowing what is behind them."""
    server = config.server
    keys = ApiKeys(config.auth, server.poll_after_ms)
    errors = {400: {"model": ErrorEnvelope, "description": "Bad input; `error.param` names the field."}}
    if keys.enabled:
        errors[401] = {"model": ErrorEnvelope, "description": "Missing or unknown API key."}
        errors[429] = {"model": ErrorEnvelope, "description": "Over the key's rate or job quota; see Retry-After."}
    app = FastAPI(title="ditserve", version="0.1.0",
                  description="OpenAI-compatible Videos API for self-hosted text-to-video models.", **docs_urls(config))
    install_error_handlers(app)
    poll_ms = str(server.poll_after_ms)
    not_found_doc = {404: {"model": ErrorEnvelope, "description": "No such video (or not this key's)."}}
    watcher = JobWatcher(jobs.store.get_many, server.event_poll_seconds)
    stream_slots = StreamSlots(server.max_event_streams, server.event_stream_max_seconds)
    # Simulated accelerators: every video object and /readyz say so (README "Simulated accelerators").
    simulated = config.simulation is not None

    if keys.enabled:
        async def caller(request: Request, _: Any = Security(HTTPBearer(auto_error=False))) -> Caller | None:
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
    else:
        async def caller() -> Caller | None:
            return None

    def owner_of(who: Caller | None) -> str | None:
        return who.name if who is not None else None

    # One create at a time per key in this replica, so two racing creates cannot both pass
    # the concurrent-job quota.
    quota_locks: dict[str, asyncio.Lock] = {}

    def quota_lock(who: Caller | None):
        if who is None:
            return contextlib.nullcontext()
        return quota_locks.setdefault(who.name, asyncio.Lock())

    async def quota_retry_after() -> int:
        """When the work running now should be done, freeing a slot (1 s to 10 min)."""
        wait = await current_estimate()
        seconds = wait.start_in(NO_WORK) if wait is not None else server.poll_after_ms / 1000
        return min(600, max(1, math.ceil(seconds)))

    def not_found(video_id: str) -> APIError:
        return APIError(404, f"no video with id {video_id!r}", param="video_id", code="video_not_found")

    async def current_estimate() -> WaitEstimate | None:
        try:
            return await estimate() if estimate is not None else None
        except Exception:  # an estimate is advice; its absence must not fail a request
            logger.exception("wait estimate unavailable")
            return None

    async def shaped(job: JobRecord) -> Video:
        ahead = await asyncio.to_thread(jobs.queue_ahead, job)
        if ahead is None:
            return video_from_job(job, simulated=simulated)
        position, seconds_ahead = ahead
        wait = await current_estimate()
        start = time.time() + wait.start_in(seconds_ahead, job.cost) if wait is not None else None
        return video_from_job(job, queue_position=position, estimated_start_at=start, simulated=simulated)

    # ---- videos ---------------------------------------------------------------------------

    create_responses = {**errors, 409: {"model": ErrorEnvelope, "description": "Idempotency-Key reused."},
                        413: {"model": ErrorEnvelope}, 415: {"model": ErrorEnvelope},
                        429: {"model": ErrorEnvelope, "description": "Queue full or over a limit; see Retry-After."}}
    if keys.enabled:
        create_responses[403] = {"model": ErrorEnvelope, "description": "A priority above the key's maximum."}
    body_schema = request_body_schema(config)

    @app.post("/v1/videos", response_model=Video, responses=create_responses, openapi_extra={"requestBody": {
        "required": True,
        "content": {"application/json": {"schema": body_schema}, "multipart/form-data": {"schema": body_schema}}}})
    async def create_video(request: Request, who: Caller | None = Depends(caller)):
        data = await read_create_body(request, server.max_body_bytes)
        try:
            body = CreateVideoBody.model_validate(data)
        except ValidationError as exc:
            raise body_error(exc) from None
        if body.input_reference is not None:
            raise APIError(400, "input_reference is not supported: this server generates video from text only",
                           param="input_reference", code="unsupported_parameter")
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise APIError(400, "Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key")
        wait = await current_estimate()  # costs the job, and admits it or not (serving/admission.py)
        try:
            async with quota_lock(who):
                job, created = await asyncio.to_thread(
                    jobs.submit, body.model_dump(exclude={"input_reference"}), key, owner_of(who),
                    who.max_concurrent_jobs if who is not None else None,
                    who.max_priority if who is not None else None, wait)
        except QueueFull as exc:
            if on_rejected is not None:
                on_rejected("queue_wait")
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(exc.verdict.retry_after)}) from None
        except QuotaExceeded as exc:
            retry = await quota_retry_after()
            raise APIError(429, f"{exc}; retry in {retry} s, or cancel one", type="rate_limit_error",
                           code="concurrent_jobs_exceeded", headers={"Retry-After": str(retry)}) from None
        except PriorityNotAllowed as exc:
            raise APIError(403, str(exc), param="priority", type="permission_error",
                           code="priority_not_allowed") from None
        except SpecError as exc:
            raise APIError(400, f"{exc.field}: {exc.message}", param=exc.field, code="invalid_value") from None
        except PolicyViolation as exc:
            raise APIError(400, str(exc), param=exc.violation.field, code="content_policy_violation") from None
        except IdempotencyConflict:
            raise APIError(409, "this Idempotency-Key was already used with a different request body",
                           param="Idempotency-Key", code="idempotency_key_reused") from None
        if created and on_submitted is not None:
            await on_submitted(job.id)
        headers = {POLL_HEADER: poll_ms}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse((await shaped(job)).model_dump(mode="json"), headers=headers)

    @app.get("/v1/videos", response_model=VideoList, responses={**errors, **not_found_doc})
    async def list_videos(after: str | None = Query(default=None, pattern=r"^video_[0-9a-f]{32}$",
                                                    description="A video id: the page starts after it."),
                          limit: int = Query(default=20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc", who: Caller | None = Depends(caller)):
        if after is not None and not await asyncio.to_thread(jobs.is_cursor, after, owner_of(who)):
            raise APIError(404, f"after: no video with id {after!r}", param="after", code="video_not_found")
        records, has_more = await asyncio.to_thread(jobs.list, after, limit, order, owner_of(who))
        data = [video_from_job(job, simulated=simulated) for job in records]
        return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                         has_more=has_more)

    @app.get("/v1/videos/{video_id}", response_model=Video, responses={**errors, **not_found_doc})
    async def retrieve_video(video_id: str, who: Caller | None = Depends(caller)):
        job = await asyncio.to_thread(jobs.get, video_id, owner_of(who))
        if job is None:
            raise not_found(video_id)
        headers = {} if job.status.terminal else {POLL_HEADER: poll_ms}
        video = await shaped(job)
        return JSONResponse(video.model_dump(mode="json"), headers=headers)

    pending = {202: {"model": VideoDeleted, "description": "Deleted; some files are removed in the background."}}

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses={**errors, **not_found_doc, **pending})
    async def delete_video(video_id: str, who: Caller | None = Depends(caller)):
        files_gone = await asyncio.to_thread(jobs.delete, video_id, owner_of(who))
        if files_gone is None:
            raise not_found(video_id)
        return JSONResponse(VideoDeleted(id=video_id).model_dump(mode="json"), status_code=200 if files_gone else 202)

    @app.post("/v1/videos/{video_id}/cancel", response_model=Video, responses={**errors, **not_found_doc})
    async def cancel_video(video_id: str, who: Caller | None = Depends(caller)):
        job = await asyncio.to_thread(jobs.cancel, video_id, owner_of(who))
        if job is None:
            raise not_found(video_id)
        return await shaped(job)

    media = {"video/mp4": {}, "image/webp": {}}
    content_responses = {**errors, **not_found_doc,
                         200: {"content": media, "description": "The MP4 (or WebP thumbnail)."},
                         206: {"content": media, "description": "The requested byte range."},
                         409: {"model": ErrorEnvelope, "description": "The video is not completed yet."},
                         416: {"model": ErrorEnvelope, "description": "Range not satisfiable."}}

    @app.get("/v1/videos/{video_id}/content", response_class=Response, responses=content_responses)
    async def download_content(request: Request, video_id: str,
                               variant: Literal["video", "thumbnail"] = "video",
                               who: Caller | None = Depends(caller)):
        try:
            found = await asyncio.to_thread(jobs.content_key, video_id, variant, owner_of(who))
        except NotReady as exc:
            raise APIError(409, str(exc), param="video_id", code="video_not_ready") from None
        if found is None:
            raise not_found(video_id)
        key, media_type = found
        return await content_response(jobs.artifacts, key, media_type, f"{video_id}.{key.rsplit('.', 1)[-1]}",
                                      request.headers.get("range"))

    events_responses = {**errors, **not_found_doc,
                        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."},
                        429: {"model": ErrorEnvelope, "description": "Too many open streams; see Retry-After."}}

    @app.get("/v1/videos/{video_id}/events", response_class=StreamingResponse, responses=events_responses)
    async def stream_events(video_id: str, who: Caller | None = Depends(caller)):
        """Server-sent events: the video object on every change, until it is finished (or
        the stream's lifetime ends: `stream.expired`, then reconnect or poll)."""
        job = await asyncio.to_thread(jobs.get, video_id, owner_of(who))
        if job is None:
            raise not_found(video_id)
        slot = stream_slots.take(owner_of(who), who.max_event_streams if who is not None else None)
        events = video_events(job, watcher, shaped, slot, server.event_stream_max_seconds)

        async def release() -> None:  # also when the stream never started; closing twice is harmless
            slot.close()

        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(release))

    # ---- health -------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        checks: dict[str, bool] = {}
        denoisers: list[dict] = []  # per live Denoiser replica: its attention backend and why
        try:
            await asyncio.to_thread(jobs.ping)
            checks["storage"] = True
        except Exception:
            checks["storage"] = False
        if stages_ready is not None:
            try:
                stages = await asyncio.wait_for(stages_ready(), timeout=10)
                checks.update(stages["checks"])
                denoisers = stages["denoisers"]
            except Exception:
                checks["stages"] = False
        ready = all(checks.values())
        simulation = config.simulation.model_dump() if simulated else False
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks, "denoisers": denoisers,
                             "simulated": simulation}, status_code=200 if ready else 503)

    return app
