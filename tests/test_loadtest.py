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

    for name in ("queue_wait.png", "latency_cdf.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] >= 600
