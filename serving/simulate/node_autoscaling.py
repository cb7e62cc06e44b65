"""Node autoscaling for a simulated cluster (`simulation.node_autoscaling`): the cluster
config Ray's own autoscaler reads, as KubeRay's operator gives it one worker group.

The head node starts the autoscaler with this config. Its one worker node type is a GPU
node of `gpus / nodes` GPUs, from the nodes the stages' minimum replicas need up to `nodes`;
Ray's fake multi-node provider starts each as raylets on this machine after the node's
provisioning time (serving/simulate/node_provider.py). Replicas that find no free GPU stay
pending, the autoscaler sees their demand and adds nodes; a node that holds no replica for
`node_idle_timeout_seconds` is removed. Placement, demand and removal are Ray's, as on KubeRay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serving.config import ServiceConfig, SimulationConfig
from serving.simulate.node_provider import STARTUP_KEY
from serving.simulate.profile import CostProfile

NODE_TYPE = "simulated_gpu_node"
PROVIDER = "serving.simulate.node_provider.ProvisionedNodeProvider"


def node_startup_seconds(simulation: SimulationConfig, profile: CostProfile) -> float:
    """The seconds a new GPU node takes to join, uncompressed: the config's, else the cost
    profile's; ValueError when neither gives one."""
    if simulation.node_startup_seconds is not None:
        return simulation.node_startup_seconds
    if profile.node_startup_seconds is None:
        raise ValueError(f"cost profile {profile.name!r} has no node_startup_seconds: give "
                         "simulation.node_startup_seconds for node_autoscaling")
    return profile.node_startup_seconds


def minimum_gpus(config: ServiceConfig) -> float:
    """GPUs the stages hold at their fewest replicas (a gang's replica holds `degree`)."""
    total = 0.0
    for name in ("text_encoder", "denoiser", "vae_decoder"):
        stage = getattr(config.stages, name)
        replicas = stage.autoscaling.min_replicas if stage.autoscaling is not None else stage.num_replicas
        degree = stage.parallel.degree if name == "denoiser" else 1
        total += replicas * stage.num_gpus * degree
    return total


@dataclass(frozen=True)
class NodeScaling:
    min_nodes: int
    max_nodes: int
    gpus_per_node: int
    startup_s: float  # compressed, as the cluster runs
    idle_timeout_s: float  # compressed

    @classmethod
    def of(cls, config: ServiceConfig) -> "NodeScaling":
        """From a simulated config (already compressed by the time scale)."""
        sim = config.simulation
        least = math.ceil(minimum_gpus(config) / sim.gpus_per_node - 1e-9)
        return cls(min(least, sim.nodes), sim.nodes, sim.gpus_per_node, sim.node_startup_seconds or 0.0,
                   sim.node_idle_timeout_seconds)


def autoscaler_config(scaling: NodeScaling, gcs_address: str, head_cpus: float, node_cpus: int,
                      object_store_bytes: int) -> dict:
    """The cluster config (Ray's cluster YAML schema, as JSON) the head's autoscaler reads."""
    return {
        "cluster_name": "ditserve-simulated",
        "max_workers": scaling.max_nodes,
        "upscaling_speed": float(scaling.max_nodes),  # a burst's nodes are asked for at once
        "idle_timeout_minutes": scaling.idle_timeout_s / 60.0,
        "provider": {
            "type": "external", "module": PROVIDER,
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
            "launch_multiple": True,  # else a launch of N nodes starts one
            STARTUP_KEY: scaling.startup_s,
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            NODE_TYPE: {"resources": {"CPU": node_cpus, "GPU": scaling.gpus_per_node,
                                      "object_store_memory": object_store_bytes},
                        "node_config": {}, "min_workers": scaling.min_nodes, "max_workers": scaling.max_nodes},
        },
        # The rest of the schema, empty: no machines to set up.
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
