"""What a load test saw, job by job, and the report made from it: jobs.csv, summary.json and
plots (queue wait and Denoiser replicas over time, latency CDF)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving.cost_model import STAGE_NAMES as STAGES
from serving.jobs.records import JobStatus

TERMINAL = frozenset(status.value for status in JobStatus if status.terminal)


@dataclass
class JobRow:
    submitted_at: float
    outcome: str  # completed | failed | cancelled | gone | rejected_429 | create_error | unfinished
    job_id: str = ""
    http_status: int = 200
    retry_after_s: float | None = None
    queue_wait_text_encoder_s: float | None = None
    queue_wait_denoiser_s: float | None = None
    queue_wait_vae_decoder_s: float | None = None
    latency_s: float | None = None
    error_code: str | None = None
    bytes_downloaded: int = 0
    accelerator_seconds: float | None = None  # the video's own usage (every attempt), as the service measured it


@dataclass
class JobLog:
    started_at: float
    rows: dict[str, JobRow] = field(default_factory=dict)
    others: list[JobRow] = field(default_factory=list)  # 429s and failed creates: no job id
    replicas: list[tuple[float, float]] = field(default_factory=list)  # (unix time, Denoiser replicas)

    def accepted(self, job_id: str, submitted: float) -> None:
        self.rows[job_id] = JobRow(submitted_at=submitted, outcome="unfinished", job_id=job_id)

    def rejected(self, submitted: float, retry_after: float) -> None:
        self.others.append(JobRow(submitted_at=submitted, outcome="rejected_429", http_status=429,
                                  retry_after_s=retry_after))

    def create_failed(self, submitted: float, status: int) -> None:
        self.others.append(JobRow(submitted_at=submitted, outcome="create_error", http_status=status))

    def finished(self, video: dict, downloaded: int) -> None:
        row = self.rows[video["id"]]
        stamps = video.get("timestamps") or {}
        submitted = stamps.get("submitted_at", row.submitted_at)
        for stage in STAGES:
            if f"{stage}_started_at" in stamps:
                setattr(row, f"queue_wait_{stage}_s", stamps[f"{stage}_started_at"] - submitted)
        end = stamps.get("completed_at") or stamps.get("failed_at") or stamps.get("cancelled_at")
        row.latency_s = end - submitted if end else None
        row.outcome = video["status"]
        row.error_code = (video.get("error") or {}).get("code")
        row.bytes_downloaded = downloaded
        row.accelerator_seconds = (video.get("usage") or {}).get("total_seconds")

    def gone(self, job_id: str) -> None:
        """The job was deleted (or expired) before it was seen to end."""
        self.rows[job_id].outcome = "gone"

    @property
    def outstanding(self) -> int:
        return sum(1 for row in self.rows.values() if row.outcome == "unfinished")

    def all_rows(self) -> list[JobRow]:
        return sorted([*self.rows.values(), *self.others], key=lambda r: r.submitted_at)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def outcome_counts(log: JobLog) -> dict[str, int]:
    """How every submitted job ended (the summaries' first fields, shared by every report)."""
    rows = log.all_rows()
    count = lambda outcome: sum(1 for r in rows if r.outcome == outcome)  # noqa: E731
    return {"submitted": len(rows), "accepted": len(log.rows), "completed": count("completed"),
            "failed": count("failed"), "cancelled": count("cancelled"), "gone": count("gone"),
            "unfinished": count("unfinished"), "rejected_429": count("rejected_429"),
            "create_errors": count("create_error")}


def summarize(log: JobLog, duration_s: float, extra: dict) -> dict:
    rows = log.all_rows()
    outcomes = outcome_counts(log)
    waits = [r.queue_wait_denoiser_s for r in rows if r.queue_wait_denoiser_s is not None]
    latencies = [r.latency_s for r in rows if r.outcome == "completed" and r.latency_s is not None]
    completed = outcomes["completed"]
    replica_counts = [n for _, n in log.replicas]
    # What a usable video cost: every ended job's accelerator-seconds (failures and
    # cancellations included), per completed one, from the service's own usage figures.
    spent = sum(r.accelerator_seconds or 0.0 for r in rows)

    def rounded(value):
        return None if value is None else round(value, 3)

    return {
        **extra,
        **outcomes,
        "throughput_jobs_per_min": round(60.0 * completed / duration_s, 2) if duration_s > 0 else None,
        # Queue wait: submitted -> the Denoiser starts the job (the wait users feel at peak hour).
        "queue_wait_p50_s": rounded(percentile(waits, 0.50)),
        "queue_wait_p95_s": rounded(percentile(waits, 0.95)),
        "queue_wait_p99_s": rounded(percentile(waits, 0.99)),
        "latency_p50_s": rounded(percentile(latencies, 0.50)),
        "latency_p95_s": rounded(percentile(latencies, 0.95)),
        "denoiser_replicas_max": max(replica_counts) if replica_counts else None,
        "accelerator_seconds_per_completed_video": rounded(spent / completed) if completed else None,
    }


def write_report(log: JobLog, out: Path, duration_s: float, extra: dict) -> dict:
    write_jobs_csv(log, out / "jobs.csv")
    summary = summarize(log, duration_s, extra)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(log, out, summary)
    return summary


def write_jobs_csv(log: JobLog, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = log.all_rows()
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["offset_s", *asdict(rows[0]).keys()] if rows else ["offset_s"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"offset_s": round(row.submitted_at - log.started_at, 3), **asdict(row)})


def plot(log: JobLog, out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = log.all_rows()
    t0 = log.started_at
    title = f"{summary.get('profile', '')} against {summary.get('url', '')}".strip()

    figure, axis = plt.subplots(figsize=(10, 5))
    done = [r for r in rows if r.queue_wait_denoiser_s is not None]
    axis.scatter([r.submitted_at - t0 for r in done], [r.queue_wait_denoiser_s for r in done], s=12,
                 label="queue wait before denoising (per job)")
    rejected = [r.submitted_at - t0 for r in rows if r.outcome == "rejected_429"]
    if rejected:
        axis.scatter(rejected, [0] * len(rejected), marker="x", color="red", label="rejected (429)")
    axis.set_xlabel("seconds since start (job submitted)")
    axis.set_ylabel("queue wait (s)")
    if log.replicas:
        replicas = axis.twinx()
        replicas.step([t - t0 for t, _ in log.replicas], [n for _, n in log.replicas], where="post",
                      color="tab:green", label="Denoiser replicas")
        replicas.set_ylabel("Denoiser replicas")
        replicas.set_ylim(0, max(n for _, n in log.replicas) + 1)
        replicas.legend(loc="upper right")
    axis.legend(loc="upper left")
    axis.set_title(f"Queue wait and Denoiser replicas over time\n{title}")
    figure.tight_layout()
    figure.savefig(out / "queue_wait.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 5))
    latencies = sorted(r.latency_s for r in rows if r.outcome == "completed" and r.latency_s is not None)
    if latencies:
        axis.step(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))], where="post")
    axis.set_xlabel("end-to-end latency (s)")
    axis.set_ylabel("fraction of completed jobs")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.set_title(f"Latency CDF ({len(latencies)} jobs)\n{title}")
    figure.tight_layout()
    figure.savefig(out / "latency_cdf.png", dpi=100)
    plt.close(figure)
