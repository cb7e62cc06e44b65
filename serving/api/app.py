"""The Gateway's HTTP app, assembled from its route families.

Each family is a module of plain handlers on an `APIRouter`, taking the service and the
caller's key as dependencies (serving/api/context.py):

- videos.py: the OpenAI Videos API (create, list, retrieve, delete, cancel, content, events)
- sync.py:   POST /v1/videos/sync, answered with the MP4 (peers' benchmark clients)
- tasks.py:  the task-style routes hosted video APIs use (generations, tasks/{id})
- usage.py:  GET /v1/usage, accelerator-seconds per key
- models.py: GET /v1/models, the model served
- health.py: /healthz and /readyz

Errors leave in OpenAI's envelope, naming the field (errors.py); the API describes itself
with the limits the config sets (openapi.py).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import FastAPI

from serving.admission import WaitEstimate
from serving.api import health, models, sync, tasks, usage, videos
from serving.api.context import APIContext
from serving.api.errors import install_error_handlers
from serving.api.openapi import describe, docs_urls
from serving.api.schemas import ErrorEnvelope
from serving.config import ServiceConfig
from serving.jobs.records import JobRecord
from serving.jobs.videos import VideoJobs

KEY_REFUSALS = {401: {"model": ErrorEnvelope, "description": "Missing or unknown API key."},
                429: {"model": ErrorEnvelope, "description": "Over the key's rate or job quota; see Retry-After."}}


def create_api(config: ServiceConfig, jobs: VideoJobs,
               on_submitted: Callable[[str], Awaitable[Any]] | None = None,
               stages_ready: Callable[[], Awaitable[dict]] | None = None,
               estimate: Callable[[], Awaitable[WaitEstimate | None]] | None = None,
               on_rejected: Callable[[str], None] | None = None,
               on_ended: Callable[[JobRecord, str], None] | None = None) -> FastAPI:
    """The API over `jobs`. The callables connect it to the rest of the service (the
    Director's wake-up, readiness and wait estimate; the metrics)."""
    app = FastAPI(title="ditserve", version="0.1.0",
                  description="OpenAI-compatible Videos API for self-hosted text-to-video models, with task-style "
                              "routes, a synchronous route and usage per API key.", **docs_urls(config))
    app.state.context = ctx = APIContext(config, jobs, on_submitted=on_submitted, stages_ready=stages_ready,
                                         estimate=estimate, on_rejected=on_rejected, on_ended=on_ended)
    install_error_handlers(app)
    keyed = KEY_REFUSALS if ctx.keys.enabled else {}
    for family in (videos, sync, tasks, usage, models):
        app.include_router(family.router, responses=keyed)
    app.include_router(health.router)
    describe(app, config)
    return app
