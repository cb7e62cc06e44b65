"""Environment the processes that start a Ray cluster's head give it for ditserve.

Set wherever ditserve starts a cluster itself (`ditserve serve`'s local cluster, a simulated
cluster, the tests' cluster) and in the KubeRay head's container env
(deploy/kubernetes/base/rayservice.yaml); on a cluster of your own, set it on the head node.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SERVE_CLUSTER_ENV = {
    # A replica that fails its health check (a hung forward, a lost rank) is killed at once
    # instead of drained for its graceful_shutdown_timeout_s: for a Denoiser that is minutes of
    # holding its GPU for calls that will never finish, whose jobs the Director has already
    # retried elsewhere. Scale-downs and updates still drain (serving/app.py).
    "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
}

# Ray Serve's period (its default) for a replica's push of its autoscaling metrics to the
# controller; the variable overrides it (a simulated run compresses it, the tests shorten it).
SERVE_METRICS_PUSH_ENV = "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"
SERVE_METRICS_PUSH_DEFAULT_S = 10.0


def serve_metrics_push_seconds(environ: Mapping[str, str] = os.environ) -> float:
    """How often the cluster's replicas push autoscaling metrics, as the process that builds the
    app sees it: a cluster ditserve starts inherits this process's environment, and KubeRay builds
    the app on the head node."""
    return float(environ.get(SERVE_METRICS_PUSH_ENV, SERVE_METRICS_PUSH_DEFAULT_S))
