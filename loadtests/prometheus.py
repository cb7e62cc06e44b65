"""A real Prometheus for one arm: it scrapes every node of the arm's cluster, and answers the
p95 queue wait in PromQL, to check against the jobs' own timestamps.

The query reads the Director's cumulative histogram at the end of the arm: the cluster is
fresh for every arm, so its counters started at zero with the arm's first job, and the
cumulative buckets are exactly the arm (`increase()` over a window would drop the first
scrape's counts of a series born mid-run). Histogram buckets are coarse
(serving/metrics.py SECONDS_BUCKETS): PromQL interpolates linearly inside the bucket where
the 95th percentile falls, so the two figures agree when they fall in the same bucket, and
the tolerance is that bucket's width.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import requests

from serving.metrics import SECONDS_BUCKETS

QUEUE_WAIT_P95 = ('histogram_quantile(0.95, sum by (le) '
                  '(ray_ditserve_queue_wait_seconds_bucket{stage="denoiser"}))')
REPLICA_STARTUP_P50_MS = ('histogram_quantile(0.5, sum by (le) '
                          '(ray_serve_replica_startup_latency_ms_bucket{deployment="Denoiser"}))')
QUEUE_WAIT_COUNT = 'sum(ray_ditserve_queue_wait_seconds_count{stage="denoiser"})'


def binary() -> str | None:
    return shutil.which("prometheus")


class Prometheus:
    def __init__(self, folder: Path, metrics_urls: list[str], scrape_s: float, port: int):
        self.folder, self.scrape_s, self.port = folder, scrape_s, port
        self.targets = [u.removeprefix("http://").removesuffix("/metrics") for u in metrics_urls]
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        targets = ", ".join(f'"{t}"' for t in self.targets)
        config = self.folder / "prometheus.yml"
        config.write_text(f"global:\n  scrape_interval: {self.scrape_s:g}s\n"
                          f"scrape_configs:\n  - job_name: ditserve\n    static_configs:\n"
                          f"      - targets: [{targets}]\n")
        self.process = subprocess.Popen(
            [binary(), f"--config.file={config}", f"--storage.tsdb.path={self.folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.folder / "prometheus.log", "w"))
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"prometheus did not start; see {self.folder}/prometheus.log")
            time.sleep(0.5)

    def query(self, expr: str) -> float | None:
        body = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        result = body.get("data", {}).get("result", []) if body.get("status") == "success" else []
        if not result or result[0]["value"][1] in ("NaN", "+Inf"):
            return None
        return float(result[0]["value"][1])

    def queue_wait_p95(self, started_jobs: int, timeout_s: float = 60.0) -> float | None:
        """PromQL's p95 (compressed seconds) once it has scraped every started job's wait."""
        deadline = time.monotonic() + timeout_s
        while (self.query(QUEUE_WAIT_COUNT) or 0) < started_jobs and time.monotonic() < deadline:
            time.sleep(1.0)  # Ray's agents export every few seconds; Prometheus scrapes after
        return self.query(QUEUE_WAIT_P95)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None
        shutil.rmtree(self.folder / "data", ignore_errors=True)  # the figures are in the summary


def bucket_of(seconds: float) -> tuple[float, float]:
    """The histogram bucket (lower, upper] a value falls in."""
    lower = 0.0
    for upper in SECONDS_BUCKETS:
        if seconds <= upper:
            return lower, upper
        lower = upper
    return lower, float("inf")
