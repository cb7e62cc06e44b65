"""A simulated GPU cluster on this machine, and the service config that runs on it.

`simulated_config` turns the operator's config into the one a simulated run deploys: the
profile's model preset, every stage asking Ray for GPUs as the prod overlay does
(deploy/kubernetes/overlays/prod/ditserve.yaml: a whole GPU per Denoiser replica, half a GPU
per text-encoder and VAE replica) and for a sliver of CPU (the stand-ins sleep; 16+ replicas
fit on 2 cores), jobs and videos in their own folder (simulated videos never mix with real
ones), then everything compressed by the time scale (serving/simulate/timescale.py).

`SimulatedCluster` starts Ray's own multi-node-on-one-machine test cluster
(`ray.cluster_utils.Cluster`): a head node (no GPUs: the Gateway, Director and Serve's
controller) and `nodes` worker nodes declaring the GPUs between them. Placement, GPU limits
and pending replicas are Ray's, exactly as on a real cluster. Its sockets and session files
live in a private RAY_TMPDIR, so no other `ray.init()` on this machine can find and join it.
With `simulation.node_autoscaling` the head starts alone, with Ray's autoscaler, which adds
and removes the GPU nodes (serving/simulate/node_autoscaling.py).

Each GPU node keeps warm Python workers with a stage replica's imports already done (Ray's
worker prestart and preload), and the cluster is handed over only once they are. On a real
node, process start and imports are part of the profile's start-up seconds, which the
stand-in waits (serving/simulate/stages.py). Here, ten replicas importing torch and diffusers
at once on two cores took 35 s of wall clock (x the time scale) on top: a scale-up would pay
this machine's CPU, not the profile's cold start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time

from serving.cluster_env import SERVE_CLUSTER_ENV
from serving.config import ServiceConfig, StorageConfig
from serving.simulate.node_autoscaling import NodeScaling, autoscaler_config, node_startup_seconds
from serving.simulate.profile import CostProfile
from serving.simulate.timescale import TimeScale, scale_config

# GPUs per replica when a stage's config asks for none: the prod overlay's shares.
STAGE_GPUS = {"text_encoder": 0.5, "denoiser": 1.0, "vae_decoder": 0.5}
STAGE_CPUS = 0.01  # a sleeping stand-in needs none; Ray still counts it
HEAD_CPUS = 1  # logical CPUs of the head node (the Gateway and Director take 0.1 each)
# A GPU node's logical CPUs are its warm workers (Ray prestarts one per CPU): one per replica
# that fits with a whole GPU each, plus one; at most MAX_WARM_WORKERS in the cluster (each
# holds ~300 MB: torch and diffusers imported). Replicas beyond them start cold.
WARM_WORKERS_BEYOND_GPUS = 1
MAX_WARM_WORKERS = 32
WARM_IMPORTS = ("serving.deployments.denoiser", "serving.deployments.text_encoder",
                "serving.deployments.vae_decoder", "serving.models.loading", "serving.engine.scheduler",
                "serving.simulate.stages", "serving.storage", "serving.metrics")
WARM_TIMEOUT_S = 600.0
BUSY_PROCESS_CPU_SECONDS_PER_SECOND = 0.25  # a process still warming up (importing) uses more
NODE_OBJECT_STORE_BYTES = 128 * 1024 * 1024  # simulated latents are small (see standins.py)
SIMULATED_DATA = "ditserve-data/simulated"


def simulated_config(config: ServiceConfig, profile: CostProfile) -> tuple[ServiceConfig, TimeScale]:
    stages = config.stages.model_copy(update={
        name: getattr(config.stages, name).model_copy(update={
            "num_gpus": getattr(config.stages, name).num_gpus or STAGE_GPUS[name], "num_cpus": STAGE_CPUS})
        for name in STAGE_GPUS})
    defaults = StorageConfig()
    storage = config.storage.model_copy(update={
        **({"job_store_url": StorageConfig(job_store_url=f"sqlite:///{SIMULATED_DATA}/jobs.db").job_store_url}
           if config.storage.job_store_url == defaults.job_store_url else {}),
        **({"artifacts_url": StorageConfig(artifacts_url=f"{SIMULATED_DATA}/artifacts").artifacts_url}
           if config.storage.artifacts_url == defaults.artifacts_url else {}),
    })
    model = config.model.model_copy(update={"preset": profile.model, "path": None})
    simulation = config.simulation
    if simulation is not None and simulation.node_autoscaling:  # compressed below with every other time
        simulation = simulation.model_copy(update={"node_startup_seconds": node_startup_seconds(simulation, profile)})
    unscaled = ServiceConfig.model_validate({
        **config.model_dump(), "model": model.model_dump(), "stages": stages.model_dump(),
        "storage": storage.model_dump(), "simulation": simulation.model_dump() if simulation is not None else None})
    return scale_config(unscaled)


def node_resource(index: int) -> str:
    """The custom resource only simulated GPU node `index` declares (one unit)."""
    return f"simulated_node_{index}"


def gpus_per_node(gpus: int, nodes: int) -> list[int]:
    """Spread evenly: 10 GPUs on 4 nodes -> [3, 3, 2, 2]."""
    return [gpus // nodes + (1 if i < gpus % nodes else 0) for i in range(nodes)]


def gpu_nodes() -> int:
    """Alive nodes of the connected cluster that declare GPUs."""
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU", 0) > 0)


def free_port() -> int:
    """A free TCP port on loopback (for a node's or a tool's listener)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SimulatedCluster:
    def __init__(self, gpus: int, nodes: int, metrics_port: int, env: dict[str, str],
                 node_scaling: NodeScaling | None = None):
        self.gpus, self.nodes, self.metrics_port, self.env = gpus, nodes, metrics_port, env
        self.node_scaling = node_scaling  # None: all `nodes` from the start, for the whole run
        self.cluster = None
        self.ray_tmp: str | None = None
        self.metrics_ports: list[int] = []

    def start(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        self.ray_tmp = tempfile.mkdtemp(prefix="dss-", dir="/tmp")  # short: Ray's socket paths must fit
        os.environ["RAY_TMPDIR"] = self.ray_tmp
        os.environ.update(self.env)  # inherited by every raylet and worker started below
        os.environ.update(SERVE_CLUSTER_ENV)  # as on any cluster ditserve starts
        os.environ.update(RAY_enable_worker_prestart="1", RAY_preload_python_modules=",".join(WARM_IMPORTS),
                          RAY_worker_maximum_startup_concurrency=str(max(self.gpus, 1)),
                          # Serve's controller kills a proxy not ready within 5 s, and `serve.start`
                          # then fails: with dozens of replicas starting on two cores, one often is not.
                          RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="60")
        # All nodes are processes of this machine (on its own address, as Ray's test cluster sets them up).
        head = dict(num_cpus=HEAD_CPUS, object_store_memory=NODE_OBJECT_STORE_BYTES, num_gpus=0,
                    include_dashboard=False, metrics_export_port=self.metrics_port,
                    dashboard_agent_listen_port=free_port(), gcs_server_port=free_port())
        warm_per_node = max(1, MAX_WARM_WORKERS // self.nodes)
        if self.node_scaling is not None:
            self._start_autoscaled(head, warm_per_node)
            return
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.metrics_ports = [self.metrics_port]
        for index, gpus in enumerate(gpus_per_node(self.gpus, self.nodes)):
            port = free_port()
            # `simulated_node_<i>`: a config can pin a stage to a node (stages.<s>.resources), as a
            # KubeRay worker group's custom resource does in the prod overlays.
            self.cluster.add_node(num_cpus=min(gpus + WARM_WORKERS_BEYOND_GPUS, warm_per_node), num_gpus=gpus,
                                  resources={node_resource(index): 1.0},
                                  object_store_memory=NODE_OBJECT_STORE_BYTES, metrics_export_port=port,
                                  dashboard_agent_listen_port=free_port())
            self.metrics_ports.append(port)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, logging_level="WARNING", log_to_driver=False)
        self._wait_until_warm()

    def _start_autoscaled(self, head: dict, warm_per_node: int) -> None:
        """The head alone, with Ray's autoscaler (serving/simulate/node_autoscaling.py); back once
        the minimum GPU nodes have joined and warmed up."""
        import ray
        from ray.cluster_utils import Cluster

        scaling = self.node_scaling
        autoscaler_port = free_port()
        # The fake provider runs only under RAY_FAKE_CLUSTER; the autoscaler's loop every second
        # (its default 5 s would add up to 5 s to every scale-up, times the time scale).
        os.environ.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                          AUTOSCALER_METRIC_PORT=str(autoscaler_port))
        gcs = f"{ray._private.services.get_node_ip_address()}:{head['gcs_server_port']}"
        path = os.path.join(self.ray_tmp, "autoscaler.json")
        with open(path, "w") as handle:
            json.dump(autoscaler_config(scaling, gcs, HEAD_CPUS, min(scaling.gpus_per_node + WARM_WORKERS_BEYOND_GPUS,
                                                                     warm_per_node), NODE_OBJECT_STORE_BYTES), handle)
        self.cluster = Cluster(initialize_head=True, head_node_args={**head, "autoscaling_config": path})
        # The autoscaler's own gauges (autoscaler_active_nodes, _pending_nodes, _cluster_resources)
        # say which nodes the cluster holds: a fake node's own metrics port is not known here.
        self.metrics_ports = [self.metrics_port, autoscaler_port]
        ray.init(address=self.cluster.address, logging_level="WARNING", log_to_driver=False)
        deadline = time.monotonic() + WARM_TIMEOUT_S + scaling.startup_s
        while gpu_nodes() < scaling.min_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the autoscaler started {gpu_nodes()} of {scaling.min_nodes} GPU nodes "
                                   f"(see {self.ray_tmp}, monitor.log)")
            time.sleep(1.0)
        self._wait_until_warm()

    def _wait_until_warm(self) -> None:
        """Until no process of this cluster is busy for a few seconds running: the warm workers
        have done their imports (an importing worker uses a whole core; an idle one ~2 %)."""
        import psutil

        def members() -> dict[int, psutil.Process]:
            # Its raylets, GCS and agents name its private temp dir on their command lines;
            # the workers are their children.
            found: dict[int, psutil.Process] = {}
            for process in psutil.process_iter(["cmdline"]):
                if any(self.ray_tmp in part for part in process.info["cmdline"] or ()):
                    for member in [process, *process.children(recursive=True)]:
                        found[member.pid] = member
            return found

        def cpu_seconds(processes: dict[int, psutil.Process]) -> dict[int, float]:
            seconds = {}
            for pid, process in processes.items():
                try:
                    times = process.cpu_times()
                except psutil.Error:  # gone meanwhile
                    continue
                seconds[pid] = times.user + times.system
            return seconds

        deadline, quiet, last = time.monotonic() + WARM_TIMEOUT_S, 0, cpu_seconds(members())
        while quiet < 3:
            if time.monotonic() > deadline:
                logging.getLogger(__name__).warning("simulated nodes still busy warming up after %.0f s; going on",
                                                    WARM_TIMEOUT_S)
                return
            time.sleep(1.0)
            now = cpu_seconds(members())
            busiest = max((seconds - last.get(pid, 0.0) for pid, seconds in now.items()), default=0.0)
            quiet = quiet + 1 if busiest < BUSY_PROCESS_CPU_SECONDS_PER_SECOND else 0
            last = now

    @property
    def address(self) -> str:
        return self.cluster.address if self.cluster is not None else ""

    def stop(self) -> None:
        import ray

        try:
            ray.shutdown()
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.shutdown()
            finally:
                if self.ray_tmp is not None:
                    shutil.rmtree(self.ray_tmp, ignore_errors=True)
