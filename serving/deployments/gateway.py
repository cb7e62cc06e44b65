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


class SharedAnswer:
    """An answer asked for at most once per `ttl_seconds`, however many callers want it: while
    the question is in flight, every caller awaits that one question."""

    def __init__(self, ask, ttl_seconds: float):
        self.ask, self.ttl = ask, ttl_seconds
        self.answer: tuple[float, object] | None = None  # (monotonic time, answer)
        self.asking: asyncio.Future | None = None

    async def get(self):
        if self.answer is not None and time.monotonic() - self.answer[0] <= self.ttl:
            return self.answer[1]
        if self.asking is None:
            self.asking = asyncio.ensure_future(self._refresh())
        # Shielded: a caller that gives up (its client hung up) cancels its own wait, not the question.
        return await asyncio.shield(self.asking)

    async def _refresh(self):
        try:
            found = await self.ask()
            self.answer = (time.monotonic(), found)
            return found
        finally:
            self.asking = None


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
        # One Director round trip per second at most, however many requests arrive; a missing
        # answer is remembered as long as a found one, so an outage does not stall every request.
        self.estimate = SharedAnswer(self._ask_estimate, ESTIMATE_TTL_SECONDS)

    async def _wake_director(self, _job_id: str) -> None:
        # Best effort: the Director also polls the store, so a lost wake-up only delays.
        self.director.wake.remote()

    async def _stages_ready(self) -> dict:
        return await self.director.ready.remote()

    async def _ask_estimate(self):
        from serving.admission import WaitEstimate

        try:
            return WaitEstimate(**await asyncio.wait_for(self.director.estimate.remote(), ESTIMATE_TIMEOUT_SECONDS))
        except Exception as exc:  # TimeoutError included
            logger.warning("no wait estimate from the Director (%s); going on without one", type(exc).__name__)
            return None

    def _rejected(self, reason: str) -> None:
        self.metrics.rejections.inc(tags={"reason": reason})

    def _ended(self, job, ending: str) -> None:
        self.metrics.count_usage(job, ending)

    def __serve_build_asgi_app__(self):
        from serving.api.app import create_api

        return create_api(self.config, self.jobs, on_submitted=self._wake_director, stages_ready=self._stages_ready,
                          estimate=self.estimate.get, on_rejected=self._rejected, on_ended=self._ended)
