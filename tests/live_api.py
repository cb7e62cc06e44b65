"""The Gateway's app alone, served by uvicorn on 127.0.0.1 in a thread: real HTTP over a real
SQLite file (or Postgres) and a real artifact folder, no Ray. Tests that play the Director do
so through the job store's own driver API (claim, update)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from serving.api.app import create_api
from serving.config import ServiceConfig, load_config
from serving.jobs.records import JobStatus
from serving.jobs.videos import VideoJobs

DRIVER = "test-driver"


@dataclass
class LiveAPI:
    url: str
    config: ServiceConfig
    jobs: VideoJobs

    def finish(self, video_id: str, data: bytes) -> None:
        """Complete a queued job with `data` as its MP4, as a Director would."""
        store = self.jobs.store
        assert any(job.id == video_id for job in store.claim(DRIVER, 60, 100))
        key = self.jobs.artifacts.put(f"{video_id}/video.mp4", data)
        store.update(video_id, DRIVER, status=JobStatus.COMPLETED, progress=100, video_key=key,
                     completed_at=time.time())


def config_for(tmp_path: Path, **env: str) -> ServiceConfig:
    environ = {"DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{tmp_path}/jobs.db",
               "DITSERVE_STORAGE__ARTIFACTS_URL": str(tmp_path / "artifacts")}
    environ.update({f"DITSERVE_{name.upper()}": value for name, value in env.items()})
    return load_config(None, environ=environ)


@contextlib.contextmanager
def live_api(config: ServiceConfig, estimate=None):
    """`estimate`: the Director's wait estimate, when the test plays the Director (see create_api)."""
    jobs = VideoJobs(config)
    server = uvicorn.Server(uvicorn.Config(create_api(config, jobs, estimate=estimate), log_level="warning",
                                           lifespan="off"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    try:
        yield LiveAPI(f"http://127.0.0.1:{sock.getsockname()[1]}", config, jobs)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        jobs.store.close()
