"""Liveness and readiness: /healthz answers while the process serves; /readyz says whether
the job store and every stage answer, and what each Denoiser replica runs."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from serving.api.context import APIContext, context

router = APIRouter(tags=["health"])

READY_TIMEOUT_SECONDS = 10


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: `checks` says which of the job store and the "
                                                     "stages did not answer."}})
async def readyz(ctx: APIContext = Depends(context)):
    checks: dict[str, bool] = {}
    denoisers: list[dict] = []  # per live Denoiser replica: its attention backend and why
    try:
        await asyncio.to_thread(ctx.jobs.ping)
        checks["storage"] = True
    except Exception:
        checks["storage"] = False
    if ctx.stages_ready is not None:
        try:
            stages = await asyncio.wait_for(ctx.stages_ready(), timeout=READY_TIMEOUT_SECONDS)
            checks.update(stages["checks"])
            denoisers = stages["denoisers"]
        except Exception:
            checks["stages"] = False
    ready = all(checks.values())
    simulation = ctx.config.simulation.model_dump() if ctx.simulated else False
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks, "denoisers": denoisers,
                         "simulated": simulation}, status_code=200 if ready else 503)
