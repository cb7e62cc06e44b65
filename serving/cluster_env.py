"""Environment the processes that start a Ray cluster's head give it for ditserve.

Set wherever ditserve starts a cluster itself (`ditserve serve`'s local cluster, a simulated
cluster, the tests' cluster) and in the KubeRay head's container env
(deploy/kubernetes/base/rayservice.yaml); on a cluster of your own, set it on the head node.
"""

from __future__ import annotations

SERVE_CLUSTER_ENV = {
    # A replica that fails its health check (a hung forward, a lost rank) is killed at once
    # instead of drained for its graceful_shutdown_timeout_s: for a Denoiser that is minutes of
    # holding its GPU for calls that will never finish, whose jobs the Director has already
    # retried elsewhere. Scale-downs and updates still drain (serving/app.py).
    "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
}
