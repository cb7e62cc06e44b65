"""The experiment's report: one `summary.json` per arm and `comparison.md` with plots.

Every figure is in UNCOMPRESSED seconds (a time measured on the compressed run times the
time scale), and every file says the run was SIMULATED, on which profile and time scale.
Queue wait is a job's wait from submission to the start of denoising (its own timestamps):
the wait a user feels before generation begins, and the stage that holds ~90 % of the work.
"""

from __future__ import annotations

import json
from pathlib import Path

from serving.cost_model import STAGE_NAMES
from serving.simulate.cluster import STAGE_GPUS

from loadtests.cluster_metrics import Sample, gpu_seconds, node_autoscaled, uses_ray_accounting
from loadtests.plan import Arm, Plan
from loadtests.prometheus import bucket_of
from loadtests.report import JobLog, JobRow, outcome_counts, percentile
from loadtests.shapes import SHAPES, burst_phases

SIMULATED = "SIMULATED accelerators (serving/simulate/): no model ran; times are the cost profile's"


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def summarize_arm(arm: Arm, plan: Plan, log: JobLog, samples: list[Sample], *, profile: str, time_scale: float,
                  minutes: float, slo_s: float, window: tuple[float, float], promql_p95: float | None | str) -> dict:
    """`window`: the arm's run on the compressed clock, first arrival to the last job's end.
    `promql_p95`: PromQL's answer (compressed seconds), None when it had none, or why it was skipped."""
    x = time_scale
    rows = log.all_rows()
    outcomes = outcome_counts(log)
    started = [r for r in rows if r.queue_wait_denoiser_s is not None]
    waits = [r.queue_wait_denoiser_s * x for r in started]
    duration = minutes * 60.0
    rise, _, _, fall_ends = burst_phases(minutes)
    burst = [r.queue_wait_denoiser_s * x for r in started
             if rise <= (r.submitted_at - log.started_at) * x / duration < fall_ends]
    latencies = [r.latency_s * x for r in rows if r.outcome == "completed" and r.latency_s is not None]
    completed = outcomes["completed"]
    held = gpu_seconds(samples, *window) * x
    busy = arm.busy_gpu_seconds(plan.job)  # GPU-seconds of one video
    if busy is None:  # it varies with the forwards' layouts: what the service measured per video
        used = [r.accelerator_seconds * x for r in rows if r.outcome == "completed" and r.accelerator_seconds]
        busy = sum(used) / len(used) if used else None
    denoise = [_denoise_seconds(r) * x for r in started if _denoise_seconds(r) is not None]
    jobs_p95 = percentile(waits, 0.95)
    return {
        "simulated": True,
        "note": f"{SIMULATED}; every time here is UNCOMPRESSED seconds (measured x time_scale)",
        "profile": profile,
        "time_scale": x,
        "arm": arm.name,
        "replicas": arm.replicas,
        "max_replicas": arm.max_replicas or None,
        "target_queue_wait_s": arm.target_queue_wait_s or None,
        "cache": plan.job.body.get("cache", "off"),  # step caching the jobs asked for (arms sized uncached)
        "gpus_at_rest": arm.gpus(),
        "slo_queue_wait_s": slo_s,
        **outcomes,
        # Of every submitted job (a 429 or a job that never started misses it too).
        "slo_attainment": _r(sum(1 for w in waits if w <= slo_s) / len(rows), 4) if rows else None,
        "queue_wait_p50_s": _r(percentile(waits, 0.50)),
        "queue_wait_p95_s": _r(jobs_p95),
        "queue_wait_p99_s": _r(percentile(waits, 0.99)),
        "queue_wait_max_s": _r(max(waits) if waits else None),
        "queue_wait_p95_burst_s": _r(percentile(burst, 0.95)),
        "latency_p50_s": _r(percentile(latencies, 0.50)),
        "latency_p95_s": _r(percentile(latencies, 0.95)),
        "window_s": _r((window[1] - window[0]) * x, 1),
        "gpu_hours": _r(held / 3600.0, 3),
        "gpu_accounting": "Ray's GPUs in use (ray_resources)" if uses_ray_accounting(samples)
                          else "healthy replicas x GPUs per replica",
        "accelerator_seconds_per_video": _r(held / completed, 1) if completed else None,
        "busy_accelerator_seconds_per_video": _r(busy, 1),
        "gpu_utilization": _r(busy * completed / held, 3) if held and busy is not None else None,
        "denoise_seconds_p50": _r(percentile(denoise, 0.50)),
        "denoise_seconds_profile": _r(plan.job.seconds.denoiser),
        "replicas_seen": _replicas_seen(samples),
        "prometheus": _prometheus_check(promql_p95, jobs_p95, x),
        **(_nodes(samples, window, x) if node_autoscaled(samples) else {}),
    }


