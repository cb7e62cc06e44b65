"""The OpenAI Videos API: create, list, retrieve, delete, cancel, download and follow videos.

Plain handlers: read the request, call `VideoJobs` through the `APIContext`, shape the
answer. Every error leaves in OpenAI's envelope, naming the field (serving/api/errors.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from serving.api.bodies import create_body_limit, read_create_body
from serving.api.content import content_response
from serving.api.context import APIContext, caller, context, not_found, owner_of
from serving.api.errors import APIError, body_error
from serving.api.events import video_events
from serving.api.schemas import CreateVideoBody, ErrorEnvelope, Video, VideoDeleted, VideoList, video_from_job
from serving.api.timing import timing_headers
from serving.auth import Caller
from serving.jobs.videos import NotReady

POLL_HEADER = "openai-poll-after-ms"

router = APIRouter(tags=["videos"])

BAD_INPUT = {400: {"model": ErrorEnvelope, "description": "Bad input; `error.param` names the field."}}
NOT_FOUND = {404: {"model": ErrorEnvelope, "description": "No such video (or not this key's)."}}
CREATE_REFUSALS = {**BAD_INPUT, 409: {"model": ErrorEnvelope, "description": "Idempotency-Key reused."},
                   413: {"model": ErrorEnvelope}, 415: {"model": ErrorEnvelope},
                   403: {"model": ErrorEnvelope, "description": "A priority above the key's maximum."},
                   429: {"model": ErrorEnvelope, "description": "Queue full or over a limit; see Retry-After."}}


async def read_video_request(request: Request, ctx: APIContext) -> dict[str, Any]:
    """A create body (JSON or form) as `VideoJobs.submit`'s fields, or a 4xx naming the field."""
    data = await read_create_body(request, create_body_limit(ctx.config))
    try:
        body = CreateVideoBody.model_validate(data)
    except ValidationError as exc:
        raise body_error(exc) from None
    # The first frame passes as sent (an Upload or the JSON value): VideoJobs.submit checks it.
    return body.model_dump(exclude={"input_reference"}) | {"input_reference": body.input_reference}



@router.post("/v1/videos", response_model=Video, responses=CREATE_REFUSALS)
async def create_video(request: Request, ctx: APIContext = Depends(context), who: Caller | None = Depends(caller)):
    """Queue a video; poll it, follow its events, or be told by its webhook."""
    fields = await read_video_request(request, ctx)
    job, created = await ctx.create(fields, request.headers.get("idempotency-key"), who)
    headers = {POLL_HEADER: str(ctx.config.server.poll_after_ms)}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse((await ctx.shaped(job)).model_dump(mode="json"), headers=headers)


@router.get("/v1/videos", response_model=VideoList, responses={**BAD_INPUT, **NOT_FOUND})
async def list_videos(after: str | None = Query(default=None, pattern=r"^video_[0-9a-f]{32}$",
                                                description="A video id: the page starts after it."),
                      limit: int = Query(default=20, ge=1, le=100), order: Literal["asc", "desc"] = "desc",
                      ctx: APIContext = Depends(context), who: Caller | None = Depends(caller)):
    jobs = ctx.jobs
    if after is not None and not await asyncio.to_thread(jobs.is_cursor, after, owner_of(who)):
        raise APIError(404, f"after: no video with id {after!r}", param="after", code="video_not_found")
    records, has_more = await asyncio.to_thread(jobs.list, after, limit, order, owner_of(who))
    data = [video_from_job(job, simulated=ctx.simulated) for job in records]
    return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                     has_more=has_more)


@router.get("/v1/videos/{video_id}", response_model=Video, responses={**BAD_INPUT, **NOT_FOUND})
async def retrieve_video(video_id: str, ctx: APIContext = Depends(context), who: Caller | None = Depends(caller)):
    job = await ctx.job_of(video_id, who)
    headers = {} if job.status.terminal else {POLL_HEADER: str(ctx.config.server.poll_after_ms)}
    return JSONResponse((await ctx.shaped(job)).model_dump(mode="json"), headers=headers)


DELETED_LATER = {202: {"model": VideoDeleted, "description": "Deleted; some files are removed in the background."}}


@router.delete("/v1/videos/{video_id}", response_model=VideoDeleted,
               responses={**BAD_INPUT, **NOT_FOUND, **DELETED_LATER})
async def delete_video(video_id: str, ctx: APIContext = Depends(context), who: Caller | None = Depends(caller)):
    deleted = await asyncio.to_thread(ctx.jobs.delete, video_id, owner_of(who))
    if deleted is None:
        raise not_found(video_id)
    job, files_gone = deleted
    if not job.status.terminal:
        ctx.ended(job, "deleted")
    return JSONResponse(VideoDeleted(id=video_id).model_dump(mode="json"), status_code=200 if files_gone else 202)


@router.post("/v1/videos/{video_id}/cancel", response_model=Video, responses={**BAD_INPUT, **NOT_FOUND})
async def cancel_video(video_id: str, ctx: APIContext = Depends(context), who: Caller | None = Depends(caller)):
    found = await asyncio.to_thread(ctx.jobs.cancel, video_id, owner_of(who))
    if found is None:
        raise not_found(video_id)
    job, ended_here = found
    if ended_here:
        ctx.ended(job, "cancelled")  # a running job is ended by its Director, which counts it
    return await ctx.shaped(job)


MEDIA = {"video/mp4": {}, "image/webp": {}}
CONTENT_ANSWERS = {**BAD_INPUT, **NOT_FOUND,
                   200: {"content": MEDIA, "description": "The MP4 (or WebP thumbnail)."},
                   206: {"content": MEDIA, "description": "The requested byte range."},
                   409: {"model": ErrorEnvelope, "description": "The video is not completed yet."},
                   416: {"model": ErrorEnvelope, "description": "Range not satisfiable."}}


@router.get("/v1/videos/{video_id}/content", response_class=Response, responses=CONTENT_ANSWERS)
async def download_content(request: Request, video_id: str, variant: Literal["video", "thumbnail"] = "video",
                           ctx: APIContext = Depends(context), who: Caller | None = Depends(caller)):
    try:
        found = await asyncio.to_thread(ctx.jobs.content_key, video_id, variant, owner_of(who))
    except NotReady as exc:
        raise APIError(409, str(exc), param="video_id", code="video_not_ready") from None
    if found is None:
        raise not_found(video_id)
    key, media_type, job = found
    response = await content_response(ctx.jobs.artifacts, key, media_type, f"{video_id}.{key.rsplit('.', 1)[-1]}",
                                      request.headers.get("range"))
    response.headers.update(timing_headers(job))  # what peers' benchmark clients read off the download
    return response


EVENT_ANSWERS = {**BAD_INPUT, **NOT_FOUND,
                 200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."},
                 429: {"model": ErrorEnvelope, "description": "Too many open streams; see Retry-After."}}


@router.get("/v1/videos/{video_id}/events", response_class=StreamingResponse, responses=EVENT_ANSWERS)
async def stream_events(video_id: str, ctx: APIContext = Depends(context), who: Caller | None = Depends(caller)):
    """Server-sent events: the video object on every change, until it is finished (or
    the stream's lifetime ends: `stream.expired`, then reconnect or poll)."""
    job = await ctx.job_of(video_id, who)
    slot = ctx.stream_slots.take(owner_of(who), who.max_event_streams if who is not None else None)
    lifetime = ctx.config.server.event_stream_max_seconds
    events = video_events(job, ctx.watcher, ctx.shaped, slot, lifetime)

    async def release() -> None:  # also when the stream never started; closing twice is harmless
        slot.close()

    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(release))
