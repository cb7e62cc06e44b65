"""One point of `ditserve loadtest ceiling` (loadtests/ceiling.py) as a cluster: N Denoisers, a
text encoder and a VAE decoder per four of them, the GPUs and nodes they take, and the
`ditserve serve --config` that runs them on the point's own job store."""

from __future__ import annotations

import math

from serving.simulate.profile import CostProfile

from loadtests.plan import Arm

GPUS_PER_NODE = 8  # --nodes' default: the GPUs spread over nodes of eight, as on an HGX box


def point_arm(replicas: int) -> Arm:
    """N Denoisers, and a text encoder and a VAE decoder per four of them (each busy a few
    percent of a job's time: enough that they are never what waits)."""
    helpers = math.ceil(replicas / 4)
    return Arm("ceiling", {"text_encoder": helpers, "denoiser": replicas, "vae_decoder": helpers})


def point_gpus(replicas: int) -> int:
    return math.ceil(point_arm(replicas).gpus())


def default_nodes(gpus: int) -> int:
    return math.ceil(gpus / GPUS_PER_NODE)


def point_config(replicas: int, data_dir: str, profile: CostProfile, job_store_url: str | None) -> dict:
    """The `ditserve serve --config` YAML (as a dict), times uncompressed: the experiment's fixed
    arm config (one job per Denoiser, one call at a time on the Denoiser and decoder), with the
    point's job store."""
    config = point_arm(replicas).config(data_dir, profile)
    if job_store_url is not None:
        config["storage"]["job_store_url"] = job_store_url
    return config
