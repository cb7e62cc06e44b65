"""`ditserve loadtest ceiling` (issue 14, item 5): how much load one Director and its job store
drive before orchestration adds more than 2 % to a job's latency.

For each time scale X: a fresh `ditserve serve --simulate` cluster (loadtests/simulated_service.py)
with N Denoisers, one job each (as the experiment's arms, loadtests/plan.py), and ceil(N/4) text
encoders and VAE decoders; its own job store (a fresh database on `--job-store-url`'s server,
or an SQLite file in the point's folder). N clients in a closed loop each submit the profile's
default job, follow it to its end through the list endpoint (loadtests/replay.py's
`JobFollower`), and submit the next, for `--minutes` uncompressed; their first submissions are
spread over one job's length, so the stages never see synchronized waves.

A job's overhead is its latency (submitted -> completed, from its own timestamps) minus the
device seconds the profile gives it (encode + denoise + decode): the stand-ins only wait those
seconds, so everything above them is the service's own doing — the Director's polls and writes,
Serve's routing, the job store, the MP4 mux. Each job's overhead is also split into segments
between its timestamps, which add up to the whole.

Why a time scale stands for GPUs: the Director's work per wall second (jobs started, steps
streamed, rows written) grows with jobs in flight x their speed, N x X, so for the control
plane N replicas at X are N x X GPUs at 1x. Here the replicas, the Director and the job store
share one machine, so the figure is a pessimistic bound.

The parts: the point's cluster (loadtests/ceiling_cluster.py), a job's overhead
(loadtests/overhead.py), the clients (loadtests/closed_loop.py), the CPU spent
(loadtests/host_cpu.py), the point's Postgres database (loadtests/scratch_database.py) and the
report (loadtests/ceiling_report.py); this file runs the points.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from serving.simulate.profile import CostProfile, load_profile

from loadtests.ceiling_cluster import default_nodes, point_arm, point_config, point_gpus
from loadtests.ceiling_report import point_line, summarize_point, write_ceiling, write_jobs_csv
from loadtests.closed_loop import ClosedLoop
from loadtests.cluster_metrics import carried, read_sample
from loadtests.host_cpu import CpuMeter
from loadtests.overhead import job_overhead
from loadtests.plan import Job, default_job
from loadtests.report import JobLog
from loadtests.scratch_database import FreshDatabase
from loadtests.simulated_service import SimulatedService

READY_TIMEOUT_S = 300  # for every replica of a point to be healthy
DRAIN_TIMEOUT_UNCOMPRESSED_S = 1800  # jobs in flight must end within this after the last submission


def log_line(text: str) -> None:
    print(f"ceiling: {text}", file=sys.stderr, flush=True)


def run_ceiling(*, profile: str, replicas: int, time_scales: list[float], minutes: float, nodes: int | None,
                job_store_url: str | None, out: Path, command: str) -> list[dict]:
    cost = load_profile(profile)
    job = default_job(cost)
    gpus = point_gpus(replicas)
    nodes = nodes or default_nodes(gpus)
    log_line(f"SIMULATED {profile}: {replicas} Denoisers ({point_arm(replicas).replicas}) on {gpus} GPUs / "
             f"{nodes} nodes, {minutes:g} min per point, time scales {', '.join(f'{x:g}' for x in time_scales)}; "
             f"job store: {'a fresh Postgres database per point' if job_store_url else 'SQLite per point'}")
    summaries = []
    for x in time_scales:
        folder = out / f"x{x:g}"
        folder.mkdir(parents=True, exist_ok=True)
        summary = run_point(cost, job, folder, replicas=replicas, gpus=gpus, nodes=nodes, time_scale=x,
                            minutes=minutes, job_store_url=job_store_url)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        summaries.append(summary)
        log_line(point_line(summary) + f" -> {folder}/summary.json")
    path = write_ceiling(out, summaries, job, command=command, minutes=minutes)
    log_line(f"wrote {path}")
    return summaries


def run_point(cost: CostProfile, job: Job, folder: Path, *, replicas: int, gpus: int, nodes: int, time_scale: float,
              minutes: float, job_store_url: str | None) -> dict:
    x = time_scale
    database = FreshDatabase(job_store_url, f"x{x:g}".replace(".", "_")) if job_store_url else None
    if database is not None:
        database.create()
    try:
        config = folder / "config.yaml"
        config.write_text(f"# x{x:g}: written by `ditserve loadtest ceiling` (times uncompressed)\n"
                          + yaml.safe_dump(point_config(replicas, str((folder / "data").resolve()), cost,
                                                        database.url if database else None), sort_keys=False))
        service = SimulatedService(folder, config, cost.name, gpus, nodes, x)
        log = JobLog(started_at=0.0)
        try:
            log_line(f"x{x:g}: starting a simulated cluster ({folder}/serve.log)")
            service.start()
            wait_until_up(service.metrics_urls, point_arm(replicas).replicas, READY_TIMEOUT_S, folder)
            before = database.stats() if database else None
            meter = CpuMeter(service.process.pid)
            meter.start()
            log.started_at = time.time()
            loop = ClosedLoop(service.url, job.body, replicas, log, poll_s=max(0.2, 2.0 / x))
            loop.run(stagger_s=job.seconds.total / x, duration_s=minutes * 60.0 / x,
                     drain_timeout_s=DRAIN_TIMEOUT_UNCOMPRESSED_S / x)
            director_cpu, machine_cpu = meter.stop()
            ended_at = time.time()
        finally:
            service.stop()
        store = _store_delta(before, database.stats()) if database else None
        overheads = {job_id: job_overhead(stamps, job.seconds, x) for job_id, stamps in loop.timestamps.items()}
        write_jobs_csv(folder / "jobs.csv", overheads)
        return summarize_point(log, loop.timestamps, overheads, job, profile=cost.name, replicas=replicas, gpus=gpus,
                               nodes=nodes, time_scale=x, minutes=minutes, ended_at=ended_at,
                               director_cpu=director_cpu, machine_cpu=machine_cpu,
                               job_store="postgresql" if database else "sqlite", store=store)
    finally:
        if database is not None:
            database.drop()


def wait_until_up(metrics_urls: list[str], replicas: dict[str, int], timeout_s: float, folder: Path) -> None:
    """Until every replica of the point is healthy (from the nodes' own Prometheus endpoints)."""
    deadline, sample = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        sample = carried(read_sample(metrics_urls), sample)
        if all(sample.healthy.get(stage, 0) >= n for stage, n in replicas.items()):
            return
        time.sleep(1.0)
    raise RuntimeError(f"replicas {replicas} were not all healthy within {timeout_s:g} s (last seen "
                       f"{sample.healthy if sample else None}); see {folder}/serve.log")


def _store_delta(before: dict[str, int] | None, after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - (before or {}).get(key, 0) for key in after}
