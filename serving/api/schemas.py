"""Wire shapes of the OpenAI Videos API, plus our extension fields.

Plain pydantic models mirroring the public spec, so the official `openai` SDK parses every
response. Our extensions ride in extra fields the SDK keeps but does not require.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.jobs.records import JobRecord, JobStatus


class CreateVideoBody(BaseModel):
    """POST /v1/videos, as JSON or form fields. Unknown fields are refused, by name."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: Optional[str] = None
    seconds: Optional[Union[int, float, str]] = None
    size: Optional[str] = None
    input_reference: Optional[Any] = None
    # ditserve extensions (the SDK sends them through `extra_body`)
    seed: Optional[int] = None
    negative_prompt: Optional[str] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    fps: Optional[int] = None
    priority: Optional[int] = None
    webhook_url: Optional[str] = Field(default=None, description="Called (signed, Standard Webhooks) when the video "
                                                                   "completes or fails.")
    language: Optional[str] = Field(default=None, description="The prompt's language tag (e.g. \"en\"); recorded "
                                                                "with the video, the prompt is used as given.")
    cache: Optional[Union[str, float]] = Field(default=None, description="Step caching: off, balanced, fast, or a "
                                                                         "threshold; faster, slightly less faithful.")
    # vLLM-Omni's and TensorRT-LLM's spellings of size and length, so their clients run unchanged.
    width: Optional[int] = Field(default=None, description="With height, instead of size.")
    height: Optional[int] = Field(default=None, description="With width, instead of size.")
    num_frames: Optional[int] = Field(default=None, description="Instead of seconds: 4n+1 frames at fps.")

    _numbers_are_not_booleans = field_validator("seconds", "seed", "num_inference_steps", "guidance_scale", "fps",
                                                "priority", "cache", "width", "height", "num_frames", mode="before")(lambda value: not_a_boolean(value))


def not_a_boolean(value: Any) -> Any:
    """JSON true/false is not a number here (pydantic would read it as 1/0)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, found {str(value).lower()}")
    return value


class VideoError(BaseModel):
    code: str
    message: str


class VideoUsage(BaseModel):
    """Accelerator-seconds the video used per stage, every attempt counted (its share of each
    batched forward on the Denoiser)."""

    text_encoder_seconds: float
    denoiser_seconds: float
    vae_decoder_seconds: float
    total_seconds: float


class Video(BaseModel):
    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    model: str
    progress: int
    prompt: Optional[str] = None
    remixed_from_video_id: Optional[str] = None
    seconds: str
    size: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    error: Optional[VideoError] = None
    # ditserve extensions
    stage: Optional[str] = Field(default=None, description="Model stage of an in-progress job.")
    queue_position: Optional[int] = None
    estimated_start_at: Optional[int] = Field(default=None, description="Unix time a queued job should start.")
    seed: int
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    fps: int
    num_frames: int
    priority: int
    resumed_from_step: Optional[int] = Field(default=None, description="Set when a retry resumed a checkpoint.")
    cache_threshold: float = Field(default=0.0, description="The step-cache threshold the video runs with (0: off).")
    computed_steps: Optional[int] = Field(default=None, description="Denoise steps that ran the DiT in full (the "
                                                                    "rest reused a cached residual); set once "
                                                                    "denoising is done.")
    webhook_url: Optional[str] = None
    language: Optional[str] = None
    usage: VideoUsage = Field(description="Accelerator-seconds used so far, per stage and in total.")
    timestamps: dict[str, float] = Field(description="Unix times: submitted_at, <stage>_started_at/_finished_at, ...")
    simulated: bool = Field(default=False, description="True when the service runs simulated accelerators "
                                                       "(`ditserve serve --simulate`): no model made this video.")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


# Our states map onto OpenAI's four; a cancelled job is `failed` with error code "cancelled".
_WIRE_STATUS = {JobStatus.QUEUED: "queued", JobStatus.IN_PROGRESS: "in_progress", JobStatus.COMPLETED: "completed",
                JobStatus.FAILED: "failed", JobStatus.CANCELLED: "failed"}


def video_from_job(job: JobRecord, queue_position: int | None = None,
                   estimated_start_at: float | None = None, simulated: bool = False) -> Video:
    spec = job.spec
    seconds = (spec["num_frames"] - 1) / spec["fps"]
    error = VideoError(code=job.error_code or "failed", message=job.error_message or "") if job.error_code else None
    return Video(
        id=job.id, created_at=int(job.created_at), completed_at=int(job.completed_at) if job.completed_at else None,
        expires_at=int(job.expires_at) if job.expires_at else None, model=job.model, progress=job.progress,
        prompt=spec["prompt"], seconds=f"{seconds:g}", size=f"{spec['width']}x{spec['height']}",
        status=_WIRE_STATUS[job.status], error=error, stage=job.stage.value if job.stage else None,
        queue_position=queue_position,
        estimated_start_at=int(estimated_start_at) if estimated_start_at is not None else None, seed=spec["seed"], negative_prompt=spec["negative_prompt"],
        num_inference_steps=spec["num_inference_steps"], guidance_scale=spec["guidance_scale"], fps=spec["fps"],
        num_frames=spec["num_frames"], priority=job.priority, resumed_from_step=job.resumed_from_step,
        cache_threshold=spec.get("cache_threshold", 0.0), computed_steps=job.computed_steps,
        webhook_url=job.webhook_url, language=job.language, usage=usage_of(job),
        timestamps=job.timestamps, simulated=simulated,
    )


def usage_of(job: JobRecord) -> VideoUsage:
    used = job.used
    return VideoUsage(text_encoder_seconds=round(used.text_encoder, 6), denoiser_seconds=round(used.denoiser, 6),
                      vae_decoder_seconds=round(used.vae_decoder, 6), total_seconds=round(used.total, 6))