def _nodes(samples: list[Sample], window: tuple[float, float], x: float) -> dict:
    """A node-autoscaled arm: the GPUs of the nodes it held (joined or provisioning), which is
    what a fleet pays for, and the GPU nodes seen."""
    joined = [s.nodes["joined"] for s in samples if "joined" in s.nodes]
    return {"gpu_hours_provisioned": _r(gpu_seconds(samples, *window, provisioned=True) * x / 3600.0, 3),
            "gpu_nodes_seen": {"min": min(joined), "max": max(joined), "last": joined[-1]} if joined else None}


def _denoise_seconds(row: JobRow) -> float | None:
    if row.latency_s is None or row.queue_wait_denoiser_s is None or row.queue_wait_vae_decoder_s is None:
        return None
    return row.queue_wait_vae_decoder_s - row.queue_wait_denoiser_s  # denoiser start -> VAE start


def _replicas_seen(samples: list[Sample]) -> dict:
    seen: dict[str, dict] = {}
    for stage in STAGE_NAMES:
        values = [s.healthy[stage] for s in samples if stage in s.healthy]
        if values:
            seen[stage] = {"min": min(values), "max": max(values), "last": values[-1]}
    return seen


def _prometheus_check(promql: float | None | str, jobs_p95_uncompressed: float | None, x: float) -> dict:
    if isinstance(promql, str):
        return {"checked": False, "reason": promql}
    if promql is None or jobs_p95_uncompressed is None:
        return {"checked": False, "reason": "PromQL had no answer" if promql is None else "no job started"}
    lower, upper = bucket_of(jobs_p95_uncompressed / x)  # the histogram's buckets are on the compressed clock
    tolerance = (upper - lower) * x
    return {"checked": True, "promql_p95_s": _r(promql * x), "jobs_p95_s": _r(jobs_p95_uncompressed),
            "bucket_s": [_r(lower * x), _r(upper * x)], "tolerance_s": _r(tolerance),
            "agree": abs(promql * x - jobs_p95_uncompressed) <= tolerance}


def goal(summaries: dict[str, dict]) -> list[str]:
    """The issue's goal, line by line, with the measured figures."""
    base, peak, auto = (summaries.get(n) for n in ("fixed-base", "fixed-peak", "autoscaling"))
    lines = []
    if auto:
        slo = auto["slo_queue_wait_s"]
        p95 = auto["queue_wait_p95_burst_s"]
        lines.append(f"- autoscaling holds p95 queue wait within the {slo:g} s SLO through the burst: "
                     f"{'**yes**' if p95 is not None and p95 <= slo else '**no**'} (burst p95 {p95} s, "
                     f"whole run p95 {auto['queue_wait_p95_s']} s)")
    if auto and peak and peak["gpu_hours"]:
        share = auto["gpu_hours"] / peak["gpu_hours"]
        lines.append(f"- using <= 60 % of fixed-peak's GPU-hours: {'**yes**' if share <= 0.60 else '**no**'} "
                     f"({auto['gpu_hours']} / {peak['gpu_hours']} = {share:.0%})")
        bound = auto.get("clairvoyant_gpu_hours")
        if bound:
            lines.append(f"  - the clairvoyant bound on these arrivals (loadtests/bound.py: sized every second for "
                         f"the arrivals around it, at most 85 % busy, no start-up, no lag): {bound} GPU-hours = "
                         f"{bound / peak['gpu_hours']:.0%} of fixed-peak; autoscaling spent "
                         f"{auto['gpu_hours'] / bound:.0%} of it")
    if auto and peak and peak["gpu_hours"] and auto.get("gpu_hours_provisioned") is not None:
        held = auto["gpu_hours_provisioned"]
        lines.append(f"  - with its GPU nodes autoscaled too, the nodes it held (joined or provisioning) had {held} "
                     f"GPU-hours = {held / peak['gpu_hours']:.0%} of fixed-peak's GPUs in use (which hold at least "
                     f"that many nodes); GPU nodes {auto['gpu_nodes_seen']}")
    if base:
        p95 = base["queue_wait_p95_s"]
        missed = p95 is None or p95 > base["slo_queue_wait_s"] or base["rejected_429"]
        lines.append(f"- fixed-base misses the SLO: {'**yes**' if missed else '**no**'}"
                     f" (p95 {p95} s, {base['rejected_429']} rejected with 429)")
    return lines


