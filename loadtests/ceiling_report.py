"""The report of `ditserve loadtest ceiling` (loadtests/ceiling.py): a point's summary.json and
its one-line log, jobs.csv (one row per ended job), and ceiling.md over all points; every time
uncompressed."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from serving.cost_model import STAGE_NAMES

from loadtests.ceiling_cluster import point_arm
from loadtests.comparison import SIMULATED
from loadtests.overhead import SEGMENTS, JobOverhead
from loadtests.plan import Job
from loadtests.report import JobLog, outcome_counts, percentile

BUDGET = 0.02  # the issue's: orchestration may add at most 2 % to a job's latency


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
