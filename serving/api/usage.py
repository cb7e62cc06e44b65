"""GET /v1/usage: what a key's videos really cost, failures included.

Sums the usage ledger (serving/jobs/usage.py) over jobs that ended in the period: how many
completed, failed, were cancelled or deleted unfinished; the seconds of video delivered; the
accelerator-seconds spent per stage; and the accelerator-seconds per *completed* video,
the cost of a usable one. A key sees its own; an operator's key (`auth.keys[].operator`)
sees every key's; with auth off the service's owner sees everything.
"""

from __future__ import annotations

import asyncio
from typing import Literal, Optional

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from serving.api.context import APIContext, caller, context
from serving.api.videos import BAD_INPUT
from serving.auth import Caller
from serving.jobs.usage import ENDINGS, KeyUsage
from serving.metrics import ANONYMOUS_KEY

router = APIRouter(tags=["usage"])


class AcceleratorSeconds(BaseModel):
    text_encoder: float
    denoiser: float
    vae_decoder: float
    total: float


class KeyUsageView(BaseModel):
    key: str = Field(description=f"The API key's name ({ANONYMOUS_KEY!r}: videos made with auth off).")
    completed: int
    failed: int
    cancelled: int
    deleted: int = Field(description="Deleted before they ended; what they used is counted.")
    video_seconds: float = Field(description="Seconds of video delivered by completed jobs.")
    accelerator_seconds: AcceleratorSeconds
    accelerator_seconds_per_completed_video: Optional[float] = Field(
        description="Everything spent (failed, cancelled and deleted jobs included) per completed video.")


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    start_time: Optional[float] = None
    end_time: Optional[float] = None
    data: list[KeyUsageView]


def view(found: KeyUsage) -> KeyUsageView:
    seconds = found.accelerator_seconds
    per_video = found.per_completed_video
    return KeyUsageView(
        key=found.key or ANONYMOUS_KEY, **{ending: found.jobs.get(ending, 0) for ending in ENDINGS},
        video_seconds=round(found.video_seconds, 3),
        accelerator_seconds=AcceleratorSeconds(text_encoder=round(seconds.text_encoder, 3),
                                               denoiser=round(seconds.denoiser, 3),
                                               vae_decoder=round(seconds.vae_decoder, 3), total=round(seconds.total, 3)),
        accelerator_seconds_per_completed_video=round(per_video, 3) if per_video is not None else None)


@router.get("/v1/usage", response_model=UsageReport, responses=BAD_INPUT)
async def usage(start_time: Optional[float] = Query(default=None, ge=0, description="Unix time: jobs that ended "
                                                                                     "at or after it."),
                end_time: Optional[float] = Query(default=None, ge=0, description="Unix time: jobs that ended "
                                                                                   "before it (before start_time: an "
                                                                                   "empty period)."),
                ctx: APIContext = Depends(context), who: Caller | None = Depends(caller)):
    everyone = who is None or who.operator
    found = await asyncio.to_thread(ctx.jobs.store.usage_by_key, who.name if who is not None else None,
                                    all_keys=everyone, start=start_time, end=end_time)
    return UsageReport(start_time=start_time, end_time=end_time, data=[view(k) for k in found])
