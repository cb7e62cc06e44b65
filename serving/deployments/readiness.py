"""What the Director tells /readyz: whether each stage can take work, and what each live
Denoiser replica runs.

A stage is pinged through its handle. A ping is a call like any other, so Serve's router
holds it while every replica of the stage has `max_ongoing_requests` calls (all Denoiser slots
taken at peak): a ping that times out then asks Serve's controller whether the stage has a
RUNNING replica, one that passes its health checks. Busy is ready; only a stage with no healthy
replica is down. The controller is asked on a thread of its own, at most every
`SERVE_VIEW_SECONDS` and never waited on for more than `SERVE_VIEW_TIMEOUT_SECONDS`, so a
controller slow at peak holds neither /readyz nor the Director's other threads.

Each Denoiser replica reports what it runs every `DENOISER_REPORT_SECONDS`; a replica that
stops says so (its `__del__`), and a crashed one's report lapses after three periods.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from serving.deployments.denoiser import DENOISER_REPORT_SECONDS

logger = logging.getLogger("ray.serve")

PING_SECONDS = 5.0  # longest a stage's ping is waited for before Serve's controller is asked
SERVE_VIEW_SECONDS = 5.0  # how long one answer of the controller is reused
SERVE_VIEW_TIMEOUT_SECONDS = 2.0
REPORT_LAPSE_SECONDS = 3 * DENOISER_REPORT_SECONDS


def _running_replicas(app: str) -> dict[str, int]:
    """RUNNING replicas (passing their health checks) per deployment of `app`, as Serve's controller says."""
    status = serve.status().applications[app]
    return {name: deployment.replica_states.get("RUNNING", 0) for name, deployment in status.deployments.items()}


class Readiness:
    def __init__(self, app: str, stages: dict, metrics):
        self.app, self.stages, self.metrics = app, stages, metrics  # stages: name -> handle
        self.reports: dict[str, tuple[float, dict]] = {}  # Denoiser replica -> (monotonic, what it runs)
        self.stopped: dict[str, float] = {}  # replica -> when it said it stops: a late report is not taken back
        self._serve_view: tuple[float, dict[str, int]] | None = None
        self._serve_view_lock = asyncio.Lock()
        self._asking: asyncio.Future | None = None
        self._controller_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve-view")

    def note_denoiser(self, replica: str, report: dict) -> None:
        if replica not in self.stopped:
            self.reports[replica] = (time.monotonic(), report)

    def forget_denoiser(self, replica: str) -> None:
        self.reports.pop(replica, None)
        self.stopped[replica] = time.monotonic()

    async def ready(self) -> dict:
        now = time.monotonic()
        self.reports = {name: entry for name, entry in self.reports.items() if now - entry[0] <= REPORT_LAPSE_SECONDS}
        self.stopped = {name: at for name, at in self.stopped.items() if now - at <= REPORT_LAPSE_SECONDS}
        denoisers = [{"replica": name, **report} for name, (_, report) in sorted(self.reports.items())]
        results = await asyncio.gather(*(self._ping(stage, handle) for stage, handle in self.stages.items()))
        return {"checks": dict(zip(self.stages, results)), "denoisers": denoisers}

    async def _ping(self, stage: str, handle) -> bool:
        # Timed and told apart, so a stage called down can be traced to a slow answer or an
        # error (ditserve_readiness_ping_seconds).
        started, answer, outcome = time.monotonic(), False, "error"
        try:
            answer = bool(await asyncio.wait_for(handle.ping.remote(), timeout=PING_SECONDS))
            outcome = "ok" if answer else "false"
        except asyncio.TimeoutError:
            outcome = "timeout"
            if (await self._running()).get(handle.deployment_name, 0) > 0:
                answer, outcome = True, "busy"
            else:
                logger.warning("readiness: %s did not answer in %.0f s and Serve runs no healthy replica of it",
                               stage, PING_SECONDS)
        except Exception as exc:
            logger.warning("readiness ping to %s failed: %r", stage, exc)
        self.metrics.readiness_ping.observe(time.monotonic() - started, tags={"stage": stage, "outcome": outcome})
        return answer

    async def _running(self) -> dict[str, int]:
        """Serve's RUNNING replicas per deployment, at most `SERVE_VIEW_SECONDS` old; {} when the
        controller does not answer in time (no proof of a working stage)."""
        async with self._serve_view_lock:
            now = time.monotonic()
            if self._serve_view is None or now - self._serve_view[0] > SERVE_VIEW_SECONDS:
                if self._asking is None or self._asking.done():  # a question still unanswered is waited for again
                    self._asking = asyncio.get_running_loop().run_in_executor(
                        self._controller_thread, _running_replicas, self.app)
                try:
                    answer = await asyncio.wait_for(asyncio.shield(self._asking), SERVE_VIEW_TIMEOUT_SECONDS)
                    self._serve_view = (now, answer)
                except Exception as exc:  # slow or unreachable: the next /readyz asks again
                    logger.warning("readiness: Serve's controller did not say which replicas run (%r)", exc)
                    return {}
            return self._serve_view[1]
