"""The closed loop of `ditserve loadtest ceiling` (loadtests/ceiling.py): N clients, each with one
job in flight (submit, follow it to its end through replay.py's `JobFollower`, submit the next)."""

from __future__ import annotations

import threading
import time

import requests

from loadtests.replay import JobFollower
from loadtests.report import JobLog


class ClosedLoop:
    """`clients` users, each with one job in flight: submit, follow it to its end, submit the next.
    `timestamps` holds every ended job's own timestamps, by id (only the jobs submitted here)."""

    def __init__(self, url: str, body: dict, clients: int, log: JobLog, poll_s: float):
        self.url, self.body, self.clients, self.log, self.poll_s = url, body, clients, log, poll_s
        self.timestamps: dict[str, dict[str, float]] = {}
        self._session = requests.Session()
        self._lock = threading.Lock()  # clients add rows while the follower records ends
        self._ended: dict[str, threading.Event] = {}

    def run(self, stagger_s: float, duration_s: float, drain_timeout_s: float) -> None:
        """Client i submits first at i/clients of `stagger_s` after `log.started_at`, and again
        after each end until `duration_s` has passed; jobs in flight then have `drain_timeout_s`."""
        start = self.log.started_at
        stop_at, deadline = start + duration_s, start + duration_s + drain_timeout_s
        follower = JobFollower(self.url, self._session, self.log, self._lock, self.poll_s, self._on_ended)
        follower.start()
        clients = [threading.Thread(target=self._client, args=(i, start + stagger_s * i / self.clients, stop_at,
                                                               deadline), name=f"ceiling-client-{i}", daemon=True)
                   for i in range(self.clients)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        follower.stop()

    def _client(self, index: int, first_at: float, stop_at: float, deadline: float) -> None:
        time.sleep(max(0.0, first_at - time.time()))
        take = 0
        while time.time() < (deadline if take == 0 else stop_at):  # every client runs at least one job
            job_id, retry_after = self._submit(f"{self.body['prompt']} (client {index}, take {take})")
            if job_id is None:
                time.sleep(retry_after)
                continue
            take += 1
            if not self._ended[job_id].wait(max(0.0, deadline - time.time())):
                return  # past the drain deadline: the job stays "unfinished" in the log

    def _submit(self, prompt: str) -> tuple[str | None, float]:
        """The new job's id, or None and how long to wait before trying again."""
        submitted = time.time()
        try:
            response = self._session.post(f"{self.url}/v1/videos", json={**self.body, "prompt": prompt}, timeout=60)
        except requests.RequestException:
            with self._lock:
                self.log.create_failed(submitted, 0)
            return None, self.poll_s
        with self._lock:
            if response.status_code == 429:
                retry_after = float(response.headers.get("Retry-After", "0"))
                self.log.rejected(submitted, retry_after)
                return None, max(retry_after, self.poll_s)
            if response.status_code != 200:
                self.log.create_failed(submitted, response.status_code)
                return None, self.poll_s
            job_id = response.json()["id"]
            self._ended[job_id] = threading.Event()  # before the row: the follower looks for rows
            self.log.accepted(job_id, submitted)
            return job_id, 0.0

    def _on_ended(self, video: dict) -> None:
        self.timestamps[video["id"]] = dict(video.get("timestamps") or {})
        self._ended[video["id"]].set()
