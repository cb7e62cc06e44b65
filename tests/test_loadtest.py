"""A CI-sized peak-hour run of `ditserve loadtest` against the live local cluster: the report
is complete and every accepted job completed."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from PIL import Image

SUMMARY_KEYS = {"completed", "failed", "rejected_429", "throughput_jobs_per_min", "queue_wait_p50_s",
                "queue_wait_p95_s", "queue_wait_p99_s", "latency_p95_s"}


def test_peak_hour_smoke_run(service, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "loadtest", "--url", service.url, "--profile", "peak-hour",
         "--minutes", "1", "--rate", "10", "--out", str(out), "--metrics-url", service.metrics_url],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loadtest: 5/60 s" in result.stderr  # progress is shown while it runs

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["submitted"] >= 10  # 1 minute at 10/min quiet and 40/min at peak
    assert summary["accepted"] == summary["completed"]  # every accepted job completed
    assert summary["failed"] == 0 and summary["unfinished"] == 0 and summary["create_errors"] == 0
    assert summary["throughput_jobs_per_min"] > 0
    assert 0 <= summary["queue_wait_p50_s"] <= summary["queue_wait_p95_s"] <= summary["queue_wait_p99_s"]
    assert summary["denoiser_replicas_max"] >= 1

    with open(out / "jobs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == summary["submitted"]
    completed = [r for r in rows if r["outcome"] == "completed"]
    assert len(completed) == summary["completed"]
    assert all(float(r["queue_wait_denoiser_s"]) >= 0 and float(r["latency_s"]) > 0
               and int(r["bytes_downloaded"]) > 0 for r in completed)
    # The cost of a usable video, from the service's own usage figures of every job.
    spent = sum(float(r["accelerator_seconds"]) for r in rows if r["accelerator_seconds"])
    assert summary["accelerator_seconds_per_completed_video"] > 0
    assert summary["accelerator_seconds_per_completed_video"] == round(spent / summary["completed"], 3)

    for name in ("queue_wait.png", "latency_cdf.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] >= 600


FOLLOW = """
import sys
import gevent  # first: Locust patches the standard library (it must come before requests)
from locust.env import Environment
from loadtests.locustfile import VideoUser
from loadtests.report import JobLog

url, jobs = sys.argv[1], sys.argv[2:]
VideoUser.host, VideoUser.log = url, JobLog(started_at=0.0)
for job in jobs:
    VideoUser.log.accepted(job, 0.0)
user = VideoUser(Environment(user_classes=[VideoUser]))
follows = [gevent.spawn(user.follow, job, 10) for job in jobs]
gevent.joinall(follows, timeout=30)
assert all(follow.dead for follow in follows), "a follow is still polling"
print(" ".join(VideoUser.log.rows[job].outcome for job in jobs))
"""


def test_a_followed_job_that_ends_without_completing_ends_the_follow(tmp_path):
    """A Locust user stops following a job that ended without completing: cancelled (the API
    shows it as failed, as OpenAI's does) or deleted (a 404, which it used to poll forever)."""
    import requests

    from live_api import config_for, live_api

    with live_api(config_for(tmp_path)) as api:
        body = {"prompt": "a red circle", "seconds": "1", "size": "64x64"}
        cancelled, deleted = (requests.post(f"{api.url}/v1/videos", json=body, timeout=30).json()["id"] for _ in range(2))
        assert requests.post(f"{api.url}/v1/videos/{cancelled}/cancel", timeout=30).status_code == 200
        assert requests.delete(f"{api.url}/v1/videos/{deleted}", timeout=30).status_code in (200, 202)
        result = subprocess.run([sys.executable, "-c", FOLLOW, api.url, cancelled, deleted],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["failed", "gone"]
