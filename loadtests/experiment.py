"""`ditserve loadtest experiment`: the same seeded peak hour against three arms on simulated GPUs.

For each arm in turn (loadtests/plan.py sizes them): write its config, start a fresh
`ditserve serve --simulate` cluster with it (loadtests/simulated_service.py), start a real
Prometheus on every node's endpoint (when installed), wait until the arm's replicas are up,
replay the schedule (loadtests/replay.py) while sampling replicas and GPUs held
(loadtests/cluster_metrics.py), wait for every accepted job to end, and for an autoscaling arm
until its stages are back at their minimum; then stop it all and write the arm's summary.
At the end, `comparison.md` and the plots (loadtests/comparison.py).

Time: `--minutes` is the peak hour's length in uncompressed minutes; the arm replays it in
`minutes / time_scale` wall minutes. The cluster's clock and ours are the same (one machine),
so every measured time converts back by x time_scale.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import yaml

from serving.simulate.profile import load_profile

from loadtests.arrivals import schedule
from loadtests.bound import clairvoyant_gpu_hours
from loadtests.cluster_metrics import ClusterSampler, write_timeline
from loadtests.comparison import summarize_arm, write_comparison, write_summary
from loadtests.plan import ARM_NAMES, Arm, Plan, plan as make_plan
from loadtests.prometheus import REPLICA_STARTUP_P50_MS, Prometheus, binary as prometheus_binary
from loadtests.replay import Replay
from loadtests.report import JobLog, write_jobs_csv
from loadtests.simulated_service import SimulatedService, free_port

SAMPLE_EVERY_S = 5.0  # wall seconds between replica samples and Prometheus scrapes: Ray exports every 10 s, and each scrape of 5 agents costs CPU the simulated cluster needs
READY_TIMEOUT_S = 300  # for an arm's initial replicas to be healthy
DRAIN_TIMEOUT_UNCOMPRESSED_S = 1800  # accepted jobs must end within this after the last arrival
SETTLE_UNCOMPRESSED_S = 600  # an autoscaling arm's stages must be back at their minimum within this


def log_line(text: str) -> None:
    print(f"experiment: {text}", file=sys.stderr, flush=True)


def run_experiment(*, profile: str, gpus: int, nodes: int, minutes: float, out: Path, time_scale: float,
                   seed: int, slo_s: float, arms: list[str], command: str,
                   target_s: float | None = None, cache: str = "off", node_autoscaling: bool = False) -> dict[str, dict]:
    """`node_autoscaling`: the autoscaling arm's cluster also scales its GPU nodes (Ray's
    autoscaler; serving/simulate/node_autoscaling.py); fixed arms keep all their nodes."""
    plan = make_plan(load_profile(profile), gpus, slo_s, target_s, cache)
    offsets = schedule("peak-hour", minutes, plan.base_rate_per_min, seed)
    log_line(f"SIMULATED {profile} on {gpus} GPUs / {nodes} nodes, time scale {time_scale:g}x: {len(offsets)} "
             f"arrivals over {minutes:g} min (base {plan.base_rate_per_min:g}/min, seed {seed}); arms "
             + ", ".join(f"{a} {plan.arms[a].replicas}" for a in arms))
    has_prometheus = prometheus_binary() is not None
    note = "" if has_prometheus else ("Prometheus is not installed (e.g. apt-get install prometheus): the PromQL "
                                      "check was skipped")
    if not has_prometheus:
        log_line(note)
    summaries, logs, samples = {}, {}, {}
    for name in arms:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        summary, logs[name], samples[name] = run_arm(plan.arms[name], plan, folder, offsets, profile=profile,
                                                     gpus=gpus, nodes=nodes, minutes=minutes, time_scale=time_scale,
                                                     slo_s=slo_s, with_prometheus=has_prometheus, note=note,
                                                     node_autoscaling=node_autoscaling and plan.arms[name].autoscaling)
        # What a policy with the same sizing rule cannot beat here (for uncached work: the bound
        # prices jobs at the plan's uncached seconds).
        if plan.arms[name].autoscaling and "cache" not in plan.job.body:
            summary["clairvoyant_gpu_hours"] = round(clairvoyant_gpu_hours(
                offsets, plan.job.seconds, plan.arms[name].replicas, summary["window_s"]), 3)
        write_summary(folder, summary)
        summaries[name] = summary
        log_line(f"{name}: completed {summary['completed']}, 429 {summary['rejected_429']}, p95 queue wait "
                 f"{summary['queue_wait_p95_s']} s, GPU-hours {summary['gpu_hours']} -> {folder}/summary.json")
    path = write_comparison(out, summaries, plan, command=command, logs=logs, samples=samples, minutes=minutes,
                            prometheus_note=note)
    log_line(f"wrote {path}")
    return summaries


def run_arm(arm: Arm, plan: Plan, folder: Path, offsets: list[float], *, profile: str, gpus: int, nodes: int,
            minutes: float, time_scale: float, slo_s: float, with_prometheus: bool, note: str,
            node_autoscaling: bool = False):
    config = folder / "config.yaml"
    config.write_text(f"# {arm.name}: written by `ditserve loadtest experiment` (times uncompressed)\n"
                      + yaml.safe_dump(arm.config(str((folder / "data").resolve()), load_profile(profile)),
                                       sort_keys=False))
    service = SimulatedService(folder, config, profile, gpus, nodes, time_scale, node_autoscaling)
    prometheus = sampler = None
    try:
        log_line(f"{arm.name}: starting a simulated cluster ({folder}/serve.log)")
        service.start()
        sampler = ClusterSampler(service.metrics_urls, SAMPLE_EVERY_S)
        sampler.start()
        if with_prometheus:
            prometheus = Prometheus(folder / "prometheus", service.metrics_urls, SAMPLE_EVERY_S, free_port())
            prometheus.start()
        if not _wait_for(sampler, lambda healthy: all(healthy.get(s, 0) >= n for s, n in arm.replicas.items()),
                         READY_TIMEOUT_S, f"{arm.name}: replicas {arm.replicas} healthy"):
            raise RuntimeError(f"{arm.name}: its replicas never all started; see {folder}/serve.log")
        log = JobLog(started_at=time.time())
        replay = Replay(service.url, plan.job.body, log, poll_s=max(0.5, 10.0 / time_scale))
        replay.run([t / time_scale for t in offsets], DRAIN_TIMEOUT_UNCOMPRESSED_S / time_scale)
        ends = [r.submitted_at + r.latency_s for r in log.rows.values() if r.latency_s is not None]
        last_arrival = log.started_at + (offsets[-1] / time_scale if offsets else 0.0)
        window = (log.started_at, time.time() if log.outstanding else max([last_arrival, *ends]))
        settled = None
        if arm.autoscaling:  # the mechanism's second half: back down once the burst is over
            settled = _wait_for(sampler, lambda healthy: all(healthy.get(s, 0) <= n for s, n in arm.replicas.items()),
                                SETTLE_UNCOMPRESSED_S / time_scale, f"{arm.name}: back at the minimum {arm.replicas}")
        nodes_settled = None
        if node_autoscaling:  # and its idle GPU nodes removed
            least = next((s.nodes["joined"] for s in sampler.samples if "joined" in s.nodes), None)
            nodes_settled = _wait_until(lambda: least is not None and sampler.latest().nodes.get("joined", 0) <= least,
                                        SETTLE_UNCOMPRESSED_S / time_scale, f"{arm.name}: back at {least} GPU node(s)")
        promql: float | None | str = note or "Prometheus did not run"
        startup_ms = None
        if prometheus is not None:
            started = sum(1 for r in log.rows.values() if r.queue_wait_denoiser_s is not None)
            promql = prometheus.queue_wait_p95(started)
            startup_ms = prometheus.query(REPLICA_STARTUP_P50_MS)
        write_jobs_csv(log, folder / "jobs.csv")
        write_timeline(list(sampler.samples), log.started_at, time_scale, folder / "timeline.csv")
        summary = summarize_arm(arm, plan, log, sampler.samples, profile=profile, time_scale=time_scale,
                                minutes=minutes, slo_s=slo_s, window=window, promql_p95=promql)
        summary["scaled_back_to_min"] = settled
        if node_autoscaling:
            summary["gpu_nodes_back_to_min"] = nodes_settled
        # Fidelity: a replica's start-up here is this CPU's process start plus the profile's sleep, x the scale.
        summary["denoiser_replica_startup_p50_s"] = (None if startup_ms is None
                                                     else round(startup_ms / 1000 * time_scale, 1))
        summary["denoiser_replica_startup_profile_s"] = load_profile(profile).startup_seconds("denoiser")
        return summary, log, sampler.samples
    finally:
        if sampler is not None:
            sampler.stop()
        if prometheus is not None:
            prometheus.stop()
        service.stop()


def _wait_for(sampler: ClusterSampler, condition, timeout_s: float, what: str) -> bool:
    """Until `condition` holds for the latest sample's healthy replicas per stage."""
    def holds() -> bool:
        latest = sampler.latest()
        return latest is not None and bool(latest.healthy) and condition(latest.healthy)

    held = _wait_until(holds, timeout_s, what)
    if not held:
        log_line(f"  last seen: {sampler.latest().healthy if sampler.latest() else None}")
    return held


def _wait_until(condition, timeout_s: float, what: str) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            log_line(f"{what}: yes")
            return True
        time.sleep(0.5)
    log_line(f"{what}: NOT within {timeout_s:g} s")
    return False


def command_line(argv: list[str]) -> str:
    return "ditserve " + " ".join(shlex.quote(a) for a in argv)


__all__ = ["ARM_NAMES", "run_experiment", "command_line"]
