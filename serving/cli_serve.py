"""`ditserve serve`: the service on a local Ray cluster (or a given one), real or simulated.

With `--simulate PROFILE` the same service runs on simulated accelerators
(serving/simulate/): a local multi-node Ray cluster whose nodes declare `--gpus` GPUs, every
model stage waiting its cost profile's time, everything compressed by `--time-scale`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


def add_serve_command(sub) -> None:
    srv = sub.add_parser("serve", help="start a local Ray cluster and the video service on it")
    srv.add_argument("--host", help="address to listen on (default from config: 127.0.0.1)")
    srv.add_argument("--port", type=int, help="HTTP port (default from config: 8000)")
    srv.add_argument("--address", help="join this Ray cluster instead of starting a local one (e.g. auto)")
    srv.add_argument("--metrics-port", type=int, default=8080,
                     help="port of the local cluster's Prometheus endpoint (default 8080)")
    sim = srv.add_argument_group("simulated accelerators (no model runs; every output says SIMULATED)")
    sim.add_argument("--simulate", metavar="PROFILE",
                     help="a cost profile (h100-wan2.1-1.3b, h100-wan2.1-14b, tiny-cpu) or a profile JSON path")
    sim.add_argument("--gpus", type=int, help="simulated GPUs in the whole cluster (default 8)")
    sim.add_argument("--nodes", type=int, help="simulated GPU nodes the GPUs are spread over (default 1)")
    sim.add_argument("--time-scale", type=float, help="compress every time by this factor, >= 1 (default 1)")
    sim.add_argument("--node-autoscaling", action="store_const", const=True, default=None,
                     help="start with the GPU nodes the minimum replicas need; Ray's autoscaler adds nodes (up to "
                          "--nodes, each after the profile's node start-up) and removes idle ones")
    srv.add_argument("--config", type=Path,
                     help="YAML config file (DITSERVE_<SECTION>__<KEY> env vars override it)")


def with_flags(args: argparse.Namespace, config):
    """The config with the command line's settings on top (the config model stays the one truth)."""
    from serving.config import SimulationConfig

    server = config.server.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    update: dict = {"server": server}
    flags = {"profile": args.simulate, "gpus": args.gpus, "nodes": args.nodes, "time_scale": args.time_scale,
             "node_autoscaling": getattr(args, "node_autoscaling", None)}
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        if config.simulation is None and args.simulate is None:
            raise ValueError(f"--{next(iter(given)).replace('_', '-')} needs --simulate PROFILE")
        base = config.simulation.model_dump() if config.simulation is not None else {}
        update["simulation"] = SimulationConfig.model_validate({**base, **given})
    return config.model_copy(update=update)


