"""A real Prometheus scrapes the running app and answers the p95 queue wait per stage."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import requests

from conftest import _free_port

STAGES = ("text_encoder", "denoiser", "vae_decoder")
P95_QUEUE_WAIT = ('histogram_quantile(0.95, sum by (le, stage) '
                  '(rate(ray_ditserve_queue_wait_seconds_bucket[1m])))')


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: .ci/run must install Debian's prometheus")
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


@pytest.fixture
def prometheus(service, tmp_path):
    from loadtests.prometheus import Prometheus

    binary("prometheus")  # skips without it
    server = Prometheus(tmp_path / "prometheus", [service.metrics_url], scrape_s=1, port=_free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def query(url: str, expr: str) -> list[dict]:
    body = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_reports_p95_queue_wait_per_stage(service, prometheus):
    client = service.client()
    deadline = time.monotonic() + 150
    p95: dict[str, float] = {}
    # Keep jobs flowing until Prometheus has two scrapes of rising histograms for every stage.
    while time.monotonic() < deadline:
        video = client.videos.create_and_poll(prompt="metrics", seconds="1", size="64x64",
                                              extra_body={"num_inference_steps": 2}, poll_interval_ms=100)
        assert video.status == "completed"
        p95 = {r["metric"]["stage"]: float(r["value"][1]) for r in query(prometheus, P95_QUEUE_WAIT)
               if r["value"][1] not in ("NaN", "+Inf")}
        if set(STAGES) <= set(p95):
            break
        time.sleep(1)
    assert set(STAGES) <= set(p95), f"no p95 for every stage: {p95}"
    # Plausible: non-negative and well under a minute on an idle tiny service. (No ordering
    # between stages: bucket interpolation over series exported at different moments can
    # put an earlier stage's p95 above a later one's by a fraction of a bucket.)
    assert all(0 <= p95[s] < 60 for s in STAGES), p95

    # The other series are scraped too.
    for name in ("ray_ditserve_job_latency_seconds_bucket", "ray_ditserve_denoise_step_seconds_bucket",
                 "ray_ditserve_denoise_batch_size_bucket", "ray_ditserve_jobs",
                 "ray_ditserve_accelerator_seconds_per_job_bucket"):
        deadline = time.monotonic() + 60
        while not query(prometheus, name):
            assert time.monotonic() < deadline, f"{name} never reached Prometheus"
            time.sleep(1)
    completed = query(prometheus, 'ray_ditserve_jobs{state="completed", application="ditserve"}')
    assert float(completed[0]["value"][1]) >= 1

    # Every dashboard query is valid PromQL against the real series, and the main ones have data.
    from test_monitoring_files import dashboard_queries

    queries = dashboard_queries()
    for title, exprs in queries.items():
        for expr in exprs:
            query(prometheus, expr.replace("$application", "ditserve"))
    for title in ("Queue wait p95 by stage (submitted → stage start)", "Healthy replicas per deployment",
                  "Jobs by state"):
        assert query(prometheus, queries[title][0].replace("$application", "ditserve")), title
