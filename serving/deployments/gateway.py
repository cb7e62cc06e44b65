"""Gateway deployment: the HTTP ingress. It never runs a model: it validates requests,
records jobs, wakes the Director, and serves reads from the job and artifact stores."""

from __future__ import annotations

from ray import serve

from serving.config import ServiceConfig


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    def __init__(self, config: ServiceConfig, director):
        from serving.jobs.videos import VideoJobs

        self.config = config
        self.director = director
        self.jobs = VideoJobs(config)

    async def _wake_director(self, _job_id: str) -> None:
        # Best effort: the Director also polls the store, so a lost wake-up only delays.
        self.director.wake.remote()

    async def _stages_ready(self) -> dict[str, bool]:
        return await self.director.ready.remote()

    def __serve_build_asgi_app__(self):
        from serving.api.app import create_api

        return create_api(self.config, self.jobs, on_submitted=self._wake_director, stages_ready=self._stages_ready)
