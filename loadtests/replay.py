"""Replay a fixed arrival schedule against a ditserve URL and follow every accepted job to its end.

Open loop, as users at peak hour: each job is submitted at its own offset whatever the service
does (submissions run on a small pool, so a slow answer never delays the next arrival); a 429
is recorded as a rejection and not retried. Jobs are followed through the list endpoint (a few
requests per round for all of them, instead of one poll per job: with 16+ replicas on 2 cores
the load test must not be the load), into the same `JobLog` the Locust runner fills. Queue
waits come from each job's own timestamps, so the polling period never blurs them.
`JobFollower` is that follower on its own, for the closed loop of loadtests/ceiling.py too.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import requests

from loadtests.report import TERMINAL, JobLog

SUBMITTERS = 8
PAGE = 100


class JobFollower:
    """Follows the accepted jobs of `log` through the list endpoint, in a background thread
    between `start()` and `stop()`, recording each one's end (`JobLog.finished`) and handing
    its video object to `on_ended`. The caller adds a job's row under `lock` before following it."""

    def __init__(self, url: str, session: requests.Session, log: JobLog, lock: threading.Lock, poll_s: float,
                 on_ended: Callable[[dict], None] | None = None):
        self.url, self.session, self.log, self.lock, self.poll_s = url, session, log, lock, poll_s
        self.on_ended = on_ended
        self._cursor: str | None = None  # every job up to it is recorded as ended
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="job-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """One last round, then stop."""
        self._done.set()
        self._thread.join(timeout=30)

    def _follow(self) -> None:
        while True:
            finished = self._done.is_set()
            try:
                self._read_ended()
            except (requests.RequestException, ValueError, KeyError):
                pass  # a transient error: the next round reads again
            if finished:
                return
            self._done.wait(self.poll_s)

    def _read_ended(self) -> None:
        """Record every job that has ended; move the cursor over the leading run of recorded ones."""
        after, contiguous = self._cursor, True
        while True:
            params = {"order": "asc", "limit": PAGE, **({"after": after} if after else {})}
            page = self.session.get(f"{self.url}/v1/videos", params=params, timeout=30)
            page.raise_for_status()
            body = page.json()
            for video in body["data"]:
                row = self.log.rows.get(video["id"])
                ended = row is not None and video["status"] in TERMINAL
                if ended and row.outcome == "unfinished":
                    with self.lock:
                        self.log.finished(video, 0)
                    if self.on_ended is not None:
                        self.on_ended(video)
                contiguous = contiguous and ended
                if contiguous:
                    self._cursor = video["id"]
                after = video["id"]
            if not body["has_more"]:
                return


class Replay:
    def __init__(self, url: str, body: dict, log: JobLog, poll_s: float):
        self.url, self.body, self.log, self.poll_s = url, body, log, poll_s
        self._session = requests.Session()
        self._lock = threading.Lock()  # the submitters add rows while others count them

    def run(self, offsets_s: list[float], drain_timeout_s: float, progress_every_s: float = 10.0) -> None:
        """Submit at `offsets_s` (seconds after now, this machine's clock), then wait for every
        accepted job to end, at most `drain_timeout_s` after the last submission."""
        start = self.log.started_at
        follower = JobFollower(self.url, self._session, self.log, self._lock, self.poll_s)
        follower.start()
        next_progress = time.time() + progress_every_s
        with ThreadPoolExecutor(SUBMITTERS, thread_name_prefix="replay-submit") as pool:
            for index, offset in enumerate(offsets_s):
                while (wait := start + offset - time.time()) > 0:
                    time.sleep(min(wait, 0.5))
                    if time.time() >= next_progress:
                        self._progress("replaying")
                        next_progress += progress_every_s
                pool.submit(self._submit, index)
        deadline = time.time() + drain_timeout_s
        while self._outstanding() and time.time() < deadline:
            time.sleep(min(1.0, progress_every_s))
            if time.time() >= next_progress:
                self._progress("draining")
                next_progress += progress_every_s
        follower.stop()
        self._progress("done")

    def _submit(self, index: int) -> None:
        submitted = time.time()
        body = {**self.body, "prompt": f"{self.body['prompt']} (take {index})"}
        try:
            response = self._session.post(f"{self.url}/v1/videos", json=body, timeout=60)
        except requests.RequestException:
            with self._lock:
                self.log.create_failed(submitted, 0)
            return
        with self._lock:
            if response.status_code == 429:
                self.log.rejected(submitted, float(response.headers.get("Retry-After", "0")))
            elif response.status_code != 200:
                self.log.create_failed(submitted, response.status_code)
            else:
                self.log.accepted(response.json()["id"], submitted)

    def _outstanding(self) -> int:
        with self._lock:
            return self.log.outstanding

    def _progress(self, phase: str) -> None:
        with self._lock:
            rows, outstanding = self.log.all_rows(), self.log.outstanding
        count = lambda outcome: sum(1 for r in rows if r.outcome == outcome)  # noqa: E731
        print(f"experiment: {phase}: submitted {len(rows)}, completed {count('completed')}, "
              f"in flight {outstanding}, rejected {count('rejected_429')}, failed {count('failed')}",
              file=sys.stderr, flush=True)
