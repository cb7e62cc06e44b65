"""Task-style routes, the shape hosted video APIs use: submit, get a `task_id`, poll
`/tasks/{id}`, download `result_url`. A thin translation onto the same jobs, keys, limits and
admission as the OpenAI routes (`APIContext.create`): a task *is* a video, its id the
video's id, so every other route works on it too.

    POST /v1/videos/generations  {prompt, duration, resolution, aspect_ratio, ...} -> 200 {task_id, ...}
    GET  /v1/tasks/{task_id}     -> {status: queued|processing|completed|failed, progress, result_url, error}

`language` is recorded with the video; the prompt goes to the model as given (no translation).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.api.bodies import create_body_limit, read_create_body
from serving.api.context import APIContext, caller, context
from serving.api.errors import APIError, body_error
from serving.api.resolution import size_for
from serving.api.schemas import VideoUsage, not_a_boolean, usage_of
from serving.api.videos import BAD_INPUT, CREATE_REFUSALS, NOT_FOUND, POLL_HEADER
from serving.auth import Caller
from serving.jobs.records import JobRecord, JobStatus
from serving.pipeline.spec import SpecError, build_spec

router = APIRouter(tags=["tasks"])

# Our fields under the task body's names, for errors that name the field.
RENAMED = {"seconds": "duration", "size": "resolution", "webhook_url": "callback_url"}


class CreateTaskBody(BaseModel):
    """POST /v1/videos/generations. Unknown fields are refused, by name."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: Optional[str] = None
    duration: Optional[Union[int, float]] = Field(default=None, description="Seconds of video.")
    resolution: Optional[str] = Field(default=None, description="480p, 720p, 1080p, 4K (and others), or WxH.")
    aspect_ratio: Optional[str] = Field(default=None, description="width:height, e.g. 16:9; with a named "
                                                                  "resolution. Default: the model's own shape.")
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    language: Optional[str] = Field(default=None, description="The prompt's language tag; recorded, the prompt is "
                                                              "used as given.")
    callback_url: Optional[str] = Field(default=None, description="Called (signed, Standard Webhooks) when the "
                                                                  "task completes or fails.")
    input_reference: Optional[Any] = Field(default=None, description="Image-to-video models: the first frame, as "
                                                                     "POST /v1/videos takes it (a file part, or "
                                                                     "{\"image_url\": a base64 data: URL}).")

    _numbers_are_not_booleans = field_validator("duration", "seed", mode="before")(lambda value: not_a_boolean(value))


class TaskError(BaseModel):
    code: str
    message: str


class Task(BaseModel):
    task_id: str = Field(description="Also the video's id: GET /v1/videos/{task_id} shows the same job.")
    object: Literal["video.task"] = "video.task"
    status: Literal["queued", "processing", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    result_url: Optional[str] = Field(default=None, description="The MP4 on this service, once completed; "
                                                                "download it with the same API key.")
    error: Optional[TaskError] = None
    duration: float
    resolution: str
    language: Optional[str] = None
    usage: VideoUsage


_STATUS = {JobStatus.QUEUED: "queued", JobStatus.IN_PROGRESS: "processing", JobStatus.COMPLETED: "completed",
           JobStatus.FAILED: "failed", JobStatus.CANCELLED: "failed"}


def task_from_job(job: JobRecord, request: Request, public_url: str | None = None) -> Task:
    spec = job.spec
    error = TaskError(code=job.error_code or "failed", message=job.error_message or "") if job.error_code else None
    result = result_url(job, request, public_url) if job.status == JobStatus.COMPLETED else None
    return Task(task_id=job.id, status=_STATUS[job.status], progress=job.progress, created_at=int(job.created_at),
                completed_at=int(job.completed_at) if job.completed_at else None,
                expires_at=int(job.expires_at) if job.expires_at else None, result_url=result, error=error,
                duration=(spec["num_frames"] - 1) / spec["fps"], resolution=f"{spec['width']}x{spec['height']}",
                language=job.language, usage=usage_of(job))


def renamed_for(body: CreateTaskBody) -> dict[str, str]:
    """Our field names as this request spelled them: a size it asked for only through its
    aspect ratio is refused under `aspect_ratio`."""
    if body.resolution is None and body.aspect_ratio is not None:
        return {**RENAMED, "size": "aspect_ratio"}
    return RENAMED


def result_url(job: JobRecord, request: Request, public_url: str | None) -> str:
    """Where the MP4 downloads: under the operator's public URL when set (behind a proxy the
    request's own host and scheme may not be what the client reached)."""
    if public_url:
        return f"{public_url.rstrip('/')}/v1/videos/{job.id}/content"
    return str(request.url_for("download_content", video_id=job.id))


def job_fields(body: CreateTaskBody, ctx: APIContext) -> dict:
    """The task body as `VideoJobs.submit`'s fields."""
    jobs, generation = ctx.jobs, ctx.config.generation

    def fits(size: str) -> bool:
        try:
            build_spec(jobs.preset, generation, body.prompt or "-", size=size, seconds=body.duration)
        except SpecError as exc:
            return exc.field != "size"
        return True

    try:
        size = size_for(body.resolution, body.aspect_ratio, jobs.preset, fits)
    except SpecError as exc:
        name = renamed_for(body).get(exc.field, exc.field)
        raise APIError(400, f"{name}: {exc.message}", param=name, code="invalid_value") from None
    return {"prompt": body.prompt, "model": body.model, "seconds": body.duration, "size": size,
            "negative_prompt": body.negative_prompt, "seed": body.seed, "language": body.language,
            "webhook_url": body.callback_url, "input_reference": body.input_reference}


@router.post("/v1/videos/generations", response_model=Task, responses=CREATE_REFUSALS)
async def create_task(request: Request, ctx: APIContext = Depends(context), who: Caller | None = Depends(caller)):
    """Queue a video the task way; answers 200 with its `task_id`."""
    data = await read_create_body(request, create_body_limit(ctx.config))
    try:
        body = CreateTaskBody.model_validate(data)
    except ValidationError as exc:
        raise body_error(exc) from None
    job, _ = await ctx.create(job_fields(body, ctx), request.headers.get("idempotency-key"), who, renamed_for(body))
    return JSONResponse(task_from_job(job, request, ctx.config.server.public_url).model_dump(mode="json"),
                        headers={POLL_HEADER: str(ctx.config.server.poll_after_ms)})


@router.get("/v1/tasks/{task_id}", response_model=Task, responses={**BAD_INPUT, **NOT_FOUND})
async def retrieve_task(task_id: str, request: Request, ctx: APIContext = Depends(context),
                        who: Caller | None = Depends(caller)):
    job = await ctx.job_of(task_id, who, param="task_id")
    return task_from_job(job, request, ctx.config.server.public_url)
