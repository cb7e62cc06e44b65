"""What an arm's cluster held over time, sampled from its own Prometheus endpoints, and the
GPU-hours it cost.

Every `period_s` the sampler reads every node's endpoint (the simulated cluster prints them
all) and records, per stage, Serve's healthy replicas (`ray_serve_deployment_replica_healthy`)
and its autoscaler's target (`ray_serve_autoscaling_target_replicas`), and the GPUs Ray has
handed out (`ray_resources{Name="GPU", State="USED"}`, summed over nodes). Ray exports every 10 s, so
the timeline lags the cluster by up to that (x the time scale); the integral barely moves,
as up and down edges lag alike.

GPU-hours integrate the GPUs Ray has handed out, not healthy replicas x GPUs per replica: a
replica holds its GPU from placement, through its start-up (weights loading) until it is
stopped, and that whole span is what a GPU fleet pays for. Healthy replicas would leave out
every start-up, which is exactly the cost autoscaling adds. Where Ray's resource gauge is
missing, healthy replicas x the stage's GPUs per replica stand in (and the summary says so).
"""

from __future__ import annotations

import csv
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from serving.simulate.cluster import STAGE_GPUS
from serving.simulate.node_autoscaling import NODE_TYPE

GAUGES = ("ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas", "ray_resources",
          "ray_ditserve_autoscaler_", "autoscaler_")
# Ray's node autoscaler (a node-autoscaled simulated cluster): the GPUs of the nodes it holds
# (joined, and asked for but still provisioning: a booting machine is paid for), and its nodes.
NODE_GAUGES = {"autoscaler_cluster_resources": "joined", "autoscaler_pending_resources": "pending"}
NODE_COUNTS = {"autoscaler_active_nodes": "joined", "autoscaler_pending_nodes": "pending"}
# Our policy's own gauges (serving/metrics.py AutoscalerMetrics): why a stage wanted what it did.
POLICY_GAUGES = {"ray_ditserve_autoscaler_wanted_replicas": "wanted",
                 "ray_ditserve_autoscaler_backlog_seconds": "backlog_s",
                 "ray_ditserve_autoscaler_inflow_replicas": "inflow"}
DEPLOYMENTS = {"TextEncoder": "text_encoder", "Denoiser": "denoiser", "VAEDecoder": "vae_decoder"}
APPLICATION = "ditserve"


@dataclass
class Sample:
    at: float  # unix time (compressed clock)
    healthy: dict[str, float] = field(default_factory=dict)  # stage -> healthy replicas
    target: dict[str, float] = field(default_factory=dict)  # stage -> the autoscaler's target
    gpus_used: float | None = None  # GPUs Ray has handed out, all nodes
    policy: dict[str, float] = field(default_factory=dict)  # "<stage>_<wanted|backlog_s|inflow>" -> value
    # Node autoscaling only: GPUs of the GPU nodes held ("joined", "pending"), and the nodes.
    node_gpus: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, float] = field(default_factory=dict)

    @property
    def gpus_provisioned(self) -> float | None:
        """GPUs of every GPU node the cluster holds or is provisioning; None: a fixed cluster."""
        return sum(self.node_gpus.values()) if self.node_gpus else None

    @property
    def gpus_held(self) -> float:
        if self.gpus_used is not None:
            return self.gpus_used
        return sum(STAGE_GPUS[stage] * n for stage, n in self.healthy.items())


