"""`ditserve serve`, the README's run command: up, serving, and a clean stop on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time

import requests

from conftest import _free_port, start_serve


def test_serve_starts_serves_and_stops_cleanly(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_serve(tmp_path, port)
    try:
        deadline = time.monotonic() + 120
        created = requests.post(f"{url}/v1/videos", json={"prompt": "a red fox", "seconds": "1", "size": "64x64",
                                                          "num_inference_steps": 2})
        assert created.status_code == 200, created.text
        video_id = created.json()["id"]
        while (status := requests.get(f"{url}/v1/videos/{video_id}").json()["status"]) in ("queued", "in_progress"):
            assert time.monotonic() < deadline
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


def test_the_banner_never_shows_the_job_store_password():
    from serving.cli_serve import banner
    from serving.config import load_config

    config = load_config(None, environ={
        "DITSERVE_STORAGE__JOB_STORE_URL": "postgresql+psycopg://ditserve:s3cret-pw@127.0.0.1:5432/jobs"})
    shown = banner(config, "http://127.0.0.1:8001/metrics")
    assert "s3cret-pw" not in shown
    assert "postgresql+psycopg://ditserve:***@127.0.0.1:5432/jobs" in shown


def test_the_banners_examples_send_a_first_frame_to_an_image_to_video_model():
    from serving.cli_serve import banner
    from serving.config import load_config

    i2v = banner(load_config(None, environ={"DITSERVE_MODEL__PRESET": "tiny-i2v"}), "http://127.0.0.1:8001/metrics")
    assert "-F input_reference=@frame.png" in i2v and 'input_reference=open("frame.png", "rb")' in i2v
    t2v = banner(load_config(None, environ={}), "http://127.0.0.1:8001/metrics")
    assert "input_reference" not in t2v and "Content-Type: application/json" in t2v


def test_a_look_back_shorter_than_serves_metric_push_is_refused_in_one_line(tmp_path):
    """Serve averages pushed metrics over the look-back; one shorter than the push period may
    hold none (Serve warns today and will refuse). `serve` says which field, and exits 2."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(DITSERVE_STORAGE__JOB_STORE_URL=f"sqlite:///{tmp_path}/jobs.db",
               DITSERVE_STORAGE__ARTIFACTS_URL=str(tmp_path / "artifacts"),
               DITSERVE_STAGES__DENOISER="{num_cpus: 0.1, autoscaling: {look_back_period_s: 5}}")
    done = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--port", str(_free_port()),
                           "--metrics-port", str(_free_port())], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    assert ("ditserve serve: error: stages.denoiser.autoscaling.look_back_period_s (5 s) must be longer than the "
            "period Serve's replicas push autoscaling metrics at (10 s") in done.stderr
    assert "Traceback" not in done.stderr