def serve(args, config) -> int:
    from pydantic import ValidationError

    from serving.models.loading import ModelFolderError, check_model_folder

    try:
        config = with_flags(args, config)
    except (ValueError, ValidationError) as exc:
        print(f"ditserve serve: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if config.simulation is not None:
        return _serve_simulated(args, config)
    try:
        check_model_folder(config.model)
    except ModelFolderError as exc:
        print(f"ditserve serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from serving.cluster_env import serve_metrics_push_seconds

    if not _check_look_backs(config, serve_metrics_push_seconds()):
        return EXIT_USAGE
    _quiet_libraries()
    import ray

    local = args.address is None

    def start() -> str:
        if local:  # the controller starts in this cluster (an existing one: set it on its head node)
            from serving.cluster_env import SERVE_CLUSTER_ENV

            os.environ.update(SERVE_CLUSTER_ENV)
        # "local" starts a fresh cluster even if another runs on this machine.
        ray.init(address=args.address or "local", include_dashboard=False, configure_logging=True,
                 logging_level="WARNING", **({"_metrics_export_port": args.metrics_port} if local else {}))
        return f"http://127.0.0.1:{args.metrics_port}/metrics" if local else "your cluster's metrics agents"

    return _run(config, start, ray.shutdown, lambda metrics: banner(config, metrics))


def _serve_simulated(args, config) -> int:
    from serving.simulate.cluster import SimulatedCluster, simulated_config
    from serving.simulate.node_autoscaling import NodeScaling
    from serving.simulate.profile import ProfileError, load_profile

    if args.address is not None:
        print("ditserve serve: error: --simulate starts its own simulated cluster; drop --address", file=sys.stderr)
        return EXIT_USAGE
    try:
        profile = load_profile(config.simulation.profile)
    except ProfileError as exc:
        print(f"ditserve serve: error: --simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        profile.parallel_speedup(config.stages.denoiser.parallel.degree)
    except ValueError as exc:
        print(f"ditserve serve: error: stages.denoiser.parallel: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config, scale = simulated_config(config, profile)
    except ValueError as exc:
        print(f"ditserve serve: error: --simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from serving.cluster_env import SERVE_METRICS_PUSH_ENV

    if not _check_look_backs(config, float(scale.ray_env[SERVE_METRICS_PUSH_ENV])):
        return EXIT_USAGE
    _quiet_libraries()
    simulation = config.simulation
    cluster = SimulatedCluster(simulation.gpus, simulation.nodes, args.metrics_port, scale.ray_env,
                               NodeScaling.of(config) if simulation.node_autoscaling else None)

    def start() -> str:
        cluster.start()
        return ", ".join(f"http://127.0.0.1:{port}/metrics" for port in cluster.metrics_ports)

    return _run(config, start, cluster.stop, lambda metrics: banner(config, metrics, profile, scale, cluster))


def _check_look_backs(config, push_s: float) -> bool:
    """The look-backs against the metric push period the cluster will have, before it starts."""
    from serving.app import check_look_backs
    from serving.config import ConfigError
    from serving.cost_model import STAGE_NAMES

    try:
        check_look_backs({name: getattr(config.stages, name) for name in STAGE_NAMES}, push_s)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"ditserve serve: error: {problem}", file=sys.stderr)
        return False
    return True


def _run(config, start, stop, make_banner) -> int:
    from ray import serve

    from serving.app import run

    try:
        metrics = start()
        # After ray.init, which installs its own handler: SIGTERM (docker stop, kill, systemd)
        # takes the same clean path as Ctrl-C.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        run(config)
        print(make_banner(metrics), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        # A second Ctrl-C or SIGTERM must not interrupt the shutdown itself.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("\nditserve: shutting down", file=sys.stderr, flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            stop()
    return 0


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def _one_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: "
                         f"{str(e['msg']).removeprefix('Value error, ')}" for e in errors())
    return str(exc)


def _quiet_libraries() -> None:
    from serving.cli import _quiet_libraries as quiet

    quiet()


def shown_url(database_url: str) -> str:
    """A job-store URL fit for a terminal or a log: its password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads; the config check reports it elsewhere
        return "(unreadable URL)"


def banner(config, metrics_url: str, profile=None, scale=None, cluster=None) -> str:
    url = f"http://{config.server.host}:{config.server.port}"
    size = "64x64" if profile is None else "832x480"
    from serving.models.presets import PRESETS

    # The examples must work as pasted: an image-to-video model needs its first frame.
    if PRESETS[config.model.preset].takes_image:
        create = (f"curl -s {url}/v1/videos -F prompt='a shape moving right' -F seconds=1 -F size={size} \\\n"
                  f"       -F input_reference=@frame.png      # frame.png: a {size} first frame")
        prompt, frame = "a shape moving right", ', input_reference=open("frame.png", "rb")'
    else:
        create = (f"curl -s {url}/v1/videos -H 'Content-Type: application/json' \\\n"
                  f"""       -d '{{"prompt": "a yellow circle moving right", "seconds": "1", "size": "{size}", "seed": 7}}'""")
        prompt, frame = "a yellow circle moving right", ""
    simulated = ""
    if profile is not None:
        sim = config.simulation
        lines = "\n".join(f"    {line}" for line in scale.describe())
        scaling = cluster.node_scaling
        nodes = "" if scaling is None else (
            f"\n  node autoscaling: {scaling.min_nodes} to {scaling.max_nodes} nodes of {scaling.gpus_per_node} GPUs, "
            f"each joining {scaling.startup_s:g} s after it is asked for, removed after {scaling.idle_timeout_s:g} s idle "
            "(Ray's autoscaler, fake multi-node provider)")
        simulated = f"""
*** SIMULATED ACCELERATORS: no model runs; every video, /readyz and metric says so ***
  cost profile: {profile.name} ({profile.device})
  cluster: {"up to " if scaling is not None else ""}{sim.gpus} simulated GPUs on {sim.nodes} nodes (Ray test cluster on this machine){nodes}
  Ray address: {cluster.address} (RAY_TMPDIR={cluster.ray_tmp}; e.g. `ray status --address {cluster.address}`)
  time scale: {scale.factor:g}x (times here are compressed; multiply by {scale.factor:g} for real seconds)
  compressed settings:
{lines}
"""
    return f"""{simulated}
ditserve is serving {config.model.preset!r} at {url}
  jobs: {shown_url(config.storage.job_store_url)}
  videos: {config.storage.artifacts_url}
  Prometheus scrape URL: {metrics_url}

Try it:
  {create}
  curl -s {url}/v1/videos/VIDEO_ID                      # poll until "status": "completed"
  curl -s {url}/v1/videos/VIDEO_ID/content -o circle.mp4

or with the openai SDK:
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  video = client.videos.create_and_poll(prompt="{prompt}", seconds="1", size="{size}"{frame})
  client.videos.download_content(video.id).write_to_file("circle.mp4")

Ctrl-C stops the service.
"""
