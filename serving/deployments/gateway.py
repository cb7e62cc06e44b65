"""Gateway deployment: the HTTP ingress. It never runs a model: it validates requests,
records jobs, wakes the Director, and serves reads from the job and artifact stores."""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from serving.config import ServiceConfig


logger = logging.getLogger("ray.serve")

ESTIMATE_TTL_SECONDS = 1.0
# With no Director (its node is being replaced) a call would wait for a new one, holding every
# create and queued-job read with it; the store needs no Director, so answer without an estimate.
# Generous, so a Director merely busy under a burst still answers and admission keeps working.
ESTIMATE_TIMEOUT_SECONDS = 5.0


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    def __init__(self, config: ServiceConfig, director):
        from serving.jobs.videos import VideoJobs

        from serving.metrics import metrics

        self.config = config
        self.director = director
        self.jobs = VideoJobs(config)
        self.metrics = metrics()
        self.cached_estimate: tuple[float, object] | None = None

    async def _wake_director(self, _job_id: str) -> None:
        # Best effort: the Director also polls the store, so a lost wake-up only delays.
        self.director.wake.remote()

    async def _stages_ready(self) -> dict[str, bool]:
        return await self.director.ready.remote()

    async def _estimate(self):
        # One Director round trip per second at most, however many requests arrive; a missing
        # answer is remembered as long as a found one, so an outage does not stall every request.
        from serving.admission import WaitEstimate

        now = time.monotonic()
        if self.cached_estimate is None or now - self.cached_estimate[0] > ESTIMATE_TTL_SECONDS:
            try:
                found = WaitEstimate(**await asyncio.wait_for(self._ask_estimate(), ESTIMATE_TIMEOUT_SECONDS))
            except Exception as exc:  # TimeoutError included
                logger.warning("no wait estimate from the Director (%s); going on without one", type(exc).__name__)
                found = None
            self.cached_estimate = (time.monotonic(), found)
        return self.cached_estimate[1]

    async def _ask_estimate(self) -> dict:
        return await self.director.estimate.remote()

    def _rejected(self, reason: str) -> None:
        self.metrics.rejections.inc(tags={"reason": reason})

    def __serve_build_asgi_app__(self):
        from serving.api.app import create_api

        return create_api(self.config, self.jobs, on_submitted=self._wake_director, stages_ready=self._stages_ready,
                          estimate=self._estimate, on_rejected=self._rejected)
