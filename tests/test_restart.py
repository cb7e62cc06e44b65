"""The whole service stopped and started again on the same job store and artifact store:
queued and running jobs all complete, none twice, and finished videos are still there."""

from __future__ import annotations

import signal
import time

import requests

from conftest import _free_port, start_serve


def stop(process):
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)  # drains stdout (the banner) while it stops
    assert process.returncode == 0


def test_stop_and_start_loses_and_repeats_nothing(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    quick = {"prompt": "finished before the restart", "seconds": "1", "size": "64x64", "num_inference_steps": 2}
    slow = {"prompt": "running at the restart", "seconds": "1", "size": "128x128", "num_inference_steps": 100}

    server = start_serve(tmp_path, port, DITSERVE_SERVER__LEASE_SECONDS="5")
    try:
        done_id = requests.post(f"{url}/v1/videos", json=quick).json()["id"]
        while requests.get(f"{url}/v1/videos/{done_id}").json()["status"] != "completed":
            time.sleep(0.2)
        before = requests.get(f"{url}/v1/videos/{done_id}/content").content
        pending = [requests.post(f"{url}/v1/videos", json=slow).json()["id"] for _ in range(3)]
        while requests.get(f"{url}/v1/videos/{pending[0]}").json()["progress"] < 20:  # one is mid-denoise
            time.sleep(0.2)
    finally:
        stop(server)

    server = start_serve(tmp_path, port, DITSERVE_SERVER__LEASE_SECONDS="5")
    try:
        deadline = time.monotonic() + 300
        while True:
            videos = [requests.get(f"{url}/v1/videos/{i}").json() for i in pending]
            if all(v["status"] in ("completed", "failed") for v in videos):
                break
            assert time.monotonic() < deadline, [v["status"] for v in videos]
            time.sleep(0.5)
        assert [v["status"] for v in videos] == ["completed"] * 3
        listed = requests.get(f"{url}/v1/videos", params={"limit": 100}).json()["data"]
        assert sorted(v["id"] for v in listed) == sorted([done_id, *pending])  # nothing duplicated
        assert requests.get(f"{url}/v1/videos/{done_id}/content").content == before  # nothing lost
        for video_id in pending:
            assert len(requests.get(f"{url}/v1/videos/{video_id}/content").content) > 0
    finally:
        stop(server)
