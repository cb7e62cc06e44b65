"""The Locust user: submits a video job at Poisson intervals, then follows each job the way
a client should (polling as `openai-poll-after-ms` asks, waiting out `Retry-After`) and
downloads the MP4. Every job's outcome goes to the shared `JobLog`."""

from __future__ import annotations

import random
import time

import gevent
from locust import HttpUser, task

from loadtests.report import TERMINAL, JobLog


class VideoUser(HttpUser):
    # Set by the runner before the test starts.
    per_user_interval_s: float = 10.0
    body: dict = {}
    log: JobLog | None = None
    api_key: str | None = None  # sent as `Authorization: Bearer` when the service has auth on

    def on_start(self) -> None:
        if self.api_key:
            self.client.headers["Authorization"] = f"Bearer {self.api_key}"

    def wait_time(self) -> float:
        return random.expovariate(1.0 / self.per_user_interval_s)

    @task
    def submit(self) -> None:
        submitted = time.time()
        with self.client.post("/v1/videos", json=self.body, name="POST /v1/videos", catch_response=True) as response:
            if response.status_code == 429:
                response.success()  # admission control doing its job: recorded, not an error
                self.log.rejected(submitted, float(response.headers.get("Retry-After", "0")))
                return
            if response.status_code != 200:
                response.failure(f"create answered {response.status_code}: {response.text[:200]}")
                self.log.create_failed(submitted, response.status_code)
                return
            video = response.json()
        self.log.accepted(video["id"], submitted)
        gevent.spawn(self.follow, video["id"], int(response.headers.get("openai-poll-after-ms", "1000")))

    def follow(self, video_id: str, poll_ms: int) -> None:
        while True:
            gevent.sleep(poll_ms / 1000)
            response = self.client.get(f"/v1/videos/{video_id}", name="GET /v1/videos/{id}")
            if response.status_code == 404:  # deleted meanwhile: nothing more will happen to it
                self.log.gone(video_id)
                return
            if response.status_code != 200:
                continue  # a transient error: keep following the job
            video = response.json()
            poll_ms = int(response.headers.get("openai-poll-after-ms", poll_ms))
            if video["status"] in TERMINAL:
                break
        downloaded = 0
        if video["status"] == "completed":
            content = self.client.get(f"/v1/videos/{video_id}/content", name="GET /v1/videos/{id}/content")
            downloaded = len(content.content) if content.status_code == 200 else 0
        self.log.finished(video, downloaded)