TABLE = [("completed", "completed"), ("failed", "failed"), ("rejected_429", "429"), ("unfinished", "unfinished"),
         ("slo_attainment", "SLO attainment"), ("queue_wait_p50_s", "queue wait p50 s"),
         ("queue_wait_p95_s", "**queue wait p95 s**"), ("queue_wait_p95_burst_s", "p95 s, burst jobs"),
         ("latency_p95_s", "latency p95 s"), ("gpu_hours", "**GPU-hours**"),
         ("accelerator_seconds_per_video", "GPU-s per video"), ("gpu_utilization", "GPU utilization")]


def write_comparison(out: Path, summaries: dict[str, dict], plan: Plan, *, command: str, logs: dict[str, JobLog],
                     samples: dict[str, list[Sample]], minutes: float, prometheus_note: str) -> Path:
    first = next(iter(summaries.values()))
    x, slo = first["time_scale"], first["slo_queue_wait_s"]
    job = plan.job
    burst = [round(f * minutes, 1) for f in burst_phases(minutes)]
    lines = [
        f"# Peak-hour experiment — SIMULATED ({first['profile']}, time scale {x:g}x)",
        "",
        f"**{SIMULATED}.** Every time below is in uncompressed seconds (measured on the compressed run x {x:g}).",
        "",
        f"Command: `{command}`",
        "",
        f"Job: {job.body['size']}, {job.body['seconds']} s, {job.body['num_inference_steps']} steps "
        f"(profile: {job.seconds.text_encoder:.2f} s encode + {job.seconds.denoiser:.1f} s denoise + "
        f"{job.seconds.vae_decoder:.2f} s decode on one GPU). Arrivals: the seeded peak hour over {minutes:g} min "
        f"(quiet, then 4x from minute {burst[1]:g} to {burst[2]:g} after rising from minute {burst[0]:g}, back to "
        f"quiet by minute {burst[3]:g}), base {plan.base_rate_per_min:g} jobs/min, the same schedule for every arm. "
        f"SLO: queue wait (submitted -> denoising starts) <= {slo:g} s. Budget: {plan.gpus} simulated GPUs.",
        *(["", f"Step caching: every job asks for `cache: {job.body['cache']}`; the stand-ins skip the share of steps "
               f"the profile's `step_cache` gives, so a job denoises in less than the profile's uncached figure above. "
               f"The arms are sized for uncached jobs (the same fleet as without caching), and GPU utilization and "
               f"GPU-s per video below are against the uncached job's work."] if "cache" in job.body else []),
        "",
        "| arm | replicas (encoder / denoiser / decoder) | " + " | ".join(title for _, title in TABLE) + " |",
        "|---|---|" + "---|" * len(TABLE),
    ]
    for name, summary in summaries.items():
        r, m = summary["replicas"], summary["max_replicas"]
        sizes = " / ".join(f"{r[s]}" + (f"–{m[s]}" if m else "") for s in STAGE_NAMES)
        lines.append(f"| {name} | {sizes} | " + " | ".join(_cell(key, summary.get(key)) for key, _ in TABLE) + " |")
    measured = goal(summaries)  # empty when the arms compared are not the goal's
    if measured:
        lines += ["", "Goal (issue 14, item 4):", "", *measured]
    lines += ["", "PromQL check (p95 queue wait from the Director's histogram vs the jobs' own timestamps; agree = within "
              "the width of the histogram bucket the p95 falls in):", ""]
    if prometheus_note:
        lines.append(f"- {prometheus_note}")
    for name, summary in summaries.items():
        check = summary["prometheus"]
        if check["checked"]:
            lines.append(f"- {name}: PromQL {check['promql_p95_s']} s, jobs {check['jobs_p95_s']} s, bucket "
                         f"{check['bucket_s']} s, tolerance {check['tolerance_s']} s: "
                         f"{'agree' if check['agree'] else '**DISAGREE**'}")
        else:
            lines.append(f"- {name}: not checked ({check['reason']})")
    lines += ["", "Fidelity of the compression (a saturated CPU would stretch the simulated times): median denoise "
              "per job " + ", ".join(f"{n} {s['denoise_seconds_p50']} s" for n, s in summaries.items())
              + f" against the profile's {job.seconds.denoiser:.1f} s. GPU-hours: "
              + first["gpu_accounting"] + ", integrated from the first arrival to the last job's end.", "",
              "![replicas per stage](replicas.png)", "", "![queue wait](queue_wait.png)", ""]
    path = out / "comparison.md"
    path.write_text("\n".join(lines))
    plot(out, summaries, logs, samples, minutes, slo, x)
    return path


