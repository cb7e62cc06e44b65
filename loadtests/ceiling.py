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
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

from serving.cost_model import STAGE_NAMES, StageSeconds
from serving.simulate.profile import CostProfile, load_profile

from loadtests.cluster_metrics import carried, read_sample
from loadtests.comparison import SIMULATED
from loadtests.plan import Arm, Job, default_job
from loadtests.replay import JobFollower
from loadtests.report import JobLog, outcome_counts, percentile
from loadtests.simulated_service import SimulatedService

BUDGET = 0.02  # the issue's: orchestration may add at most 2 % to a job's latency
GPUS_PER_NODE = 8  # --nodes' default: the GPUs spread over nodes of eight, as on an HGX box
READY_TIMEOUT_S = 300  # for every replica of a point to be healthy
DRAIN_TIMEOUT_UNCOMPRESSED_S = 1800  # jobs in flight must end within this after the last submission
DIRECTOR_PROCESS = "ServeReplica:ditserve:Director"  # Ray's title of the Director replica's process

# (name, from timestamp, to timestamp, the stage whose device seconds the span holds):
# contiguous, so the segments' overheads add up to the job's.
SEGMENTS = (
    ("pickup", "submitted_at", "text_encoder_started_at", None),  # until the Director claims it
    ("text_encoder", "text_encoder_started_at", "text_encoder_finished_at", "text_encoder"),
    ("to_denoiser", "text_encoder_finished_at", "denoiser_started_at", None),  # routing, the engine taking it
    ("denoiser", "denoiser_started_at", "denoiser_finished_at", "denoiser"),  # streaming steps, progress writes
    ("to_vae_decoder", "denoiser_finished_at", "vae_decoder_started_at", None),
    ("vae_decoder", "vae_decoder_started_at", "vae_decoder_finished_at", "vae_decoder"),  # incl. MP4 mux, writes
    ("to_completed", "vae_decoder_finished_at", "completed_at", None),
)


def log_line(text: str) -> None:
    print(f"ceiling: {text}", file=sys.stderr, flush=True)


# ---- one point's cluster ----------------------------------------------------------------------


def point_arm(replicas: int) -> Arm:
    """N Denoisers, and a text encoder and a VAE decoder per four of them (each busy a few
    percent of a job's time: enough that they are never what waits)."""
    helpers = math.ceil(replicas / 4)
    return Arm("ceiling", {"text_encoder": helpers, "denoiser": replicas, "vae_decoder": helpers})


def point_gpus(replicas: int) -> int:
    return math.ceil(point_arm(replicas).gpus())


def default_nodes(gpus: int) -> int:
    return math.ceil(gpus / GPUS_PER_NODE)


def point_config(replicas: int, data_dir: str, profile: CostProfile, job_store_url: str | None) -> dict:
    """The `ditserve serve --config` YAML (as a dict), times uncompressed: the experiment's fixed
    arm config (one job per Denoiser, one call at a time on the Denoiser and decoder), with the
    point's job store."""
    config = point_arm(replicas).config(data_dir, profile)
    if job_store_url is not None:
        config["storage"]["job_store_url"] = job_store_url
    return config


# ---- a job's overhead -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOverhead:
    """One completed job, uncompressed seconds."""

    latency_s: float
    overhead_s: float
    segments: dict[str, float | None]  # SEGMENTS' overheads; None where a timestamp is missing

    @property
    def share(self) -> float:
        return self.overhead_s / self.latency_s


def job_overhead(timestamps: dict[str, float], ideal: StageSeconds, time_scale: float) -> JobOverhead | None:
    """From a video object's `timestamps` (compressed clock); None unless it completed."""
    if "submitted_at" not in timestamps or "completed_at" not in timestamps:
        return None
    latency = (timestamps["completed_at"] - timestamps["submitted_at"]) * time_scale
    segments = {}
    for name, start, end, stage in SEGMENTS:
        if start in timestamps and end in timestamps:
            segments[name] = (timestamps[end] - timestamps[start]) * time_scale - (ideal.of(stage) if stage else 0.0)
        else:
            segments[name] = None
    return JobOverhead(latency, latency - ideal.total, segments)


# ---- the closed loop --------------------------------------------------------------------------


