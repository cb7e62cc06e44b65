"""POST /v1/videos/sync: the same request as POST /v1/videos, answered with the MP4 itself
once the video is done: the synchronous form vLLM-Omni and TensorRT-LLM serve, so their
benchmark clients measure us on the same work as the peers.

The job is an ordinary durable job: it is committed before the wait begins, a client that
hangs up does not cancel it, and every answer names it (`x-video-id`, `Location`), so it can
be fetched later with GET /v1/videos/{id}. Timings ride in `Server-Timing` (`generation`,
`denoise`, `total`, and the other stages) and in vLLM-Omni's `x-inference-time-s`. A wait is
held like a progress stream (counted per key, at most `server.event_stream_max_seconds`);
past that the answer is 202 with the video object, to poll.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from serving.api.content import content_response
from serving.api.context import APIContext, caller, context, owner_of
from serving.api.errors import APIError
from serving.api.schemas import ErrorEnvelope, Video
from serving.api.timing import timing_headers
from serving.api.videos import CREATE_REFUSALS, POLL_HEADER, read_video_request
from serving.auth import Caller
from serving.jobs.records import JobRecord, JobStatus

router = APIRouter(tags=["videos"])

# How often a wait looks whether its client is still there (the job goes on either way).
DISCONNECT_CHECK_SECONDS = 2.0

SYNC_ANSWERS = {
    **CREATE_REFUSALS,
    200: {"content": {"video/mp4": {}}, "description": "The MP4. `Server-Timing` and `x-inference-time-s` carry "
                                                      "the timings; `x-video-id` names the video."},
    202: {"model": Video, "description": "Not done within the server's wait limit: the video object, to poll."},
    404: {"model": ErrorEnvelope, "description": "The video was deleted while the request waited."},
    500: {"model": ErrorEnvelope, "description": "Generating the video failed; `error.code` says how."},
}


@router.post("/v1/videos/sync", response_class=Response, responses=SYNC_ANSWERS)
async def create_video_sync(request: Request, ctx: APIContext = Depends(context),
                            who: Caller | None = Depends(caller)):
    """Make a video and answer with its MP4 when done (same body as POST /v1/videos)."""
    fields = await read_video_request(request, ctx)
    # The wait's slot first: a refused wait must not leave a job behind that nobody asked after.
    slot = ctx.stream_slots.take(owner_of(who), who.max_event_streams if who is not None else None)
    try:
        job, _ = await ctx.create(fields, request.headers.get("idempotency-key"), who)
        named = {"x-video-id": job.id, "Location": f"/v1/videos/{job.id}"}
        job = await _until_ended(ctx, request, job)
    finally:
        slot.close()
    if job is None:
        raise APIError(404, f"video {named['x-video-id']} was deleted while this request waited", param="video_id",
                       code="video_not_found", headers=named)
    if not job.status.terminal:
        video = await ctx.shaped(job)
        return JSONResponse(video.model_dump(mode="json"), status_code=202,
                            headers={**named, POLL_HEADER: str(ctx.config.server.poll_after_ms)})
    if job.status == JobStatus.CANCELLED:
        raise APIError(409, f"video {job.id} was cancelled", param="video_id", code="cancelled", headers=named)
    if job.status == JobStatus.FAILED:
        raise APIError(500, f"video {job.id} failed: {job.error_message}", type="server_error",
                       code=job.error_code or "generation_failed", headers=named)
    response = await content_response(ctx.jobs.artifacts, job.video_key, "video/mp4", f"{job.id}.mp4", None)
    response.headers.update({**named, **timing_headers(job)})
    return response


async def _until_ended(ctx: APIContext, request: Request, job: JobRecord) -> JobRecord | None:
    """The job once it has ended, or as it is when the wait limit passes or the client hangs
    up; None if it was deleted meanwhile."""
    deadline = time.monotonic() + ctx.config.server.event_stream_max_seconds
    with ctx.watcher.watch(job.id) as watch:
        current: JobRecord | None = job
        while current is not None and not current.status.terminal:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or await request.is_disconnected():
                break
            if await watch.next_read(min(remaining, DISCONNECT_CHECK_SECONDS)):
                current = watch.job
    return current