def _cell(key: str, value) -> str:
    if value is None:
        return "–"
    if key in ("slo_attainment", "gpu_utilization"):
        return f"{value:.0%}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot(out: Path, summaries: dict[str, dict], logs: dict[str, JobLog], samples: dict[str, list[Sample]],
         minutes: float, slo: float, x: float) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = list(summaries)
    label = f"SIMULATED ({next(iter(summaries.values()))['profile']}, time scale {x:g}x, uncompressed minutes)"
    figure, axes = plt.subplots(len(names), 1, figsize=(10, 2.8 * len(names)), sharex=True, squeeze=False)
    for axis, name in zip(axes[:, 0], names):
        t0 = logs[name].started_at
        series = samples.get(name, [])
        minutes_at = [(s.at - t0) * x / 60 for s in series]
        for stage in STAGE_NAMES:
            axis.step(minutes_at, [s.healthy.get(stage, 0) for s in series], where="post", label=f"{stage} replicas")
        axis.step(minutes_at, [s.gpus_held for s in series], where="post", color="black", linestyle=":",
                  label="GPUs held")
        if node_autoscaled(series):
            axis.step(minutes_at, [s.gpus_provisioned or 0 for s in series], where="post", color="grey",
                      linestyle="--", label="GPUs of the nodes held")
        axis.set_ylabel(name)
        axis.set_xlim(left=0)
        axis.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=8, ncol=4)
    axes[0, 0].set_title(f"Replicas per stage and GPUs held\n{label}")
    axes[-1, 0].set_xlabel("minutes since the first arrival (uncompressed)")
    figure.tight_layout()
    figure.savefig(out / "replicas.png", dpi=90)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(10, 5))
    for name in names:
        log = logs[name]
        started = [r for r in log.all_rows() if r.queue_wait_denoiser_s is not None]
        axis.scatter([(r.submitted_at - log.started_at) * x / 60 for r in started],
                     [r.queue_wait_denoiser_s * x for r in started], s=10, label=f"{name} (per job)")
        rejected = [(r.submitted_at - log.started_at) * x / 60 for r in log.all_rows() if r.outcome == "rejected_429"]
        if rejected:
            axis.scatter(rejected, [0] * len(rejected), marker="x", s=14, label=f"{name}: rejected (429)")
    axis.axhline(slo, color="red", linestyle="--", label=f"SLO {slo:g} s")
    load = axis.twinx()
    grid = [i / 200 for i in range(201)]
    load.plot([g * minutes for g in grid], [SHAPES["peak-hour"](g, minutes) for g in grid], color="grey", alpha=0.5)
    load.set_ylabel("arrival rate (x base)", color="grey")
    load.set_ylim(0, 8)
    axis.set_yscale("symlog", linthresh=10)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("minutes since the first arrival, job submitted (uncompressed)")
    axis.set_ylabel("queue wait before denoising (s)")
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(f"Queue wait per job, three arms, same arrivals\n{label}")
    figure.tight_layout()
    figure.savefig(out / "queue_wait.png", dpi=90)
    plt.close(figure)


def write_summary(folder: Path, summary: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