class ClosedLoop:
    """`clients` users, each with one job in flight: submit, follow it to its end, submit the next.
    `timestamps` holds every ended job's own timestamps, by id (only the jobs submitted here)."""

    def __init__(self, url: str, body: dict, clients: int, log: JobLog, poll_s: float):
        self.url, self.body, self.clients, self.log, self.poll_s = url, body, clients, log, poll_s
        self.timestamps: dict[str, dict[str, float]] = {}
        self._session = requests.Session()
        self._lock = threading.Lock()  # clients add rows while the follower records ends
        self._ended: dict[str, threading.Event] = {}

    def run(self, stagger_s: float, duration_s: float, drain_timeout_s: float) -> None:
        """Client i submits first at i/clients of `stagger_s` after `log.started_at`, and again
        after each end until `duration_s` has passed; jobs in flight then have `drain_timeout_s`."""
        start = self.log.started_at
        stop_at, deadline = start + duration_s, start + duration_s + drain_timeout_s
        follower = JobFollower(self.url, self._session, self.log, self._lock, self.poll_s, self._on_ended)
        follower.start()
        clients = [threading.Thread(target=self._client, args=(i, start + stagger_s * i / self.clients, stop_at,
                                                               deadline), name=f"ceiling-client-{i}", daemon=True)
                   for i in range(self.clients)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        follower.stop()

    def _client(self, index: int, first_at: float, stop_at: float, deadline: float) -> None:
        time.sleep(max(0.0, first_at - time.time()))
        take = 0
        while time.time() < (deadline if take == 0 else stop_at):  # every client runs at least one job
            job_id, retry_after = self._submit(f"{self.body['prompt']} (client {index}, take {take})")
            if job_id is None:
                time.sleep(retry_after)
                continue
            take += 1
            if not self._ended[job_id].wait(max(0.0, deadline - time.time())):
                return  # past the drain deadline: the job stays "unfinished" in the log

    def _submit(self, prompt: str) -> tuple[str | None, float]:
        """The new job's id, or None and how long to wait before trying again."""
        submitted = time.time()
        try:
            response = self._session.post(f"{self.url}/v1/videos", json={**self.body, "prompt": prompt}, timeout=60)
        except requests.RequestException:
            with self._lock:
                self.log.create_failed(submitted, 0)
            return None, self.poll_s
        with self._lock:
            if response.status_code == 429:
                retry_after = float(response.headers.get("Retry-After", "0"))
                self.log.rejected(submitted, retry_after)
                return None, max(retry_after, self.poll_s)
            if response.status_code != 200:
                self.log.create_failed(submitted, response.status_code)
                return None, self.poll_s
            job_id = response.json()["id"]
            self._ended[job_id] = threading.Event()  # before the row: the follower looks for rows
            self.log.accepted(job_id, submitted)
            return job_id, 0.0

    def _on_ended(self, video: dict) -> None:
        self.timestamps[video["id"]] = dict(video.get("timestamps") or {})
        self._ended[video["id"]].set()


# ---- what the machine spent -------------------------------------------------------------------


class CpuMeter:
    """CPU seconds per wall second between `start()` and `stop()`: of the Director's process
    (among `root_pid`'s descendants: other clusters on this machine have Directors too), as a
    share of one core; and of the whole machine, as a share of all its cores."""

    def __init__(self, root_pid: int):
        import psutil

        self._psutil = psutil
        root = psutil.Process(root_pid)
        self.directors = [p for p in root.children(recursive=True) if _is_director(p)]
        self._started: tuple[float, float, object] | None = None

    def start(self) -> None:
        self._started = (time.monotonic(), self._director_seconds(), self._psutil.cpu_times())

    def stop(self) -> tuple[float | None, float]:
        wall = time.monotonic() - self._started[0]
        director = None
        if self.directors:
            director = (self._director_seconds() - self._started[1]) / wall
        return director, machine_busy_share(self._started[2], self._psutil.cpu_times())

    def _director_seconds(self) -> float:
        total = 0.0
        for process in self.directors:
            try:
                times = process.cpu_times()
            except self._psutil.Error:  # gone (restarted): what it spent before is lost
                continue
            total += times.user + times.system
        return total


def _is_director(process) -> bool:
    import psutil

    try:
        return DIRECTOR_PROCESS in " ".join(process.cmdline()) or DIRECTOR_PROCESS in process.name()
    except psutil.Error:
        return False


def machine_busy_share(before, after) -> float:
    """From two `psutil.cpu_times()`: the share of all cores' time not idle (nor waiting on I/O)."""
    spent = {name: getattr(after, name) - getattr(before, name) for name in after._fields}
    total = sum(spent.values()) - spent.get("guest", 0.0) - spent.get("guest_nice", 0.0)  # already in user/nice
    idle = spent["idle"] + spent.get("iowait", 0.0)
    return (total - idle) / total if total > 0 else 0.0


# ---- the job store --------------------------------------------------------------------------


class FreshDatabase:
    """A database of its own for one point on `--job-store-url`'s server: the point counts
    only its own jobs, and Postgres counts its transactions and rows. Dropped at the end."""

    STATS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted", "tup_fetched")

    def __init__(self, server_url: str, label: str):
        import sqlalchemy as sa

        self.name = f"ditserve_ceiling_{label}_{uuid.uuid4().hex[:8]}"
        server = sa.engine.make_url(server_url)
        self.url = server.set(database=self.name).render_as_string(hide_password=False)
        self._admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")

    def _sql(self, statement: str, **params):
        import sqlalchemy as sa

        with self._admin.connect() as conn:
            result = conn.execute(sa.text(statement), params)
            return result.mappings().first() if result.returns_rows else None

    def create(self) -> None:
        self._sql(f'CREATE DATABASE "{self.name}"')

    def stats(self) -> dict[str, int]:
        row = self._sql(f"SELECT {', '.join(self.STATS)} FROM pg_stat_database WHERE datname = :name", name=self.name)
        return {key: int(row[key] or 0) for key in self.STATS} if row else {}

    def drop(self) -> None:
        try:
            self._sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            self._admin.dispose()


# ---- one point, and the whole run -----------------------------------------------------------


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


# ---- the report -----------------------------------------------------------------------------


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _stats(values: list[float], digits: int = 4) -> dict[str, float | None]:
    return {"p50": _r(percentile(values, 0.50), digits), "p95": _r(percentile(values, 0.95), digits),
            "mean": _r(statistics.fmean(values), digits) if values else None}


def summarize_point(log: JobLog, timestamps: dict[str, dict], overheads: dict[str, JobOverhead | None], job: Job, *,
                    profile: str, replicas: int, gpus: int, nodes: int, time_scale: float, minutes: float,
                    ended_at: float, director_cpu: float | None, machine_cpu: float, job_store: str,
                    store: dict[str, int] | None) -> dict:
    """One point's summary.json: every time uncompressed (x `time_scale`)."""
    x = time_scale
    done = [o for o in overheads.values() if o is not None]
    outcomes = outcome_counts(log)
    ends = [t.get("completed_at") or t.get("failed_at") or t.get("cancelled_at") for t in timestamps.values()]
    window = (max([e for e in ends if e], default=ended_at) - log.started_at) * x  # first submission -> last end
    share = _stats([o.share for o in done])
    per_job = (lambda n: _r(n / outcomes["completed"], 2)) if outcomes["completed"] else (lambda n: None)
    return {
        "simulated": SIMULATED,
        "profile": profile,
        "time_scale": x,
        "replicas": point_arm(replicas).replicas,
        "clients": replicas,
        "gpus": gpus,
        "nodes": nodes,
        "equivalent_gpus": _r(replicas * x, 1),
        "minutes": minutes,
        "job": {**{k: v for k, v in job.body.items() if k != "prompt"},
                "ideal_seconds": {**{s: _r(job.seconds.of(s), 3) for s in STAGE_NAMES},
                                  "total": _r(job.seconds.total, 3)}},
        "job_store": job_store,
        **outcomes,
        "window_s": _r(window, 1),
        "jobs_per_min": _r(60.0 * outcomes["completed"] / window, 2) if window > 0 else None,
        "latency_s": _stats([o.latency_s for o in done], 2),
        "overhead_s": _stats([o.overhead_s for o in done], 3),
        "overhead_share": share,
        "under_budget": share["p50"] is not None and share["p50"] < BUDGET,
        "overhead_by_segment_s": {name: _stats([o.segments[name] for o in done if o.segments[name] is not None], 3)
                                  for name, *_ in SEGMENTS},
        "director_cpu_share": _r(director_cpu, 3),
        "machine_cpu_busy_share": _r(machine_cpu, 3),
        "job_store_counts": store,
        "job_store_per_completed_job": {k: per_job(v) for k, v in store.items()} if store else None,
    }


def point_line(summary: dict) -> str:
    share = summary["overhead_share"]
    return (f"x{summary['time_scale']:g}: {summary['clients']} Denoisers = {summary['equivalent_gpus']:g} equivalent "
            f"GPUs: completed {summary['completed']}, failed {summary['failed']}, {summary['jobs_per_min']} jobs/min, "
            f"overhead p50 {_percent(share['p50'])}, p95 {_percent(share['p95'])}, Director CPU "
            f"{_percent(summary['director_cpu_share'], 0)}, "
            f"machine CPU {_percent(summary['machine_cpu_busy_share'], 0)}")


def _percent(share: float | None, digits: int = 2) -> str:
    return "–" if share is None else f"{share * 100:.{digits}f} %"


def _cell(value) -> str:
    return "–" if value is None else f"{value + 0.0:g}" if isinstance(value, float) else str(value)  # no "-0"


def render_ceiling(summaries: list[dict], job: Job, *, command: str, minutes: float) -> str:
    first = summaries[0]
    scales = ", ".join(f"{s['time_scale']:g}x" for s in summaries)
    lines = [
        f"# The control plane's ceiling — SIMULATED ({first['profile']}, time scales {scales})",
        "",
        f"**{SIMULATED}.** Every time below is in uncompressed seconds (measured on the compressed run x the "
        "point's time scale).",
        "",
        f"Command: `{command}`",
        "",
        f"Job: {job.body['size']}, {job.body['seconds']} s, {job.body['num_inference_steps']} steps (profile: "
        f"{job.seconds.text_encoder:.2f} s encode + {job.seconds.denoiser:.1f} s denoise + "
        f"{job.seconds.vae_decoder:.2f} s decode = {job.seconds.total:.2f} s on one GPU: the ideal latency). Each "
        f"point: a fresh cluster; one client per Denoiser in a closed loop (submit, follow to the end, submit the "
        f"next) for {minutes:g} min, first submissions spread over one job's length. Job store: {first['job_store']}"
        + (", a fresh database per point." if first["job_store"] == "postgresql" else ", a fresh file per point."),
        "",
        "Overhead = latency (submitted -> completed, the job's own timestamps) - the ideal latency; the share is "
        "overhead / latency per job. Equivalent GPUs = Denoisers x time scale: the Director's work per wall second "
        "(jobs started, steps streamed, rows written) grows with jobs in flight x their speed, so N replicas at X "
        "stand for N x X GPUs at 1x for the control plane. Here the replicas, the Director and the job store share "
        "one machine, so each figure is a pessimistic bound. Director CPU: its process's CPU seconds per wall "
        "second (100 % = one core); machine CPU: all cores, everything running on the machine.",
        "",
        "| time scale | replicas (encoder / denoiser / decoder) | equivalent GPUs | jobs/min | completed | failed "
        "| overhead p50 % | overhead p95 % | Director CPU % | machine CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        sizes = " / ".join(str(s["replicas"][stage]) for stage in STAGE_NAMES)
        lines.append(f"| {s['time_scale']:g}x | {sizes} | {s['equivalent_gpus']:g} | {_cell(s['jobs_per_min'])} "
                     f"| {s['completed']} | {s['failed']} | {_percent(s['overhead_share']['p50'])} "
                     f"| {_percent(s['overhead_share']['p95'])} | {_percent(s['director_cpu_share'], 0)} "
                     f"| {_percent(s['machine_cpu_busy_share'], 0)} |")
    under = [s for s in summaries if s["under_budget"]]
    over = [s for s in summaries if not s["under_budget"]]
    name = lambda s: f"{s['time_scale']:g}x ({s['equivalent_gpus']:g} equivalent GPUs)"  # noqa: E731
    lines += ["", f"Under the {BUDGET:.0%} budget (overhead p50): "
              + (", ".join(name(s) for s in under) if under else "**none**")
              + "; over it: " + (", ".join(name(s) for s in over) if over else "none") + ".", "",
              "Where the overhead goes (per job, p50 / p95 s; a stage's segment is its span minus its device seconds):",
              "", "| time scale | " + " | ".join(n for n, *_ in SEGMENTS) + " |",
              "|---|" + "---|" * len(SEGMENTS)]
    for s in summaries:
        parts = s["overhead_by_segment_s"]
        lines.append(f"| {s['time_scale']:g}x | "
                     + " | ".join(f"{_cell(parts[n]['p50'])} / {_cell(parts[n]['p95'])}" for n, *_ in SEGMENTS) + " |")
    if any(s["job_store_per_completed_job"] for s in summaries):
        lines += ["", "Job store, per completed job (Postgres' own counters for the point's database, from the "
                  "first submission to the cluster's stop): " + "; ".join(
                      f"{s['time_scale']:g}x: " + ", ".join(f"{k} {_cell(v)}" for k, v in
                                                           s["job_store_per_completed_job"].items())
                      for s in summaries if s["job_store_per_completed_job"])]
    return "\n".join(lines) + "\n"


def write_ceiling(out: Path, summaries: list[dict], job: Job, *, command: str, minutes: float) -> Path:
    path = out / "ceiling.md"
    path.write_text(render_ceiling(summaries, job, command=command, minutes=minutes))
    return path


def write_jobs_csv(path: Path, overheads: dict[str, JobOverhead | None]) -> None:
    """One row per ended job, uncompressed seconds (an empty overhead: it did not complete)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["job_id", "latency_s", "overhead_s", "overhead_share", *(f"{n}_s" for n, *_ in SEGMENTS)])
        for job_id, o in overheads.items():
            if o is None:
                writer.writerow([job_id])
                continue
            writer.writerow([job_id, round(o.latency_s, 3), round(o.overhead_s, 3), round(o.share, 5),
                             *("" if o.segments[n] is None else round(o.segments[n], 3) for n, *_ in SEGMENTS)])
