"""What an arm's cluster held over time, sampled from its own Prometheus endpoints, and the
GPU-hours it cost.

Every `period_s` the sampler reads every node's endpoint (the simulated cluster prints them
all) and records, per stage, Serve's healthy replicas (`ray_serve_deployment_replica_healthy`)
and its autoscaler's target (`ray_serve_autoscaling_target_replicas`), and the GPUs Ray has
handed out (`ray_resources{Name="GPU", State="USED"}`, summed over nodes).

GPU-hours integrate the GPUs Ray has handed out, not healthy replicas x GPUs per replica: a
replica holds its GPU from placement, through its start-up (weights loading) until it is
stopped, and that whole span is what a GPU fleet pays for. Healthy replicas would leave out
every start-up, which is exactly the cost autoscaling adds. Where Ray's resource gauge is
missing, healthy replicas x the stage's GPUs per replica stand in (and the summary says so).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import requests
from prometheus_client.parser import text_string_to_metric_families

from serving.simulate.cluster import STAGE_GPUS

DEPLOYMENTS = {"TextEncoder": "text_encoder", "Denoiser": "denoiser", "VAEDecoder": "vae_decoder"}
APPLICATION = "ditserve"


@dataclass
class Sample:
    at: float  # unix time (compressed clock)
    healthy: dict[str, float] = field(default_factory=dict)  # stage -> healthy replicas
    target: dict[str, float] = field(default_factory=dict)  # stage -> the autoscaler's target
    gpus_used: float | None = None  # GPUs Ray has handed out, all nodes

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
        for family in text_string_to_metric_families(text):
            if family.name in ("ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas"):
                into = sample.healthy if family.name.endswith("healthy") else sample.target
                for s in family.samples:
                    stage = DEPLOYMENTS.get(s.labels.get("deployment", ""))
                    if stage is not None and s.labels.get("application") == APPLICATION:
                        into[stage] = into.get(stage, 0.0) + s.value
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
            self.samples.append(read_sample(self.metrics_urls))
            self._stop.wait(self.period_s)


def gpu_seconds(samples: list[Sample], start: float, end: float) -> float:
    """GPU-seconds held between `start` and `end` (compressed clock): each sample's GPUs held
    until the next sample (a step function, as Ray holds them)."""
    total = 0.0
    for here, after in zip(samples, [*samples[1:], None]):
        left = max(here.at, start)
        right = min(after.at if after is not None else end, end)
        if right > left:
            total += here.gpus_held * (right - left)
    return total


def uses_ray_accounting(samples: list[Sample]) -> bool:
    return any(s.gpus_used is not None for s in samples)
