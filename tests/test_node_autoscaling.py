"""Node autoscaling of a simulated cluster (issue 14, item 7): Ray's own autoscaler, with its
fake multi-node provider, adds GPU nodes while replicas wait for GPUs and removes idle ones,
each node joining after the profile's start-up. First the config it is given; then live, on
a cluster of its own: a burst makes the Denoiser want more GPUs than the first node has, a
node is provisioned (pending first, for its start-up), the jobs complete, the node goes."""

from __future__ import annotations

import json
import math
import time

import pytest
import requests
import yaml
from pydantic import ValidationError

from conftest import wait_for
from serving.config import SimulationConfig, load_config
from serving.simulate.cluster import simulated_config
from serving.simulate.node_autoscaling import NODE_TYPE, NodeScaling, autoscaler_config, minimum_gpus
from serving.simulate.node_provider import STARTUP_KEY
from serving.simulate.profile import load_profile

PROFILE = "h100-wan2.1-1.3b"


def simulated(environ: dict[str, str]):
    config = load_config(None, environ={"DITSERVE_SIMULATION__PROFILE": PROFILE, **environ})
    return simulated_config(config, load_profile(PROFILE))[0]


def test_the_cluster_starts_with_the_nodes_the_minimum_replicas_need():
    config = simulated({"DITSERVE_SIMULATION__GPUS": "16", "DITSERVE_SIMULATION__NODES": "4",
                        "DITSERVE_SIMULATION__NODE_AUTOSCALING": "true", "DITSERVE_SIMULATION__TIME_SCALE": "3",
                        "DITSERVE_STAGES__DENOISER__AUTOSCALING__MIN_REPLICAS": "3",
                        "DITSERVE_STAGES__DENOISER__AUTOSCALING__MAX_REPLICAS": "14",
                        "DITSERVE_SERVER__MAX_RUNNING_JOBS": "80"})
    # 3 Denoisers (a GPU each) + one encoder and one decoder (half a GPU each): one 4-GPU node.
    assert minimum_gpus(config) == 4.0
    scaling = NodeScaling.of(config)
    assert (scaling.min_nodes, scaling.max_nodes, scaling.gpus_per_node) == (1, 4, 4)
    # The profile's node start-up and KubeRay's 60 s idle timeout, compressed like every other time.
    assert scaling.startup_s == pytest.approx(load_profile(PROFILE).node_startup_seconds / 3)
    assert scaling.idle_timeout_s == pytest.approx(60 / 3)
    cluster = autoscaler_config(scaling, "127.0.0.1:6390", head_cpus=1, node_cpus=5, object_store_bytes=2 ** 27)
    node = cluster["available_node_types"][NODE_TYPE]
    assert (node["min_workers"], node["max_workers"], node["resources"]["GPU"]) == (1, 4, 4)
    assert cluster["provider"][STARTUP_KEY] == scaling.startup_s and cluster["idle_timeout_minutes"] == pytest.approx(
        20 / 60)
    assert cluster["provider"]["gcs_address"] == "127.0.0.1:6390"


def test_node_autoscaling_needs_a_node_start_up_and_nodes_of_one_size(tmp_path):
    with pytest.raises(ValidationError, match="multiple of nodes"):
        SimulationConfig(profile=PROFILE, gpus=6, nodes=4, node_autoscaling=True)
    # A profile without the figure: the config must give it, and the error says which field.
    data = json.loads((load_profile(PROFILE).model_dump_json()))
    data.pop("node_startup_seconds")
    data["sources"] = [s for s in data["sources"] if s["what"] != "node_startup_seconds"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(data))
    config = load_config(None, environ={"DITSERVE_SIMULATION__PROFILE": str(bare),
                                        "DITSERVE_SIMULATION__NODE_AUTOSCALING": "true"})
    with pytest.raises(ValueError, match="node_startup_seconds"):
        simulated_config(config, load_profile(str(bare)))
    given = config.model_copy(update={"simulation": config.simulation.model_copy(
        update={"node_startup_seconds": 30.0})})
    assert simulated_config(given, load_profile(str(bare)))[0].simulation.node_startup_seconds == 30.0


# ---- live: a cluster of its own ------------------------------------------------------------

TIME_SCALE = 10
NODE_STARTUP_S = 100  # uncompressed: the node joins 10 s after the autoscaler asks for it
JOB = {"prompt": "a paper boat", "size": "832x480", "seconds": "5", "num_inference_steps": 50}  # 43 s, 4.3 s here


def nodes_of(service) -> dict[str, float]:
    from loadtests.cluster_metrics import read_sample

    return read_sample(service.metrics_urls).nodes


def test_a_burst_adds_a_gpu_node_after_its_start_up_and_idle_nodes_go(tmp_path):
    from loadtests.simulated_service import SimulatedService

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "simulation": {"profile": PROFILE, "node_startup_seconds": NODE_STARTUP_S},
        "engine": {"max_batch": 1},
        "stages": {"denoiser": {"max_ongoing_requests": 1, "autoscaling": {
            "min_replicas": 1, "max_replicas": 3, "target_queue_wait_seconds": 20, "startup_seconds": 11.2,
            "downscale_delay_s": 0}}},
        "storage": {"job_store_url": f"sqlite:///{tmp_path}/jobs.db", "artifacts_url": str(tmp_path / "videos")}}))
    # 2 GPUs a node: the first holds one Denoiser and the encoder and decoder (half a GPU each).
    service = SimulatedService(tmp_path, config, PROFILE, gpus=4, nodes=2, time_scale=TIME_SCALE,
                               node_autoscaling=True)
    service.start()
    try:
        log = (tmp_path / "serve.log").read_text()
        assert "node autoscaling: 1 to 2 nodes of 2 GPUs" in log
        assert nodes_of(service).get("joined") == 1
        ids = []
        for _ in range(8):  # 8 jobs of 43 s against one Denoiser: the policy wants 3
            response = requests.post(f"{service.url}/v1/videos", json=JOB, timeout=30)
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        seen, asked_at, joined_at = [], None, None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and joined_at is None:
            nodes = nodes_of(service)
            seen.append(nodes)
            if asked_at is None and nodes.get("pending", 0) > 0:
                asked_at = time.monotonic()
            if nodes.get("joined", 0) >= 2:
                joined_at = time.monotonic()
            time.sleep(0.5)
        assert asked_at is not None, f"no node was ever provisioning: {seen[-5:]}"
        assert joined_at is not None, f"the second node never joined: {seen[-5:]}"
        # It joined no sooner than its start-up after the autoscaler asked (less the metric's lag).
        assert joined_at - asked_at >= NODE_STARTUP_S / TIME_SCALE - 3
        for job in ids:
            for _ in range(300):
                video = requests.get(f"{service.url}/v1/videos/{job}", timeout=30).json()
                if video["status"] in ("completed", "failed"):
                    break
                time.sleep(0.5)
            assert video["status"] == "completed", video
        # Idle: the Denoisers go back to one, and the node they left is removed after its idle timeout.
        wait_for(lambda: nodes_of(service).get("joined") == 1, timeout=180, interval=1.0)
        assert math.isclose(nodes_of(service).get("pending", 0), 0)
    finally:
        service.stop()
