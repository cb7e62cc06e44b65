"""A video job as the store keeps it, and the states it moves through.

queued -> in_progress (stage: encoding -> denoising -> decoding) -> completed | failed | cancelled
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import Any

from serving.cost_model import StageSeconds


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class Stage(str, enum.Enum):
    """Stages of an in-progress job; each also names the timestamps kept for it."""

    TEXT_ENCODER = "text_encoder"
    DENOISER = "denoiser"
    VAE_DECODER = "vae_decoder"


# Share of the 0-100 progress each stage covers (denoising dominates the wall time).
PROGRESS_SPAN = {Stage.TEXT_ENCODER: (0, 5), Stage.DENOISER: (5, 90), Stage.VAE_DECODER: (90, 99)}

JOB_ID_PREFIX = "video_"


def new_job_id() -> str:
    return JOB_ID_PREFIX + secrets.token_hex(16)


def is_job_id(value: str) -> bool:
    """Ids are checked before they reach SQL or a storage path."""
    body = value[len(JOB_ID_PREFIX):]
    return value.startswith(JOB_ID_PREFIX) and len(body) == 32 and all(c in "0123456789abcdef" for c in body)


@dataclass
class JobRecord:
    id: str
    created_at: float
    status: JobStatus
    model: str
    spec: dict[str, Any]  # a VideoSpec as a dict
    stage: Stage | None = None
    progress: int = 0
    step: int = 0
    total_steps: int = 0
    timestamps: dict[str, float] = field(default_factory=dict)  # submitted_at, <stage>_started_at / _finished_at
    error_code: str | None = None
    error_message: str | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    video_key: str | None = None
    thumbnail_key: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    attempts: int = 0
    cancel_requested: bool = False
    priority: int = 0  # higher runs first; equal priorities are first come, first served
    num_steps: int = 0  # denoise steps asked for
    # Device seconds the job costs each stage (serving/cost_model.py), set at submit: what the
    # queue sums, estimates and admission count. None only in rows from before they existed.
    text_encoder_seconds: float | None = None
    denoiser_seconds: float | None = None
    vae_decoder_seconds: float | None = None
    checkpoint_step: int = 0  # the Denoiser's last saved step (0: none)
    resumed_from_step: int | None = None  # set when a retry picked up a checkpoint
    owner: str | None = None  # the API key's name that created it (None: auth off)
    webhook_url: str | None = None  # told when the job finishes (see serving/webhooks.py)
    computed_steps: int | None = None  # denoise steps that ran the DiT in full (the rest were step-cached)
    language: str | None = None  # the prompt's language as the client declared it (recorded, not acted on)
    # Device seconds the job has really used per stage, every attempt counted (the Director's
    # measurements; a lost attempt's work is spent too). None: nothing used yet.
    used_text_encoder_seconds: float | None = None
    used_denoiser_seconds: float | None = None
    used_vae_decoder_seconds: float | None = None

    @property
    def cost(self) -> StageSeconds:
        """Device seconds per stage, costed at submit (0 for a row that predates costs)."""
        return StageSeconds(self.text_encoder_seconds or 0.0, self.denoiser_seconds or 0.0,
                            self.vae_decoder_seconds or 0.0)

    @property
    def used(self) -> StageSeconds:
        """Device seconds used so far per stage, every attempt counted (its usage)."""
        return StageSeconds(self.used_text_encoder_seconds or 0.0, self.used_denoiser_seconds or 0.0,
                            self.used_vae_decoder_seconds or 0.0)