def read_sample(metrics_urls: list[str]) -> Sample:
    sample, gpus_seen = Sample(at=time.time()), False
    for url in metrics_urls:
        try:
            text = requests.get(url, timeout=5).text
        except requests.RequestException:
            continue
        # Only the three gauges' lines: a node's endpoint holds thousands, and this runs every second.
        wanted = "\n".join(line for line in text.splitlines() if line.startswith(GAUGES)) + "\n"
        for family in text_string_to_metric_families(wanted):
            if family.name in ("ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas"):
                into = sample.healthy if family.name.endswith("healthy") else sample.target
                for s in family.samples:
                    stage = DEPLOYMENTS.get(s.labels.get("deployment", ""))
                    if stage is not None and s.labels.get("application") == APPLICATION:
                        into[stage] = into.get(stage, 0.0) + s.value
            elif family.name in POLICY_GAUGES:
                for s in family.samples:
                    sample.policy[f"{s.labels.get('stage')}_{POLICY_GAUGES[family.name]}"] = s.value
            elif family.name in NODE_GAUGES:
                for s in family.samples:
                    if s.labels.get("resource") == "GPU":
                        sample.node_gpus[NODE_GAUGES[family.name]] = s.value
            elif family.name in NODE_COUNTS:
                for s in family.samples:
                    if s.labels.get("NodeType") == NODE_TYPE:
                        sample.nodes[NODE_COUNTS[family.name]] = s.value
            elif family.name == "ray_resources":
                for s in family.samples:
                    if s.labels.get("Name") == "GPU" and s.labels.get("State") == "USED":
                        sample.gpus_used, gpus_seen = (sample.gpus_used or 0.0) + s.value, True
    if not gpus_seen:
        sample.gpus_used = None
    return sample


class ClusterSampler:
    """Samples in a background thread between `start()` and `stop()`."""

    def __init__(self, metrics_urls: list[str], period_s: float):
        self.metrics_urls, self.period_s = metrics_urls, period_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(carried(read_sample(self.metrics_urls), self.latest()))
            self._stop.wait(self.period_s)


def carried(sample: Sample, previous: Sample | None) -> Sample:
    """Ray's agents export a gauge only in the periods it was set, so a series can be missing
    from one scrape: what was last seen still holds."""
    if previous is not None:
        sample.healthy = {**previous.healthy, **sample.healthy}
        sample.target = {**previous.target, **sample.target}
        sample.policy = {**previous.policy, **sample.policy}
        sample.node_gpus = {**previous.node_gpus, **sample.node_gpus}
        sample.nodes = {**previous.nodes, **sample.nodes}
        if sample.gpus_used is None:
            sample.gpus_used = previous.gpus_used
    return sample


def gpu_seconds(samples: list[Sample], start: float, end: float, provisioned: bool = False) -> float:
    """GPU-seconds held between `start` and `end` (compressed clock): each sample's GPUs held
    until the next sample (a step function, as Ray holds them). `provisioned`: the GPUs of the
    nodes held instead (node autoscaling: what a fleet pays for, replicas on them or not)."""
    total = 0.0
    for here, after in zip(samples, [*samples[1:], None]):
        left = max(here.at, start)
        right = min(after.at if after is not None else end, end)
        gpus = here.gpus_provisioned if provisioned and here.gpus_provisioned is not None else here.gpus_held
        if right > left:
            total += gpus * (right - left)
    return total


def node_autoscaled(samples: list[Sample]) -> bool:
    return any(s.gpus_provisioned is not None for s in samples)


def uses_ray_accounting(samples: list[Sample]) -> bool:
    return any(s.gpus_used is not None for s in samples)


def write_timeline(samples: list[Sample], started_at: float, time_scale: float, path: Path) -> None:
    """One row per sample: uncompressed seconds since the first arrival, replicas per stage, GPUs
    held, then what each stage's policy wanted and saw (backlog in uncompressed device-seconds)."""
    stages = tuple(DEPLOYMENTS.values())
    policy = [f"{stage}_{name}" for stage in stages for name in POLICY_GAUGES.values()]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        nodes = node_autoscaled(samples)  # then also the GPU nodes, joined and provisioning
        writer.writerow(["seconds", *(f"{s}_healthy" for s in stages), *(f"{s}_target" for s in stages), "gpus_held",
                         *policy, *(("gpus_provisioned", "gpu_nodes_joined", "gpu_nodes_pending") if nodes else ())])
        for s in samples:
            seen = [s.policy.get(column, "") for column in policy]
            seen = [v * time_scale if column.endswith("_backlog_s") and v != "" else v for column, v in zip(policy, seen)]
            node_columns = ((s.gpus_provisioned if s.gpus_provisioned is not None else "", s.nodes.get("joined", ""),
                             s.nodes.get("pending", "")) if nodes else ())
            writer.writerow([round((s.at - started_at) * time_scale, 1), *(s.healthy.get(n, "") for n in stages),
                             *(s.target.get(n, "") for n in stages), s.gpus_held, *seen, *node_columns])
