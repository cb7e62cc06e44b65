"""The autoscaling mechanism end to end (issue 14, item 6): `ditserve serve` on its own Ray
cluster, a burst of jobs whose bottleneck is one stage, and that stage's replicas go up
during the burst and back down after it, while every accepted job completes.

It runs as an operator runs the service (a `ditserve serve` subprocess, `start_serve`), not
on the tests' session app: that app has fixed replicas and shares the cluster's two CPUs with
every other live test, and here the policy must load in Serve's controller from the config,
the Director publish its pending work, and the replicas report their own stats, as in
production. The bottleneck is made by config only: VAE decoding of 128x128 clips is ~40
times a 2-step denoise of the tiny model, so the VAE decoder's queue is the one that grows.
What is asserted is the mechanism, never a speed: the replica target comes from Serve's own
`serve_autoscaling_target_replicas` gauge, on Ray's Prometheus endpoint.
"""

from __future__ import annotations

import signal
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import _free_port, start_serve

BURST = 16
JOB = {"prompt": "a red ball bouncing", "seconds": "1", "size": "128x128", "num_inference_steps": 2}


def gauge(metrics_url: str, name: str, **labels: str) -> float | None:
    """The value of gauge `name` with these labels on Ray's endpoint (None until exported)."""
    try:
        text = requests.get(metrics_url, timeout=5).text
    except requests.RequestException:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if all(sample.labels.get(key) == value for key, value in labels.items()):
                    return sample.value
    return None


def target_replicas(metrics_url: str, deployment: str) -> float | None:
    """The replicas Serve's autoscaler is scaling `deployment` to."""
    return gauge(metrics_url, "ray_serve_autoscaling_target_replicas", deployment=deployment, application="ditserve")


def test_bottleneck_stage_scales_up_in_a_burst_and_down_after(tmp_path):
    port, metrics_port = _free_port(), _free_port()
    url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    small = "{num_cpus: 0.1}"
    server = start_serve(
        tmp_path, port, metrics_port,
        DITSERVE_SERVER__DIRECTOR_POLL_SECONDS="0.2",
        RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S="1",  # within the 3 s look-back below
        DITSERVE_SERVER__GATEWAY_NUM_CPUS="0.05", DITSERVE_SERVER__DIRECTOR_NUM_CPUS="0.05",
        DITSERVE_STAGES__TEXT_ENCODER=small, DITSERVE_STAGES__DENOISER=small,
        # Start-up 0: on a loaded 2-core machine a replica may measure a start-up longer than the
        # whole burst, and the policy would rightly add none (test_autoscaling.py tests that
        # rule); delays short so the test stays short.
        DITSERVE_STAGES__VAE_DECODER="{num_cpus: 0.1, autoscaling: {min_replicas: 1, max_replicas: 2, "
                                     "target_queue_wait_seconds: 2, startup_seconds: 0, upscale_delay_s: 0, "
                                     "downscale_delay_s: 5, look_back_period_s: 3}}",
    )
    try:
        assert _wait_for_target(metrics_url, lambda n: n == 1, 60) == 1
        burst = [requests.post(f"{url}/v1/videos", json={**JOB, "prompt": f"{JOB['prompt']} {i}"}, timeout=30)
                 for i in range(BURST)]
        assert [r.status_code for r in burst] == [200] * BURST, [r.text for r in burst if r.status_code != 200]
        ids = [r.json()["id"] for r in burst]

        peak, wanted, deadline = 1.0, 0.0, time.monotonic() + 240
        while True:
            peak = max(peak, target_replicas(metrics_url, "VAEDecoder") or 0.0)
            # The policy says what it wants and why, for operators (serving/metrics.py).
            wanted = max(wanted, gauge(metrics_url, "ray_ditserve_autoscaler_wanted_replicas", stage="vae_decoder")
                         or 0.0)
            statuses = [requests.get(f"{url}/v1/videos/{i}", timeout=30).json()["status"] for i in ids]
            if all(s in ("completed", "failed") for s in statuses):
                break
            assert time.monotonic() < deadline, f"the burst did not finish: {statuses}"
            time.sleep(1.0)
        assert statuses == ["completed"] * BURST  # every accepted job completes
        assert peak == 2, "the VAE decoder, the burst's bottleneck, never scaled up"
        assert wanted >= 2, "the policy's wish is not on the metrics endpoint"
        assert _wait_for_target(metrics_url, lambda n: n == 1, 90) == 1, "it did not scale back down"
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=120)


def _wait_for_target(metrics_url: str, wanted, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while True:
        found = target_replicas(metrics_url, "VAEDecoder")
        if found is not None and wanted(found):
            return found
        if time.monotonic() > deadline:
            return found
        time.sleep(1.0)
