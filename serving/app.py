"""`build_app(config)`: the whole service as one Ray Serve application graph.

    Gateway (HTTP) -> Director -> TextEncoder -> Denoiser -> VAEDecoder

Each model stage is its own deployment with its own replicas and resources from the config,
so each scales on its own. `app_builder` is the import path for `serve run` / KubeRay.
"""

from __future__ import annotations

import math
from typing import Any

from ray import serve
from ray.serve import Application

from serving.cluster_env import SERVE_METRICS_PUSH_ENV, serve_metrics_push_seconds
from serving.config import ConfigError, DenoiserStageConfig, ServiceConfig, StageConfig
from serving.deployments.denoiser import Denoiser
from serving.deployments.director import Director
from serving.deployments.gateway import Gateway
from serving.deployments.text_encoder import TextEncoder
from serving.deployments.vae_decoder import VAEDecoder
from serving.models.presets import PRESETS

APP_NAME = "ditserve"
SERVE_GRACEFUL_SHUTDOWN_S = 20.0  # Serve's own default (ray/serve/_private/constants.py)
DRAIN_HEADROOM = 1.5  # over the typical job: steps run slower when the cluster is busy


def graceful_shutdown_seconds(config: ServiceConfig, name: str) -> float:
    """How long a stopping replica of stage `name` may drain: the stage's setting, else Serve's 20 s,
    or for the Denoiser every job it may hold (a batch runs at once, the rest queue behind it) at the
    preset's default steps and typical step time. Serve picks which replica a scale-down stops
    without looking at what it runs, so without this a busy one is killed after 20 s and its jobs
    resume elsewhere, redoing up to `engine.checkpoint_every` steps each. (A replica that fails its
    health check is killed at once: serving/cluster_env.py.)"""
    stage = getattr(config.stages, name)
    if stage.graceful_shutdown_timeout_s is not None:  # already compressed in a simulated run
        return stage.graceful_shutdown_timeout_s
    seconds = SERVE_GRACEFUL_SHUTDOWN_S
    if name == "denoiser":
        preset = PRESETS[config.model.preset]
        batches = math.ceil(stage.max_ongoing_requests / config.engine.max_batch)
        job = preset.defaults.num_inference_steps * preset.typical_step_seconds
        seconds = max(seconds, batches * job * DRAIN_HEADROOM)
    # A simulated run compresses every period alike (serving/simulate/timescale.py).
    return seconds / (config.simulation.time_scale if config.simulation is not None else 1.0)


def check_look_backs(stages: dict[str, StageConfig], push_s: float) -> None:
    """Serve averages the metrics its replicas pushed within a stage's look-back: a window no
    longer than one push may hold none (Serve warns, and says a later release will refuse it).
    `ditserve serve` checks this before it starts a cluster; `build_app` again, where it runs."""
    problems = [f"stages.{name}.autoscaling.look_back_period_s ({stage.autoscaling.look_back_period_s:g} s) must be "
                f"longer than the period Serve's replicas push autoscaling metrics at ({push_s:g} s, "
                f"{SERVE_METRICS_PUSH_ENV})" for name, stage in stages.items()
                if stage.autoscaling is not None and stage.autoscaling.look_back_period_s <= push_s]
    if problems:
        raise ConfigError(problems)


def _stage_options(name: str, stage: StageConfig, prior_seconds_per_step: float = 0.0, *,
                   drain_s: float = SERVE_GRACEFUL_SHUTDOWN_S) -> dict[str, Any]:
    """Serve options of one model stage: its resources, how long a stopping replica drains, and
    either fixed replicas or `StagePolicy` (serving/autoscaling.py) on the stage's own queue-wait target."""
    options: dict[str, Any] = {
        "max_ongoing_requests": stage.max_ongoing_requests,
        "graceful_shutdown_timeout_s": drain_s,
        "ray_actor_options": {"num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus, "resources": stage.resources},
    }
    degree = stage.parallel.degree if isinstance(stage, DenoiserStageConfig) else 1
    if degree > 1:
        # A replica owns a gang (serving/parallel/workers.py): one bundle per rank, packed on one
        # node; the replica itself takes the first. Ray places and holds them; the autoscaler
        # still counts replicas.
        bundle = {"CPU": stage.num_cpus, **({"GPU": stage.num_gpus} if stage.num_gpus else {}), **stage.resources}
        options["placement_group_bundles"] = [bundle] * degree
        options["placement_group_strategy"] = "STRICT_PACK"
    scaling = stage.autoscaling
    if scaling is None:
        options["num_replicas"] = stage.num_replicas
        return options
    push_s = serve_metrics_push_seconds()
    check_look_backs({name: stage}, push_s)
    options["autoscaling_config"] = {
        "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
        "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
        "look_back_period_s": scaling.look_back_period_s,
        # What Serve checks the look-back against, and the handles' push period (Ray 2.60 reads
        # it there, not from the environment): the replicas' period keeps them in step.
        "metrics_interval_s": push_s,
        "policy": {"policy_function": "serving.autoscaling:StagePolicy",
                   "policy_kwargs": {"stage": name, "target_queue_wait_s": scaling.target_queue_wait_seconds,
                                     "startup_seconds": scaling.startup_seconds,
                                     "prior_seconds_per_step": prior_seconds_per_step,
                                     "inflow_window_s": scaling.inflow_window_s}},
    }
    return options


def build_app(config: ServiceConfig) -> Application:
    stages = config.stages
    # Until a Denoiser has measured a step: the preset's, shared by a full batch's requests.
    step_prior = PRESETS[config.model.preset].typical_step_seconds / config.engine.max_batch
    text_encoder = TextEncoder.options(**_stage_options(
        "text_encoder", stages.text_encoder, drain_s=graceful_shutdown_seconds(config, "text_encoder"))).bind(config)
    denoiser = Denoiser.options(**_stage_options(
        "denoiser", stages.denoiser, step_prior, drain_s=graceful_shutdown_seconds(config, "denoiser"))).bind(config)
    vae_decoder = VAEDecoder.options(**_stage_options(
        "vae_decoder", stages.vae_decoder, drain_s=graceful_shutdown_seconds(config, "vae_decoder"))).bind(config)
    director = Director.options(
        num_replicas=1, max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": config.server.director_num_cpus, "resources": config.server.resources},
    ).bind(config, text_encoder, denoiser, vae_decoder)
    return Gateway.options(
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": config.server.gateway_num_cpus, "resources": config.server.resources},
    ).bind(config, director)


def app_builder(args: dict[str, Any]) -> Application:
    """The import path of a RayService's serveConfigV2 (`ditserve k8s render` writes it) and of
    `serve run serving.app:app_builder config_path=ditserve.yaml`. Takes the config inline
    (`args.config`) or from a file (`args.config_path`); DITSERVE_* variables (e.g. from
    Kubernetes Secrets) override either."""
    from serving.config import config_from_dict, load_config

    if "config" in args:
        return build_app(config_from_dict(args["config"], source="serveConfigV2 args.config"))
    return build_app(load_config(args.get("config_path")))


def run(config: ServiceConfig, blocking: bool = False) -> None:
    """Deploy onto the running Ray cluster, HTTP on config.server.host:port."""
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=blocking)
