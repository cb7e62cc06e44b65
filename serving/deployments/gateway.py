"""Gateway deployment: the HTTP ingress. It never runs a model: it validates requests,
records jobs, wakes the Director, and serves reads from the job and artifact stores."""

from __future__ import annotations

import time

from ray import serve

from serving.config import ServiceConfig


ESTIMATE_TTL_SECONDS = 1.0


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
        # One Director round trip per second at most, however many requests arrive.
        from serving.admission import WaitEstimate

        now = time.monotonic()
        if self.cached_estimate is None or now - self.cached_estimate[0] > ESTIMATE_TTL_SECONDS:
            self.cached_estimate = (now, WaitEstimate(**await self.director.estimate.remote()))
        return self.cached_estimate[1]

    def _rejected(self, reason: str) -> None:
        self.metrics.rejections.inc(tags={"reason": reason})

    def __serve_build_asgi_app__(self):
        from serving.api.app import create_api

        return create_api(self.config, self.jobs, on_submitted=self._wake_director, stages_ready=self._stages_ready,
                          estimate=self._estimate, on_rejected=self._rejected)
