"""`ditserve serve`, the README's run command: up, serving, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import requests

from conftest import _free_port


def test_serve_starts_serves_and_stops_cleanly(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own cluster, not the tests'
    env.update(DITSERVE_STORAGE__JOB_STORE_URL=f"sqlite:///{tmp_path}/jobs.db",
               DITSERVE_STORAGE__ARTIFACTS_URL=str(tmp_path / "artifacts"))
    process = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, "ditserve serve exited early"
            try:
                if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # up, but replicas still starting
                pass
            assert time.monotonic() < deadline, "not ready within 180 s"
            time.sleep(1)
        created = requests.post(f"{url}/v1/videos", json={"prompt": "a red fox", "seconds": "1", "size": "64x64",
                                                          "num_inference_steps": 2})
        assert created.status_code == 200, created.text
        video_id = created.json()["id"]
        while (status := requests.get(f"{url}/v1/videos/{video_id}").json()["status"]) in ("queued", "in_progress"):
            assert time.monotonic() < deadline + 120
            time.sleep(0.3)
        assert status == "completed"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0
    assert f"ditserve is serving 'tiny' at {url}" in out
    assert "client.videos.create_and_poll" in out  # the copy-paste example
