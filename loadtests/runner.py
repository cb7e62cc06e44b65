"""Run a load profile headless against a ditserve URL and write the report.

    ditserve loadtest --url http://127.0.0.1:8000 --profile peak-hour --minutes 2 --out report/

Talks to the service over HTTP only: the API for jobs, and (optionally) the Prometheus
endpoint for the Denoiser replica count over time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# Locust patches the standard library for gevent; it must come before anything networked.
from locust import events  # noqa: F401  (imported for its monkey-patching side effect)
from locust.env import Environment

import gevent
import requests

from loadtests.locustfile import VideoUser
from loadtests.profiles import BASE_USERS, ArrivalShape
from loadtests.report import JobLog, write_report

DRAIN_TIMEOUT_S = 600
SAMPLE_EVERY_S = 2.0


def denoiser_replicas(metrics_url: str, application: str) -> float | None:
    """Healthy Denoiser replicas, from Ray's Prometheus endpoint (None if unreachable)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = requests.get(metrics_url, timeout=5).text
    except requests.RequestException:
        return None
    total, seen = 0.0, False
    for family in text_string_to_metric_families(text):
        if family.name != "ray_serve_deployment_replica_healthy":
            continue
        for sample in family.samples:
            if sample.labels.get("deployment") == "Denoiser" and sample.labels.get("application") == application:
                total, seen = total + sample.value, True
    return total if seen else None


def run(url: str, profile: str, minutes: float, out: Path, rate_per_min: float, size: str, seconds: str,
        steps: int, metrics_url: str | None, application: str = "ditserve", api_key: str | None = None) -> dict:
    duration = minutes * 60.0
    log = JobLog(started_at=time.time())
    VideoUser.per_user_interval_s = 60.0 * BASE_USERS / rate_per_min
    VideoUser.body = {"prompt": "a red ball moving right", "size": size, "seconds": seconds,
                      "num_inference_steps": steps}
    VideoUser.log = log
    VideoUser.api_key = api_key
    environment = Environment(user_classes=[VideoUser], shape_class=ArrivalShape(profile, duration), host=url,
                              stop_timeout=60)
    runner = environment.create_local_runner()

    def sample_replicas():
        while True:
            count = denoiser_replicas(metrics_url, application)
            if count is not None:
                log.replicas.append((time.time(), count))
            gevent.sleep(SAMPLE_EVERY_S)

    sampler = gevent.spawn(sample_replicas) if metrics_url else None
    print(f"loadtest: {profile} for {minutes:g} min against {url}, base rate {rate_per_min:g} jobs/min",
          file=sys.stderr, flush=True)
    runner.start_shape()
    started = time.monotonic()
    while runner.shape_greenlet is not None or runner.user_count:
        gevent.sleep(5)
        _progress(log, time.monotonic() - started, duration, runner.user_count)
        if runner.shape_greenlet is None:
            runner.stop()
            break
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while log.outstanding and time.monotonic() < deadline:  # accepted jobs must finish
        gevent.sleep(2)
        _progress(log, time.monotonic() - started, duration, 0, draining=True)
    if sampler is not None:
        sampler.kill()
    environment.runner.quit()
    summary = write_report(log, out, duration, {"url": url, "profile": profile, "minutes": minutes,
                                                "base_rate_per_min": rate_per_min, "size": size,
                                                "seconds": seconds, "steps": steps})
    print(f"loadtest: wrote {out}/jobs.csv, summary.json, queue_wait.png, latency_cdf.png", file=sys.stderr)
    return summary


def _progress(log: JobLog, elapsed: float, duration: float, users: int, draining: bool = False) -> None:
    rows = log.all_rows()
    done = sum(1 for r in rows if r.outcome == "completed")
    rejected = sum(1 for r in rows if r.outcome == "rejected_429")
    phase = "draining" if draining else f"{min(elapsed, duration):.0f}/{duration:.0f} s, {users} users"
    print(f"loadtest: {phase}: submitted {len(rows)}, completed {done}, in flight {log.outstanding}, "
          f"rejected {rejected}", file=sys.stderr, flush=True)
